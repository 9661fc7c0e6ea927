"""Machinery for the optimised poisons in attacks.py: surrogate models, parameter gradients, and
the two inner loops (gradient matching for Witches' Brew, gradient canceling for Lu et al.).

Inputs live in the standardised space of `Split`; a pixel-unit budget eps becomes
eps * (x_max - x_min) there, per channel, because x_max - x_min = 1 / std.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from raysweep.science.data import Split
from raysweep.science.models import MODELS, chunked, seeded, trainable
from raysweep.science.train import augment, train

Grads = tuple[torch.Tensor, ...]
# The image models of MODELS: a surrogate is built with their `width`.
Surrogate = Literal["mlp", "cnn", "resnet18"]


def bounds(split: Split, attack: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid input range (x_min, x_max), each (C, 1, 1)."""
    if split.x_min is None or split.x_max is None:
        raise ValueError(f"{attack}: needs image data with a valid input range (Split.x_min/x_max)")
    return split.x_min, split.x_max


def clamp(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(x, hi), lo)


def surrogate(
    split: Split,
    generator: torch.Generator,
    name: Surrogate,
    *,
    width: int,
    epochs: int,
    lr: float,
    shift: int = 0,
    flip: bool = False,
    extractor: nn.Module | None = None,
) -> nn.Module:
    """A model of the `MODELS` entry `name`, initialised from `generator` and trained on the clean
    train set (with `train`'s shift/flip augmentation if given): the attacker's stand-in for the
    victim (same family, its own weights). Given a frozen `extractor`, the stand-in is a linear
    head on it instead (`name` and `width` unused): the fine-tuning threat model, where the
    attacker knows the extractor and only the head is the victim's own."""
    if extractor is not None:
        x, y, k = split.x_train, split.y_train, split.num_classes
        return head_on(extractor, x, y, k, generator, epochs=epochs, lr=lr, shift=shift, flip=flip)
    if name not in MODELS:
        raise ValueError(f"surrogate: unknown model '{name}'; allowed: {', '.join(sorted(MODELS))}")
    build = lambda: MODELS[name](split.input_shape, split.num_classes, width=width)
    model = seeded(build, generator).to(split.x_train.device)
    kw = {"epochs": epochs, "lr": lr, "shift": shift, "flip": flip}
    return train(model, split.x_train, split.y_train, generator, **kw).eval()


def head_on(
    extractor: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    epochs: int,
    lr: float,
    shift: int = 0,
    flip: bool = False,
) -> nn.Sequential:
    """(extractor, a linear head initialised from `generator`), the head trained on (x, y); the
    extractor (a `Frozen`) is shared, never trained, and `train` passes each row through it once
    when the rows are not augmented."""
    width = chunked(extractor, x[:1]).shape[-1]
    head = seeded(lambda: nn.Linear(width, num_classes), generator).to(x.device)
    kw = {"epochs": epochs, "lr": lr, "shift": shift, "flip": flip}
    return train(nn.Sequential(extractor, head), x, y, generator, **kw).eval()


def param_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False
) -> Grads:
    """grad_theta of the mean cross-entropy on (x, y), theta the trainable parameters (a frozen
    extractor's are constants); differentiable in x if `create_graph`."""
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, trainable(model), create_graph=create_graph)
    return grads if create_graph else tuple(g.detach() for g in grads)


def _dot(a: Grads, b: Grads) -> torch.Tensor:
    return sum((u * v).sum() for u, v in zip(a, b))


def _alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Grads) -> torch.Tensor:
    """1 - cos(grad of the poisons' loss, target gradient), differentiable in x."""
    g = param_grads(model, x, y, create_graph=True)
    norm = _dot(g, g).sqrt() * _dot(target, target).sqrt()
    return 1 - _dot(g, target) / norm


def brew(
    models: list[nn.Module],
    x0: torch.Tensor,
    y: torch.Tensor,
    targets: list[Grads],
    generator: torch.Generator,
    *,
    lo: torch.Tensor,
    hi: torch.Tensor,
    eps: float,
    restarts: int,
    steps: int,
    lr: float,
    shift: int,
    flip: bool,
    batch_size: int,
    resolution: int = 0,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The perturbation (standardised units) of the poisons x0 whose gradients, averaged over
    `models`, best match `targets`; each poison stays within eps of x0 and in [lo, hi].

    Optimised in pixel units by signed Adam (Geiping et al.: the sign makes the step size
    independent of the gradient's scale) with the learning rate cut 10x at 3/8, 5/8 and 7/8 of
    the steps. With `resolution` r > 0 the perturbation is an r x r image upsampled bilinearly:
    a convex combination of values in [-eps, eps], so the bound holds, and smooth. `start` (pixel
    units, in the ball): every restart begins there instead of at a uniform draw.
    """
    for model in models:
        model.eval()  # batch-norm statistics fixed: each poison's gradient is its own
    scale = hi - lo  # standardised units per pixel unit
    size = x0.shape[-2:]
    shape = (*x0.shape[:2], resolution, resolution) if resolution else x0.shape
    up = lambda d: F.interpolate(d, size=size, mode="bilinear") if resolution else d
    poisons = lambda d, i: clamp(x0[i : i + batch_size] + up(d) * scale, lo, hi)
    loss_of = lambda x, i: (
        sum(_alignment(m, x, y[i : i + batch_size], t) for m, t in zip(models, targets))
        / len(models)
    )
    milestones = [round(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    best, best_loss = torch.zeros(shape, device=x0.device), float("inf")
    for _ in range(restarts):
        # Random draws on the CPU generator, then moved: the seed fixes them on any device.
        drawn = eps * (2 * torch.rand(shape, generator=generator) - 1)
        delta = (drawn if start is None else start).to(x0.device).clone().requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=lr * eps)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
        for _ in range(steps):
            grad = torch.zeros(shape, device=x0.device)
            for i in range(0, len(x0), batch_size):
                d = delta[i : i + batch_size]
                xb = augment(poisons(d, i), generator, shift, flip)
                grad[i : i + batch_size] = torch.autograd.grad(loss_of(xb, i), d)[0]
            delta.grad = grad.sign()
            opt.step()
            sched.step()
            with torch.no_grad():
                delta.clamp_(-eps, eps)
        chunks = range(0, len(x0), batch_size)
        loss = sum(loss_of(poisons(delta[i : i + batch_size], i), i).item() for i in chunks)
        if loss < best_loss:
            best, best_loss = delta.detach().clone(), loss
    chunks = range(0, len(x0), batch_size)
    return torch.cat([poisons(best[i : i + batch_size], i) for i in chunks]) - x0


def corrupt(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_check: torch.Tensor,
    y_check: torch.Tensor,
    generator: torch.Generator,
    *,
    target_acc: float,
    step: float,
    max_steps: int,
    batch_size: int,
) -> nn.Module:
    """GradPC-like parameter corruption: normalised gradient *ascent* on the clean loss of
    minibatches of (x, y), each step moving the parameters by `step` times their norm, until the
    accuracy on (x_check, y_check) is at most `target_acc` (or `max_steps` steps). Plain SGD
    ascent accelerates as the loss grows and overshoots any target accuracy; fixed-length steps
    do not."""
    params = trainable(model)
    model.eval()  # batch-norm statistics stay those of the clean model
    for _ in range(max_steps):
        if (chunked(model, x_check).argmax(1) == y_check).float().mean().item() <= target_acc:
            break
        j = torch.randint(len(y), (batch_size,), generator=generator).to(y.device)
        grads = param_grads(model, x[j], y[j])
        size = step * _dot(params, params).sqrt() / _dot(grads, grads).sqrt()
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=float(size))
    return model


def summed_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Grads:
    """grad_theta of the mean cross-entropy over all of (x, y), accumulated chunk by chunk."""
    total = [torch.zeros_like(p) for p in trainable(model)]
    for i in range(0, len(y), batch_size):
        yb = y[i : i + batch_size]
        g = param_grads(model, x[i : i + batch_size], yb)
        total = [t + len(yb) / len(y) * u for t, u in zip(total, g)]
    return tuple(total)


def cancel(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    clean_grad: Grads,
    *,
    eps_d: float,
    lo: torch.Tensor,
    hi: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
) -> torch.Tensor:
    """Poison inputs (labels `y` fixed, start `x0`) minimising 1/2 ||clean_grad + eps_d * grad of
    the poisons' mean loss||^2 at `model` (Lu et al. 2023), by Adam projected to [lo, hi] (per
    channel, or per element: a ball around each poison)."""
    model.eval()
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    n = len(y)
    for _ in range(steps):
        poison_grad = summed_grads(model, x.detach(), y, batch_size)
        residual = [c + eps_d * p for c, p in zip(clean_grad, poison_grad)]
        # d/dx of 1/2 ||residual||^2 is a vector-Jacobian product with the residual held fixed, so
        # it can be taken chunk by chunk and no two chunks' double-backward graphs coexist.
        grad = torch.zeros_like(x0)
        for i in range(0, n, batch_size):
            xc = x[i : i + batch_size].detach().requires_grad_(True)
            g = param_grads(model, xc, y[i : i + batch_size], create_graph=True)
            vjp = eps_d * len(xc) / n * _dot(g, residual)
            grad[i : i + batch_size] = torch.autograd.grad(vjp, xc)[0]
        x.grad = grad
        opt.step()
        with torch.no_grad():
            x.copy_(clamp(x, lo, hi))
    return x.detach()
