"""Throughput of every unlearner as a ratio to plain `gd`: budget units spent per wall second.

The budget prices work in units (one example's forward+backward; a forward alone is 1/3). If it
prices each method fairly, every method spends units at about gd's rate and the ratio is near 1.
Above 1, a method is charged faster than it computes (e.g. euk/cfk: every pass over the cached
suffix is charged a full unit); below 1, it does work that costs more wall time than its units
say (e.g. ssd's one-row Fisher passes, or parameter-sized work per step).

Small CNN on digits-shaped tensors (1x16x16, 10 classes), one thread (as one trial per CPU),
methods interleaved and rotated each repetition so drift on a shared machine hits all alike.

    PYTHONPATH=. python -m bench.unlearners
"""

from __future__ import annotations

import copy
import time

import torch

from raysweep.budget import Meter
from raysweep.models import cnn, seeded
from raysweep.unlearners import UNLEARNERS

SHAPE, CLASSES = (1, 16, 16), 10


def _data(generator: torch.Generator, n_retain: int = 960, n_forget: int = 60):
    retain = torch.randn(n_retain, *SHAPE, generator=generator)
    forget = torch.randn(n_forget, *SHAPE, generator=generator) * 2.0
    labels = lambda n: torch.randint(0, CLASSES, (n,), generator=generator)
    return (forget, labels(n_forget)), (retain, labels(n_retain))


def _run(name: str, model, forget, retain, cap: float, seed: int) -> tuple[float, float]:
    """Units spent and wall seconds of one unlearning run on a fresh copy of `model`."""
    model, meter = copy.deepcopy(model), Meter(cap)
    start = time.perf_counter()
    UNLEARNERS[name](model, forget, retain, meter, torch.Generator().manual_seed(seed))
    return meter.used, time.perf_counter() - start


def main(reps: int = 3, cap: float = 1000.0) -> dict[str, dict[str, float]]:
    """Print and return {method: {units, wall_s, units_per_s, ratio_to_gd}} summed over reps."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    model = seeded(lambda: cnn(SHAPE, CLASSES), generator)
    forget, retain = _data(generator)
    names = list(UNLEARNERS)
    for name in names:  # warm-up: first calls pay one-off allocation and kernel selection
        _run(name, model, forget, retain, 100.0, 0)
    units, secs = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            used, wall = _run(name, model, forget, retain, cap, rep)
            units[name] += used
            secs[name] += wall
    gd_rate = units["gd"] / secs["gd"]
    out = {
        n: {
            "units": units[n],
            "wall_s": secs[n],
            "units_per_s": units[n] / secs[n],
            "ratio_to_gd": units[n] / secs[n] / gd_rate,
        }
        for n in names
    }
    print(f"{'method':14s} {'units':>8s} {'wall_s':>7s} {'units/s':>8s} {'vs gd':>6s}")
    for n, r in out.items():
        print(
            f"{n:14s} {r['units']:8.0f} {r['wall_s']:7.2f} {r['units_per_s']:8.0f} "
            f"{r['ratio_to_gd']:6.2f}"
        )
    return out


if __name__ == "__main__":
    main()
