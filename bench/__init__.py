"""Benchmarks: each module's main() measures side by side in one run and returns its numbers."""
