"""Plans, checks and runs a sweep on Ray: Tune trials, Optuna searchers, preflight, resume, the loopback cluster."""
