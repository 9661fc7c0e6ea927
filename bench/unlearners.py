"""Throughput of every unlearner as a ratio to plain `gd`: budget units spent per wall second.

The budget prices work in units: one example's forward+backward through the whole model, and
any other pass (a frozen teacher's forward, euk/cfk's featurising prefix and last-k-blocks
steps, newton's products) its FLOPs over a unit's, counted per model on meta tensors
(`budget.counted_cost`). FLOPs are not seconds: a method whose passes run at gd's FLOP rate has
a ratio near 1. Above 1, its counted FLOPs run faster than gd's; below 1, its work costs more
wall time than its FLOPs say (ssd: one-row Fisher passes; l1_sparse: a parameter-sized penalty
each step; the counter sees only matrix products and convolutions).

Small CNN on digits-shaped tensors (1x16x16, 10 classes), one thread (one trial per CPU), the
methods interleaved in each repetition so drift on a shared machine hits all of them alike.

    PYTHONPATH=. python -m bench.unlearners
"""

from __future__ import annotations

import copy

import torch

from raysweep.science.budget import Meter
from raysweep.science.models import cnn, seeded
from raysweep.unlearning.unlearners import UNLEARNERS

from .common import interleaved, median

SHAPE, CLASSES = (1, 16, 16), 10


def _data(generator: torch.Generator, n_retain: int = 960, n_forget: int = 60):
    labels = lambda n: torch.randint(0, CLASSES, (n,), generator=generator)
    retain = torch.randn(n_retain, *SHAPE, generator=generator), labels(n_retain)
    forget = 2.0 * torch.randn(n_forget, *SHAPE, generator=generator), labels(n_forget)
    return forget, retain


def main(reps: int = 3, cap: float = 1000.0) -> dict[str, float]:
    """Print a table; return {"<method>_vs_gd": ratio, ...} and gd's units per second."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    base = seeded(lambda: cnn(SHAPE, CLASSES), generator)
    forget, retain = _data(generator)
    units: dict[str, float] = {}

    def run(name: str, budget: float):
        def once():
            meter = Meter(budget)
            UNLEARNERS[name](
                copy.deepcopy(base), forget, retain, meter, torch.Generator().manual_seed(1)
            )
            units[name] = meter.used  # the same every repetition: same data, same seed

        return once

    interleaved({n: run(n, 100.0) for n in UNLEARNERS}, reps=1)  # warm-up, not timed
    times = interleaved({n: run(n, cap) for n in UNLEARNERS}, reps=reps)
    rate = {n: units[n] / median(times[n]) for n in UNLEARNERS}
    print(f"{'method':14s} {'units':>6s} {'median_s':>8s} {'units/s':>8s} {'vs gd':>6s}")
    for n in UNLEARNERS:
        print(
            f"{n:14s} {units[n]:6.0f} {median(times[n]):8.3f} {rate[n]:8.0f} "
            f"{rate[n] / rate['gd']:6.2f}"
        )
    return {"gd_units_per_s": rate["gd"], **{f"{n}_vs_gd": rate[n] / rate["gd"] for n in rate}}


if __name__ == "__main__":
    main()
