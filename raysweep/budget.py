"""The compute budget every unlearner runs under (DESIGN section 3).

Unit: one example's forward+backward pass. A forward-only pass (teacher outputs, Fisher-free
scoring, frozen prefixes run without grad) costs FORWARD_ONLY of a unit. Methods ask the meter
before each batch; it grants as many examples as still fit, so the cap can never be exceeded.

Checkpoints ("anytime budgets"): a meter may also stop at smaller caps on the way. It grants no
example past a checkpoint until the run has been measured there (`at_checkpoint`), so a batch that
straddles one is split, and the state measured is exactly where a run capped at that checkpoint
would have ended; then it grants again, from the same state and the same random stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

FORWARD_ONLY = 1.0 / 3.0


class Meter:
    """Counts units spent against a fixed cap (and stops at `checkpoints`, units below it)."""

    def __init__(
        self,
        cap: float,
        checkpoints: tuple[float, ...] = (),
        at_checkpoint: Callable[[float], None] = lambda units: None,
    ):
        if cap < 0:
            raise ValueError(f"budget cap must be >= 0, got {cap}")
        self.cap = float(cap)
        self.used = 0.0
        self.stops = sorted(float(c) for c in checkpoints if c < cap)
        self.at_checkpoint = at_checkpoint

    @property
    def left(self) -> float:
        return self.cap - self.used

    def take(self, n: int, cost: float = 1.0) -> int:
        """Grant up to n examples at `cost` units each; charge and return how many were granted."""
        while True:
            granted = _fits(n, cost, (self.stops[0] if self.stops else self.cap) - self.used)
            if granted > 0 or not self.stops or n == 0:
                break
            # Nothing more fits before the next checkpoint: a run capped there ends here.
            self.at_checkpoint(self.stops.pop(0))
        self.used += granted * cost
        return granted

    def finish(self) -> None:
        """The run ended: checkpoints it never reached see its final state (it stopped early)."""
        while self.stops:
            self.at_checkpoint(self.stops.pop(0))

    def fraction_used(self) -> float:
        return self.used / self.cap if self.cap else 0.0


def _fits(n: int, cost: float, left: float) -> int:
    """How many of n examples at `cost` units each fit in `left` units."""
    return max(min(n, math.floor(left / cost + 1e-9)), 0) if cost > 0 else n


def flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of `fn()` as torch counts them (matrix products, convolutions):
    run it on meta tensors to count without computing."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def train_cost(epochs: int, n_train: int) -> float:
    """C_train: the units the original training run spent."""
    return float(epochs * n_train)


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled minibatches forever, reshuffled each pass; the meter decides when to stop."""
    if len(y) == 0:
        return
    while True:
        perm = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch_size):
            j = perm[i : i + batch_size].to(y.device)
            yield x[j], y[j]


def metered(
    meter: Meter,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    cost: float = 1.0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (x, y) charged to `meter`; the last one is truncated to what the budget allows,
    and one that straddles a checkpoint is split there into two (both are used)."""
    for xb, yb in batches(x, y, batch_size, generator):
        while len(yb):
            granted = meter.take(len(yb), cost)
            if granted == 0:
                return
            yield xb[:granted], yb[:granted]
            xb, yb = xb[granted:], yb[granted:]
