"""Passes shared by the unlearners: optimiser steps, metered epochs, teachers, relabelling.

Everything here takes its randomness from an explicit generator and pays the meter before it
runs, so an unlearner built from these pieces is budget-honest by construction.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from raysweep.science.budget import Meter, counted_cost, metered
from raysweep.science.models import Frozen, blocks, chunked, seeded, trainable

Pair = tuple[torch.Tensor, torch.Tensor]


def sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def step(opt: torch.optim.Optimizer, loss: torch.Tensor, before_step=None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    opt.step()


@contextlib.contextmanager
def running_stats_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in eval mode inside the block, for forward passes over forget rows alone.

    In train mode each such pass would drag the running statistics towards those of S_f (noisy
    or triggered inputs), a change no parameter update makes: it once looked like gradient
    ascent at a near-zero learning rate removing a backdoor. The rest of the model stays in
    train mode.
    """
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def descend(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable[Pair],
    sign: float = 1.0,
    after_step: Callable[[], None] | None = None,
    before_step: Callable[[], None] | None = None,
    forget_only: bool = False,
) -> None:
    """Minimise sign * cross-entropy over `batches` (sign=-1 is gradient ascent). `forget_only`:
    the batches are forget rows alone, so BatchNorm statistics are kept (`running_stats_kept`)."""
    model.train()
    with running_stats_kept(model) if forget_only else contextlib.nullcontext():
        for xb, yb in batches:
            step(opt, sign * F.cross_entropy(model(xb), yb), before_step)
            if after_step is not None:
                after_step()


def one_epoch(meter: Meter, x, y, batch_size: int, generator, cost: float = 1.0) -> Iterator[Pair]:
    """One shuffled pass over (x, y) charged to `meter`; shorter if the budget runs out."""
    steps = -(-len(y) // batch_size)
    # range first: zip stops on it without drawing (and paying for) one batch too many.
    return (b for _, b in zip(range(steps), metered(meter, x, y, batch_size, generator, cost)))


def subset(meter: Meter, x, y, generator, cost: float, limit: int) -> Pair:
    """A random subset of at most `limit` rows of (x, y): as many as `meter` grants at `cost`."""
    granted = meter.take(min(len(y), max(limit, 0)), cost)
    idx = torch.randperm(len(y), generator=generator)[:granted].to(y.device)
    return x[idx], y[idx]


def frozen(model: nn.Module) -> nn.Module:
    """A frozen copy in eval mode: a teacher, whose forward passes cost `budget.forward_cost`."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def reinit(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every layer in `module` as its constructor did, drawing from `generator`."""
    # reset_parameters is torch's protocol for "initialise me" (BatchNorm also resets its stats).
    layers = [m for m in module.modules() if hasattr(m, "reset_parameters")]
    seeded(lambda: [m.reset_parameters() for m in layers], generator)


def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened outputs, times T^2 (Hinton et al. 2015)."""
    t = temperature
    log_s, log_t = F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * t * t


def relabel(forget: Pair, retain: Pair, generator: torch.Generator) -> Pair:
    """S_f with each label replaced by a random *other* class, then S_r unchanged."""
    (xf, yf), (xr, yr) = forget, retain
    classes = int(torch.cat([yf, yr]).max()) + 1  # the labels seen; every class, in practice
    shift = torch.randint(1, classes, yf.shape, generator=generator).to(yf.device)
    return torch.cat([xf, xr]), torch.cat([(yf + shift) % classes, yr])


def features(prefix: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    prefix.eval()  # eval: the frozen blocks' BatchNorm statistics must not move either
    if len(x) == 0:  # the budget could not pay for a single row: nothing will train
        return x
    return chunked(prefix, x, 256)


def saliency_masks(model, forget: Pair, meter: Meter, generator, saliency: float):
    """1 on the `saliency` fraction of weights with the largest |d forget loss / d weight|, else 0.

    One forward+backward per forget row (model in eval mode, as Fan et al. do), on a subsample
    if that would take more than half of what is left; None if not even one row is affordable.
    """
    x, y = subset(meter, *forget, generator, 1.0, math.floor(meter.left / 2))
    if len(y) == 0:
        return None
    params = trainable(model)
    model.eval()
    model.zero_grad(set_to_none=True)
    for i in range(0, len(y), 256):
        F.cross_entropy(model(x[i : i + 256]), y[i : i + 256], reduction="sum").backward()
    score = torch.cat([p.grad.abs().flatten() for p in params])
    model.zero_grad(set_to_none=True)
    mask = torch.zeros_like(score)
    mask[score.topk(round(saliency * len(score))).indices] = 1.0
    return [m.view_as(p) for m, p in zip(mask.split([p.numel() for p in params]), params)]


def fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per parameter, the sum over rows of squared per-example loss gradients (eval mode).

    A plain loop of one-row backward passes: on CPU it beat torch.func.vmap by about 3x here,
    since each row's gradient is as large as the model either way.
    """
    model.eval()
    names, params = zip(*((n, p) for n, p in model.named_parameters() if p.requires_grad))
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t.addcmul_(g, g)
    return dict(zip(names, total))


def scrub_max_step(student, teacher, x, opt, temperature: float) -> None:
    """One SCRUB max step: push the student's outputs on forget rows `x` away from the teacher's."""
    with torch.no_grad():
        target = teacher(x)
    with running_stats_kept(student):
        step(opt, -kl(student(x), target, temperature))


def scrub_min_step(student, teacher, x, y, opt, alpha: float, gamma: float, temperature: float):
    """One SCRUB min step on retain rows: alpha * KL(teacher || student) + gamma * cross-entropy."""
    with torch.no_grad():
        target = teacher(x)
    out = student(x)
    step(opt, alpha * kl(out, target, temperature) + gamma * F.cross_entropy(out, y))


def split_last(model: nn.Module, k: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(frozen prefix, last k blocks); k past the block count means the whole model."""
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1 (blocks counted from the output end)")
    bs = blocks(model)
    # A frozen extractor is never part of the last k: nothing may re-initialise or train it.
    k = min(k, sum(not isinstance(b, Frozen) for b in bs))
    return nn.Sequential(*bs[: len(bs) - k]), nn.Sequential(*bs[len(bs) - k :])


def last_costs(model: nn.Module, k: int, x: torch.Tensor) -> tuple[float, float]:
    """Units of (one row through the frozen prefix without grad, one forward+backward of the last
    k blocks on its features) for `split_last(model, k)`, as `budget.counted_cost` counts them."""

    def featurise(meta, x, y):
        prefix, _ = split_last(meta, k)
        return torch.no_grad()(lambda: prefix.eval()(x))

    def train_suffix(meta, x, y):
        prefix, suffix = split_last(meta, k)
        with torch.no_grad():
            feats = prefix.eval()(x)
        return lambda: F.cross_entropy(suffix(feats), y).backward()

    return (
        counted_cost(model, x, ("prefix", k), featurise),
        counted_cost(model, x, ("suffix", k), train_suffix),
    )


def train_last(model, k: int, retain: Pair, meter: Meter, generator, lr, bs, momentum, wd):
    """Train the last k blocks of `model` on S_r seen through the frozen rest (EUk and CFk).

    The prefix runs once per retain row, without grad; its features are kept, and each pass of
    the last k blocks over them is charged its own forward+backward (`last_costs`), not a whole
    model's. Only as many rows are featurised as the budget can also train on once. The
    features take memory: rows x the prefix's output size.
    """
    prefix, suffix = split_last(model, k)
    featurise, train_suffix = last_costs(model, k, retain[0])
    x, y = subset(
        meter, *retain, generator, featurise, math.floor(meter.left / (featurise + train_suffix))
    )
    feats = features(prefix, x)
    opt = sgd(suffix.parameters(), lr, momentum, wd)
    descend(suffix, opt, metered(meter, feats, y, bs, generator, train_suffix))
