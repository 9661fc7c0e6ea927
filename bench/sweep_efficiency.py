"""Sweep efficiency: all cells in one Tuner (raysweep) vs one Tuner per cell, one after another.

busy fraction = sum of trial wall seconds / (sweep wall seconds x CPUs). Trials are sized to
take about 10 s each (a CNN unlearning on 32x32 digits), the checkpoints are trained before
either sweep starts, and both sweeps run on the same local Ray, one after the other.
"""

from __future__ import annotations

import copy
import tempfile
import time

import ray

from raysweep.experiment.spec import validate
from raysweep.runner import sweep

SPEC = {
    "name": "bench-efficiency",
    "dataset": {"name": "digits", "size": 32},
    "model": {"name": "cnn", "width": 16},
    "attack": {"name": "gaussian", "n": 60, "eps": 2.0},
    "train": {"epochs": 20, "lr": 0.05, "batch_size": 64},
    "budgets": [0.15],
    "trials_per_cell": 3,
    "delta": 1.0,
    "methods": {
        "gd": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}},
        "ngd": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "sigma2": 1e-7},
        "ga": {"lr": {"low": 1e-6, "high": 1e-4, "log": True}, "steps": 1000},
    },
}


def _busy(df, wall: float, cpus: float) -> float:
    return float(df["wall_s"].sum()) / (wall * cpus)


def main(cpus: int = 2) -> dict:
    sweep.start_ray(None, num_cpus=cpus)
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: train both checkpoints once, so neither sweep pays for them.
        warm = copy.deepcopy(SPEC) | {"name": "warmup", "trials_per_cell": 1}
        warm["methods"] = {"gd": SPEC["methods"]["gd"]}
        sweep.run(validate(warm), tmp)

        t = time.perf_counter()
        together = sweep.run(validate(copy.deepcopy(SPEC) | {"name": "together"}), tmp)
        together_wall = time.perf_counter() - t

        t, naive_rows = time.perf_counter(), []
        for method, space in SPEC["methods"].items():
            one = copy.deepcopy(SPEC) | {"name": f"naive-{method}", "methods": {method: space}}
            naive_rows.append(sweep.run(validate(one), tmp))
        naive_wall = time.perf_counter() - t
    import pandas as pd

    naive = pd.concat(naive_rows)
    out = {
        "cpus": cpus,
        "trials": len(together),
        "mean_trial_s": float(together["wall_s"].mean()),
        "raysweep_wall_s": together_wall,
        "naive_wall_s": naive_wall,
        "raysweep_busy": _busy(together, together_wall, cpus),
        "naive_busy": _busy(naive, naive_wall, cpus),
    }
    out["speedup"] = naive_wall / together_wall
    print(
        f"sweep: {out['trials']} trials of ~{out['mean_trial_s']:.1f}s on {cpus} CPUs: "
        f"busy fraction {out['raysweep_busy']:.2f} (all cells in one Tuner) vs "
        f"{out['naive_busy']:.2f} (one Tuner per cell) -> {out['speedup']:.2f}x faster (target >= 0.9)"
    )
    ray.shutdown()
    return out


if __name__ == "__main__":
    main()
