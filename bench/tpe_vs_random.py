"""TPE against random search on the same cells, in one run: the best r each has reached after
k trials, averaged over a few sampler seeds.

Both samplers are built exactly as the sweep builds them (`searcher.make_sampler`, same startup
trials for TPE), search the quickstart spaces, and see the same trial numbers (so the same
unlearning randomness). Trials run in-process with `run_trial`, one at a time, not through Ray:
this measures search quality per trial, not throughput.

    PYTHONPATH=. python -m bench.tpe_vs_random [--trials 30] [--repeats 3] [--storage DIR]

About 2-3 minutes on 2 busy CPU cores (the two checkpoints train once, then ~0.2 s a trial).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time

import numpy as np
import optuna
import torch

from raysweep.base.storage import open_store
from raysweep.experiment.spec import Spec, distributions, validate
from raysweep.experiment.trial import derive_seed, run_trial
from raysweep.runner.searcher import cell_name, make_sampler

# The quickstart's spaces on a smaller model, with a landscape worth searching: a feasible
# boundary (too high an lr or noise breaks the utility constraint) just past the lowest r.
SPEC = {
    "name": "bench-tpe-vs-random",
    "dataset": {"name": "digits", "size": 16},
    "model": {"name": "mlp", "width": 256, "depth": 2},
    "attack": {"name": "gaussian", "n": 60, "eps": 2.0},
    "train": {"epochs": 20, "lr": 0.05, "batch_size": 64},
    "budgets": [0.1],
    "delta": 0.03,
    "methods": {
        "gd": {"lr": {"low": 1e-5, "high": 0.3, "log": True}},
        "ngd": {
            "lr": {"low": 1e-5, "high": 0.3, "log": True},
            "sigma2": {"low": 1e-9, "high": 1e-3, "log": True},
        },
        "ga": {
            "lr": {"low": 1e-7, "high": 1e-2, "log": True},
            "steps": {"low": 1, "high": 200, "log": True},
        },
    },
}
SAMPLERS = ("tpe", "random")


def search(spec: Spec, store, method: str, budget: float, kind: str, repeat: int, n: int):
    """One study of n trials; returns the best objective after each trial (inf until feasible)."""
    name = cell_name(method, budget)
    seed = derive_seed("bench", kind, name, repeat) % 2**32
    study = optuna.create_study(sampler=make_sampler(kind, seed, n))
    dists, fixed = distributions(method, spec.methods[method])
    best, curve = math.inf, []
    for _ in range(n):
        trial = study.ask(dists)
        params = {**fixed, **trial.params}
        row = run_trial(spec, store, method, budget, params, trial.number, report=lambda r: None)
        study.tell(trial, row["objective"])
        if row["feasible"]:  # r counts only under the utility constraint
            best = min(best, row["residual_val"])
        curve.append(best)
    return curve


def _fmt(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "-"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=30, help="trials per study")
    p.add_argument("--repeats", type=int, default=3, help="sampler seeds per (cell, sampler)")
    p.add_argument("--storage", default=None, help="checkpoint store (default: a temp dir)")
    args = p.parse_args(argv or [])  # `make bench` calls main() with its own sys.argv
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.time()
    spec = validate(SPEC, "bench/tpe_vs_random.py")
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(args.storage or tmp)
        curves: dict[str, dict[str, np.ndarray]] = {}
        for method, budget in spec.cells():
            curves[cell_name(method, budget)] = {
                kind: np.array(
                    [
                        search(spec, store, method, budget, kind, rep, args.trials)
                        for rep in range(args.repeats)
                    ]
                )
                for kind in SAMPLERS
            }
    steps = sorted({k for k in (1, 2, 5, 10, 15, 20, 30, 50, 100) if k <= args.trials})
    steps = sorted({*steps, args.trials})
    print(f"best feasible r on val after k trials (mean over {args.repeats} sampler seeds)")
    w = 2 + max(len(f"{c}/{kind}") for c in curves for kind in SAMPLERS)
    print(f"{'k':>4}" + "".join(f"{c + '/' + kind:>{w}}" for c in curves for kind in SAMPLERS))
    for k in steps:
        means = [_mean(c[kind][:, k - 1]) for c in curves.values() for kind in SAMPLERS]
        print(f"{k:>4}" + "".join(f"{_fmt(m):>{w}}" for m in means))
    wins = {
        name: {
            "tpe": int((c["tpe"][:, -1] < c["random"][:, -1]).sum()),
            "random": int((c["random"][:, -1] < c["tpe"][:, -1]).sum()),
        }
        for name, c in curves.items()
    }
    print(
        "final best lower (per sampler seed): "
        + ", ".join(f"{name} tpe {w['tpe']} / random {w['random']}" for name, w in wins.items())
    )
    seconds = time.time() - started
    print(f"{seconds:.0f} s, {len(curves) * 2 * args.repeats * args.trials} trials")
    return {
        "trials": args.trials,
        "repeats": args.repeats,
        "curves": {n: {k: v.tolist() for k, v in c.items()} for n, c in curves.items()},
        "mean_final": {n: {k: _mean(v[:, -1]) for k, v in c.items()} for n, c in curves.items()},
        "wins": wins,
        "seconds": seconds,
        # Scalars for `make bench`'s one-line summary.
        "tpe_wins": sum(w["tpe"] for w in wins.values()),
        "random_wins": sum(w["random"] for w in wins.values()),
        **{f"final_{n}_{k}": _mean(v[:, -1]) for n, c in curves.items() for k, v in c.items()},
    }


def _mean(values: np.ndarray) -> float:
    """Mean over sampler seeds; inf if any seed has found no feasible trial yet."""
    return float(np.mean(values))


if __name__ == "__main__":
    main(sys.argv[1:])
