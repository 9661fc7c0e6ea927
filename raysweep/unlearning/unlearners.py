"""Unlearners: each entry of UNLEARNERS edits a model in place under a budget `Meter`.

Every unlearner has the signature

    fn(model, forget, retain, meter, generator, *, <hyperparameters with defaults>) -> None

where `forget` and `retain` are `(x, y)` tensor pairs (S_f and S_r), `meter` caps the compute
(see budget.py) and `generator` is the only source of randomness. Adding a method = one function
here and one line in UNLEARNERS; the contract tests in tests/test_unlearners.py pick it up.

Every pass is paid for before it runs (docs/design.md §3): a student forward+backward is 1 unit
per example, a frozen teacher's forward `budget.forward_cost` (its counted FLOPs over a unit's),
EUk/CFk's frozen prefix and last-k-blocks passes their own counted costs (`steps.last_costs`),
a per-example gradient (SSD's Fisher, SalUn's saliency) 1. One-off passes that the budget cannot
afford in full run on a random subsample of what it can (tests/test_flops.py counts them all).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from raysweep.base.domains import (
    Fraction,
    Momentum,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Probability,
)
from raysweep.science.budget import Meter, forward_cost, metered
from raysweep.science.models import trainable

from . import newton
from .steps import (
    Pair,
    descend,
    fisher,
    frozen,
    kl,
    one_epoch,
    reinit,
    relabel,
    running_stats_kept,
    saliency_masks,
    scrub_max_step,
    scrub_min_step,
    sgd,
    split_last,
    step,
    subset,
    train_last,
)


def taught(model: nn.Module, x: torch.Tensor) -> float:
    """Units of one row like `x` through the student (forward+backward) and one frozen teacher
    (forward, its counted cost)."""
    return 1.0 + forward_cost(model, x)


# --- retain-set descent and forget-set ascent (the paper's GD, NGD, GA) -------------------------


def gd(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 1e-3,
    batch_size: PosInt = 64,
    momentum: Momentum = 0.9,
    weight_decay: NonNegFloat = 5e-4,
) -> None:
    """Keep training on the retain set (Neel et al. 2021) until the budget is spent."""
    opt = sgd(trainable(model), lr, momentum, weight_decay)
    descend(model, opt, metered(meter, *retain, batch_size, generator))


def ngd(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 1e-3,
    sigma2: NonNegFloat = 1e-6,
    batch_size: PosInt = 64,
    momentum: Momentum = 0.9,
    weight_decay: NonNegFloat = 5e-4,
) -> None:
    """GD on the retain set, adding N(0, sigma2 I) to every parameter after each step."""
    params = trainable(model)
    opt = sgd(params, lr, momentum, weight_decay)
    std = sigma2**0.5

    @torch.no_grad()
    def add_noise():
        for p in params:
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            p.add_(noise.to(p.device), alpha=std)

    descend(model, opt, metered(meter, *retain, batch_size, generator), after_step=add_noise)


def ga(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 1e-5,
    steps: PosInt = 100,
    batch_size: PosInt = 64,
) -> None:
    """Gradient ascent on the forget set for at most `steps` steps (Graves et al. 2021)."""
    opt = sgd(trainable(model), lr, 0.0, 0.0)
    batches = metered(meter, *forget, batch_size, generator)
    # range first: zip stops on it without drawing (and paying for) one batch too many.
    descend(model, opt, (b for _, b in zip(range(steps), batches)), sign=-1.0, forget_only=True)


# --- the last K blocks (Goel et al. 2022) -------------------------------------------------------


def euk(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 1e-3,
    k: PosInt = 3,
    batch_size: PosInt = 64,
    momentum: Momentum = 0.9,
    weight_decay: NonNegFloat = 5e-4,
) -> None:
    """Exact unlearning of the last k blocks: re-initialise them, train only them on S_r."""
    reinit(split_last(model, k)[1], generator)
    train_last(model, k, retain, meter, generator, lr, batch_size, momentum, weight_decay)


def cfk(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 1e-3,
    k: PosInt = 3,
    batch_size: PosInt = 64,
    momentum: Momentum = 0.9,
    weight_decay: NonNegFloat = 5e-4,
) -> None:
    """Catastrophic forgetting of the last k blocks: fine-tune only them on S_r."""
    train_last(model, k, retain, meter, generator, lr, batch_size, momentum, weight_decay)


# --- distillation from the original model (SCRUB, Bad Teacher) ----------------------------------


def scrub(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 5e-4,
    alpha: NonNegFloat = 1e-3,
    gamma: NonNegFloat = 0.99,
    max_epochs: NonNegInt = 2,
    temperature: PosFloat = 4.0,
    batch_size: PosInt = 64,
    momentum: Momentum = 0.9,
    weight_decay: NonNegFloat = 5e-4,
) -> None:
    """SCRUB (Kurmanji et al. 2023): each epoch a max pass over S_f, then a min pass over S_r.

    `max_epochs` is the original's `msteps`: epochs after it are min-only. The teacher is the
    model as given; each step pays its forward as well as the student's forward+backward.
    """
    teacher, opt = frozen(model), sgd(trainable(model), lr, momentum, weight_decay)
    cost = taught(model, retain[0])
    model.train()
    for epoch in itertools.count():
        if epoch < max_epochs:
            for xb, _ in one_epoch(meter, *forget, batch_size, generator, cost):
                scrub_max_step(model, teacher, xb, opt, temperature)
        steps = 0
        for xb, yb in one_epoch(meter, *retain, batch_size, generator, cost):
            scrub_min_step(model, teacher, xb, yb, opt, alpha, gamma, temperature)
            steps += 1
        if steps == 0:  # the budget is spent (or S_r is empty)
            return


def bad_teacher(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 1e-3,
    temperature: PosFloat = 1.0,
    retain_fraction: Fraction = 0.3,
    batch_size: PosInt = 64,
    momentum: Momentum = 0.9,
    weight_decay: NonNegFloat = 5e-4,
) -> None:
    """Bad Teacher (Chundawat et al. 2023): on S_f imitate a randomly initialised copy of the
    model, on a random `retain_fraction` of S_r imitate the original. Each row pays one teacher.
    """
    good, bad = frozen(model), frozen(model)
    reinit(bad, generator)
    (xf, _), (xr, _) = forget, retain
    keep = torch.randperm(len(xr), generator=generator)[: max(1, round(retain_fraction * len(xr)))]
    x = torch.cat([xf, xr[keep.to(xr.device)]])
    is_forget = torch.arange(len(x), device=x.device) < len(xf)
    opt = sgd(trainable(model), lr, momentum, weight_decay)
    model.train()
    for xb, fb in metered(meter, x, is_forget, batch_size, generator, taught(model, x)):
        x_keep, x_forget = xb[~fb], xb[fb]
        with torch.no_grad():
            target = torch.cat([good(x_keep), bad(x_forget)])
        step(opt, kl(model(torch.cat([x_keep, x_forget])), target, temperature))


# --- two-sided objectives and random labels (NegGrad+, RL, SalUn, l1-sparse) --------------------


def neggrad_plus(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 1e-3,
    beta: Probability = 0.99,
    batch_size: PosInt = 64,
    momentum: Momentum = 0.9,
    weight_decay: NonNegFloat = 5e-4,
) -> None:
    """NegGrad+ (Kurmanji et al. 2023): minimise beta * L(S_r) - (1 - beta) * L(S_f) per step."""
    opt = sgd(trainable(model), lr, momentum, weight_decay)
    model.train()
    # Both batches are paid for. zip draws the retain batch first, so if the budget ends on the
    # forget batch, one retain batch is paid and unused: an overcharge, never an undercharge.
    retain_batches = metered(meter, *retain, batch_size, generator)
    forget_batches = metered(meter, *forget, batch_size, generator)
    for (xr, yr), (xf, yf) in zip(retain_batches, forget_batches):
        loss_r = F.cross_entropy(model(xr), yr)
        with running_stats_kept(model):
            loss_f = F.cross_entropy(model(xf), yf)
        step(opt, beta * loss_r - (1.0 - beta) * loss_f)


def random_label(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 1e-3,
    batch_size: PosInt = 64,
    momentum: Momentum = 0.9,
    weight_decay: NonNegFloat = 5e-4,
) -> None:
    """Random labels (the RL baseline of Fan et al. 2024): train on S_f relabelled at random, with S_r."""
    opt = sgd(trainable(model), lr, momentum, weight_decay)
    x, y = relabel(forget, retain, generator)
    descend(model, opt, metered(meter, x, y, batch_size, generator))


def salun(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 1e-3,
    saliency: Fraction = 0.5,
    batch_size: PosInt = 64,
    momentum: Momentum = 0.9,
    weight_decay: NonNegFloat = 5e-4,
) -> None:
    """SalUn (Fan et al. 2024): random-label training that moves only the salient weights."""
    masks = saliency_masks(model, forget, meter, generator, saliency)
    if masks is None:
        return
    params = trainable(model)

    @torch.no_grad()
    def mask_update():
        # Weight decay goes through the mask too, so non-salient weights stay exactly as they were.
        for p, m in zip(params, masks):
            p.grad.add_(p, alpha=weight_decay).mul_(m)

    opt = sgd(params, lr, momentum, 0.0)
    x, y = relabel(forget, retain, generator)
    descend(model, opt, metered(meter, x, y, batch_size, generator), before_step=mask_update)


def l1_sparse(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    lr: PosFloat = 1e-2,
    alpha: NonNegFloat = 5e-5,
    batch_size: PosInt = 64,
    momentum: Momentum = 0.9,
    weight_decay: NonNegFloat = 5e-4,
) -> None:
    """l1-sparse unlearning (Jia et al. 2023): GD on S_r plus alpha_t * ||theta||_1, with alpha_t
    decaying linearly to 0 over the steps the budget allows."""
    params = trainable(model)
    opt = sgd(params, lr, momentum, weight_decay)
    planned = max(1, math.ceil(meter.left / batch_size))
    model.train()
    for t, (xb, yb) in enumerate(metered(meter, *retain, batch_size, generator)):
        l1 = sum(p.abs().sum() for p in params)
        step(opt, F.cross_entropy(model(xb), yb) + alpha * (1.0 - t / planned) * l1)


# --- Selective Synaptic Dampening (Foster et al. 2024) ------------------------------------------


def ssd(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    alpha: NonNegFloat = 10.0,
    lam: NonNegFloat = 1.0,
) -> None:
    """SSD: where I_F > alpha * I_D, scale theta by min(lam * I_D / I_F, 1); no training.

    I_F, I_D are diagonal Fishers (mean squared per-example gradients, 1 unit per row) on S_f and
    on the whole training set D = S_f + S_r, whose forget part reuses I_F. If the budget cannot
    pay for every row, S_f gets at most half of it and S_r the rest, each a random subsample.
    """
    n_f, n_r = len(forget[1]), len(retain[1])
    xf, yf = subset(meter, *forget, generator, 1.0, math.floor(meter.left / 2))
    xr, yr = subset(meter, *retain, generator, 1.0, math.floor(meter.left))
    if len(yf) == 0 or len(yr) == 0:
        return
    fisher_f, fisher_r = fisher(model, xf, yf), fisher(model, xr, yr)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in fisher_f:  # frozen: no Fisher, never dampened
                continue
            i_f = fisher_f[name] / len(yf)
            i_d = (n_f * i_f + n_r * fisher_r[name] / len(yr)) / (n_f + n_r)
            dampen = i_f > alpha * i_d  # implies i_f > 0: the division below is safe
            p[dampen] *= (lam * i_d[dampen] / i_f[dampen]).clamp(max=1.0)


# Methods whose run at a smaller budget is not the prefix of their run at a larger one: one-off
# passes sized to the budget (euk/cfk featurise, ssd/salun score a subsample of what it affords)
# or a schedule over the total (l1_sparse). Each budget is a run of its own; every other method
# runs once to its largest budget and is measured on the way (budget.Meter's stops).
PER_BUDGET = frozenset({"euk", "cfk", "ssd", "salun", "l1_sparse", "newton"})

UNLEARNERS = {
    "gd": gd,
    "ngd": ngd,
    "ga": ga,
    "euk": euk,
    "cfk": cfk,
    "scrub": scrub,
    "neggrad_plus": neggrad_plus,
    "ssd": ssd,
    "salun": salun,
    "l1_sparse": l1_sparse,
    "bad_teacher": bad_teacher,
    "random_label": random_label,
    "newton": newton.newton,
}
