"""The compute budget every unlearner runs under (DESIGN section 3).

Unit: one example's forward+backward pass. A forward-only pass (teacher outputs, Fisher-free
scoring, frozen prefixes run without grad) costs FORWARD_ONLY of a unit. Methods ask the meter
before each batch; it grants as many examples as still fit, so the cap can never be exceeded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

FORWARD_ONLY = 1.0 / 3.0


class Meter:
    """Counts units spent against a fixed cap."""

    def __init__(self, cap: float):
        if cap < 0:
            raise ValueError(f"budget cap must be >= 0, got {cap}")
        self.cap = float(cap)
        self.used = 0.0

    @property
    def left(self) -> float:
        return self.cap - self.used

    def take(self, n: int, cost: float = 1.0) -> int:
        """Grant up to n examples at `cost` units each; charge and return how many were granted."""
        granted = min(n, math.floor(self.left / cost + 1e-9)) if cost > 0 else n
        granted = max(granted, 0)
        self.used += granted * cost
        return granted

    def fraction_used(self) -> float:
        return self.used / self.cap if self.cap else 0.0


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
    """Batches of (x, y) charged to `meter`; the last one is truncated to what the budget allows."""
    for xb, yb in batches(x, y, batch_size, generator):
        granted = meter.take(len(yb), cost)
        if granted == 0:
            return
        yield xb[:granted], yb[:granted]
