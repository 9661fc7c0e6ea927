"""Rows into answers: the Parquet schema and the result table, and when a cell's search has converged."""
