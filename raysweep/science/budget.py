"""The compute budget every unlearner runs under (docs/design.md §3).

Unit: one example's forward+backward pass through the whole model, as training runs it. A pass
that costs something else (a teacher's forward, a frozen prefix run without grad, training only
the last blocks) is charged what it counts: its FLOPs over a unit's, counted once per model
config on meta tensors (`counted_cost`, `forward_cost`). A fixed 1/3 for a forward would assume
the backward costs two forwards, which no first layer does: it needs no input gradient (the
quickstart MLP's forward is 0.43 of a unit). Methods ask the meter before each batch; it grants
as many examples as still fit, so the cap can never be exceeded.

Stops ("anytime budgets"): a meter may also stop at smaller caps on the way. It grants no
example past a stop until the run has been measured there (`at_stop`), so a batch that
straddles one is split, and the state measured is exactly where a run capped at that stop
would have ended; then it grants again, from the same state and the same random stream.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Hashable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class Meter:
    """Counts units spent against a fixed cap (and is measured at `stops`, units below it)."""

    def __init__(
        self,
        cap: float,
        stops: tuple[float, ...] = (),
        at_stop: Callable[[float], None] = lambda units: None,
    ):
        if cap < 0:
            raise ValueError(f"budget cap must be >= 0, got {cap}")
        self.cap = float(cap)
        self.used = 0.0
        self.stops = sorted(float(c) for c in stops if c < cap)
        self.at_stop = at_stop

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
            self.at_stop(self.stops.pop(0))
        self.used += granted * cost
        return granted

    def finish(self) -> None:
        """The run ended: stops it never reached see its final state (it stopped early)."""
        while self.stops:
            self.at_stop(self.stops.pop(0))

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


def meta_copy(model: nn.Module) -> nn.Module:
    """`model` on the meta device, copied without copying its weights (GPT-2 medium's would
    take 1.4 GB just to be thrown away)."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for p in model.parameters()
    }
    memo |= {id(b): torch.empty_like(b, device="meta") for b in model.buffers()}
    return copy.deepcopy(model, memo)


# A pass prepares on (meta model, 2 rows, 2 labels) and returns the thunk whose FLOPs are counted.
Pass = Callable[[nn.Module, torch.Tensor, torch.Tensor], Callable[[], object]]
_COUNTED: dict[tuple, float] = {}


def counted_cost(model: nn.Module, x: torch.Tensor, name: Hashable, pass_: Pass) -> float:
    """Units one row's `pass_` costs: its FLOPs over one row's forward+backward through the
    whole model in train mode (a unit), both counted on a meta copy (nothing computes).

    Cached per model config and `name`: the model's printed structure, which parameters train,
    and the row's shape and dtype. Two rows, as BatchNorm in train mode needs more than one.
    """
    trains = tuple(p.requires_grad for p in model.parameters())
    key = (repr(model), trains, tuple(x.shape[1:]), x.dtype, name)
    if key not in _COUNTED:
        meta = meta_copy(model).train()
        x2 = torch.empty((2, *x.shape[1:]), dtype=x.dtype, device="meta")
        y2 = torch.zeros(2, dtype=torch.long, device="meta")
        unit = flops(lambda: F.cross_entropy(meta(x2), y2).backward())
        meta.zero_grad(set_to_none=True)
        _COUNTED[key] = flops(pass_(meta, x2, y2)) / unit
    return _COUNTED[key]


def _forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    return torch.no_grad()(lambda: model.eval()(x))


def forward_cost(model: nn.Module, x: torch.Tensor) -> float:
    """Units one row's forward pass without grad costs (a frozen teacher's), for rows like `x`."""
    return counted_cost(model, x, "forward", _forward)


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
    and one that straddles a stop is split there into two (both are used)."""
    for xb, yb in batches(x, y, batch_size, generator):
        while len(yb):
            granted = meter.take(len(yb), cost)
            if granted == 0:
                return
            yield xb[:granted], yb[:granted]
            xb, yb = xb[granted:], yb[granted:]
