"""What a finished run shows a reader: the report's tables and figures, and the MLflow mirror."""
