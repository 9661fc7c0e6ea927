"""raysweep: does machine unlearning remove data poisoning? Ray Tune + Optuna sweeps that test it."""

__version__ = "0.1.0"
