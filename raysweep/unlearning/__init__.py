"""The unlearners: one function each in one table, the passes they share, and last-layer Newton."""
