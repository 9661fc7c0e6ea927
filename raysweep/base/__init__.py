"""Foundations every layer stands on, with no torch, Ray or Optuna: value domains, the YAML reader, the typed spec, the row store."""
