"""Unlearners: each entry of UNLEARNERS edits a model in place under a budget `Meter`.

Every unlearner has the signature

    fn(model, forget, retain, meter, generator, *, <hyperparameters with defaults>) -> None

where `forget` and `retain` are `(x, y)` tensor pairs (S_f and S_r), `meter` caps the compute
(see budget.py) and `generator` is the only source of randomness. Adding a method = one function
here and one line in UNLEARNERS; the contract tests in tests/test_unlearners.py pick it up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .budget import Meter, metered

Pair = tuple[torch.Tensor, torch.Tensor]


def _sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _descend(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable[Pair],
    sign: float = 1.0,
    after_step: Callable[[], None] | None = None,
) -> None:
    """Minimise sign * cross-entropy over `batches` (sign=-1 is gradient ascent)."""
    model.train()
    for xb, yb in batches:
        loss = sign * F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()


def gd(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: float = 1e-3,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> None:
    """Keep training on the retain set (Neel et al. 2021) until the budget is spent."""
    opt = _sgd(model.parameters(), lr, momentum, weight_decay)
    _descend(model, opt, metered(meter, *retain, batch_size, generator))


def ngd(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: float = 1e-3,
    sigma2: float = 1e-6,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> None:
    """GD on the retain set, adding N(0, sigma2 I) to every parameter after each step."""
    params = list(model.parameters())
    opt = _sgd(params, lr, momentum, weight_decay)
    std = sigma2**0.5

    @torch.no_grad()
    def add_noise():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype), alpha=std)

    _descend(model, opt, metered(meter, *retain, batch_size, generator), after_step=add_noise)


def ga(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: float = 1e-5,
    steps: int = 100,
    batch_size: int = 64,
) -> None:
    """Gradient ascent on the forget set for at most `steps` steps (Graves et al. 2021)."""
    opt = _sgd(model.parameters(), lr, 0.0, 0.0)
    batches = metered(meter, *forget, batch_size, generator)
    # range first: zip stops on it without drawing (and paying for) one batch too many.
    _descend(model, opt, (b for _, b in zip(range(steps), batches)), sign=-1.0)


UNLEARNERS = {
    "gd": gd,
    "ngd": ngd,
    "ga": ga,
}
