"""Checkpoint sharing: N trials that share one poisoned checkpoint vs N that each train it."""

from __future__ import annotations

import tempfile
import time

from raysweep.base.storage import open_store
from raysweep.experiment.checkpoints import train_count
from raysweep.experiment.spec import load
from raysweep.experiment.trial import prepare, run_trial


def _trials(spec, roots: list[str]) -> tuple[float, int]:
    """Run one gd trial per root (a fresh process cache each time); wall seconds, trainings."""
    t = time.perf_counter()
    keys = set()
    for i, root in enumerate(roots):
        prepare.cache_clear()  # as if each trial ran in a new worker process
        row = run_trial(spec, open_store(root), "gd", 0.05, {"lr": 1e-3}, i, lambda r: None)
        keys |= {(root, row["poisoned_key"]), (root, row["retrain_key"])}
    wall = time.perf_counter() - t
    return wall, sum(train_count(open_store(r), k) for r, k in keys)


def main(n: int = 4) -> dict:
    spec = load("search_spaces/quickstart.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        shared_s, shared_trainings = _trials(spec, [f"{tmp}/shared"] * n)
        own_s, own_trainings = _trials(spec, [f"{tmp}/own{i}" for i in range(n)])
    out = {
        "n_trials": n,
        "shared_s": shared_s,
        "each_trains_s": own_s,
        "trainings_shared": shared_trainings,
        "trainings_each": own_trainings,
        "speedup": own_s / shared_s,
    }
    print(
        f"checkpoints: {n} trials sharing one checkpoint pair {shared_s:.1f}s "
        f"({shared_trainings} trainings) vs each training its own {own_s:.1f}s "
        f"({own_trainings} trainings) -> {out['speedup']:.2f}x"
    )
    return out


if __name__ == "__main__":
    main()
