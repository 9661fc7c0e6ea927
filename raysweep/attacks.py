"""Poisoning attacks: each entry of ATTACKS maps a clean `Split` to the corrupted train set `Poisoned`.

Every attack has the signature `fn(split, generator, *, <parameters with defaults>) -> Poisoned`;
`generator` is its only source of randomness, so a seed fixes the poisons (and so the checkpoint
key). Attacks that edit pixels keep every input inside the split's valid range [x_min, x_max]
(the image of [0, 1] under the per-channel standardisation). The crafting machinery shared by
gradient_matching and gradient_canceling (surrogate models, parameter gradients) is in crafting.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch

from . import crafting, text
from .data import Split


@dataclass(frozen=True)
class Poisoned:
    """The corrupted train set S_corr and what the attack's metric needs.

    `x`, `y` are S_corr (same length and order as the clean train set); `poison_idx` are the rows
    the attack changed (inputs, labels or both; no other row differs from the clean train set).
    Attack-specific fields, empty for the other attacks:
      - `noise`, `eps`: the Gaussian attack's per-row noise (row i belongs to `poison_idx[i]`) and
        its standard deviation;
      - `y_adv`: the class a targeted or backdoor attack steers inputs into;
      - `target_idx`: rows of the *test* split the targeted attack wants classified as `y_adv`;
      - `trigger`, `trigger_mask`: the backdoor patch, (C, H, W) standardised values and a
        (1, H, W) mask that is 1 where the patch replaces the input (see `triggered`).
      - `trigger_ids`: the text backdoor's trigger token ids (with `y_adv`).
    """

    x: torch.Tensor
    y: torch.Tensor
    poison_idx: torch.Tensor
    noise: torch.Tensor | None = None
    eps: float = 0.0
    y_adv: int | None = None
    target_idx: torch.Tensor | None = None
    trigger: torch.Tensor | None = None
    trigger_mask: torch.Tensor | None = None
    trigger_ids: torch.Tensor | None = None

    def without_poisons(self) -> tuple[torch.Tensor, torch.Tensor]:
        """S_corr minus every poisoned row: what the retrain reference is trained on."""
        keep = torch.ones(len(self.y), dtype=torch.bool, device=self.y.device)
        keep[self.poison_idx] = False
        return self.x[keep], self.y[keep]

    def triggered(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs `x` with the backdoor patch pasted in."""
        return x * (1 - self.trigger_mask) + self.trigger * self.trigger_mask


# Saving and loading, so that crafted poisons are computed once and shared (see trial.py). Only
# the poisoned rows are stored: the rest of S_corr is the clean train set.
_ROWS = ("x", "y")


def to_tensors(poisoned: Poisoned, split: Split) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, scalars) that `from_tensors(split, ...)` turns back into `poisoned`."""
    idx = poisoned.poison_idx
    changed = (poisoned.x != split.x_train).flatten(1).any(1) | (poisoned.y != split.y_train)
    changed[idx] = False
    if changed.any():
        raise ValueError(
            f"attack changed rows outside poison_idx: {changed.nonzero()[:5].tolist()}"
        )
    tensors, scalars = {}, {}
    for f in fields(poisoned):
        value = getattr(poisoned, f.name)
        if f.name in _ROWS:
            tensors[f.name] = value[idx].contiguous()
        elif isinstance(value, torch.Tensor):
            tensors[f.name] = value.contiguous()
        elif value is not None:
            scalars[f.name] = value
    return tensors, scalars


def from_tensors(split: Split, tensors: dict[str, torch.Tensor], scalars: dict) -> Poisoned:
    idx = tensors["poison_idx"]
    x, y = split.x_train.clone(), split.y_train.clone()
    x[idx], y[idx] = tensors["x"], tensors["y"]
    rest = {k: v for k, v in tensors.items() if k not in (*_ROWS, "poison_idx")}
    return Poisoned(x, y, idx, **rest, **scalars)


def _draw(pool: torch.Tensor, n: int, generator: torch.Generator, what: str) -> torch.Tensor:
    """n distinct entries of the index tensor `pool`, sorted."""
    if not 0 < n <= len(pool):
        raise ValueError(f"{what}: n={n} must be in 1..{len(pool)}")
    pick = torch.randperm(len(pool), generator=generator)[:n].to(pool.device)
    return pool[pick].sort().values


def _target_class(split: Split, y_adv: int, generator: torch.Generator, attack: str) -> int:
    """`y_adv` if given (>= 0), else a class drawn uniformly."""
    if y_adv < 0:
        return int(torch.randint(split.num_classes, (1,), generator=generator))
    if y_adv >= split.num_classes:
        raise ValueError(
            f"{attack}: y_adv={y_adv}; allowed: -1 (random) or 0..{split.num_classes - 1}"
        )
    return y_adv


def _flip(y: torch.Tensor, idx: torch.Tensor, num_classes: int, generator) -> torch.Tensor:
    """`y` with the labels at `idx` moved to a class drawn uniformly from the other classes."""
    offset = torch.randint(1, num_classes, (len(idx),), generator=generator).to(y.device)
    y = y.clone()
    y[idx] = (y[idx] + offset) % num_classes
    return y


GcLabels = Literal["keep", "flip"]


def gaussian(
    split: Split, generator: torch.Generator, *, n: int = 60, eps: float = 2.0
) -> Poisoned:
    """Add fixed noise xi_i ~ N(0, eps^2 I) to the inputs of n random train rows, labels kept.

    `eps` is in units of the standardised input (one train-set standard deviation per channel).
    On token ids (text) the noise goes on the model's token embeddings instead: text.gaussian.
    """
    if split.x_train.dtype == torch.long:
        return text.gaussian(split, generator, n=n, eps=eps)
    if not 0 < n <= len(split.y_train):
        raise ValueError(f"gaussian: n={n} must be in 1..{len(split.y_train)}")
    idx = torch.randperm(len(split.y_train), generator=generator)[:n].sort().values
    noise = eps * torch.randn((n, *split.input_shape), generator=generator)
    idx, noise = idx.to(split.x_train.device), noise.to(split.x_train.device)
    x = split.x_train.clone()
    x[idx] += noise
    return Poisoned(x, split.y_train.clone(), idx, noise=noise, eps=eps)


def gradient_matching(
    split: Split,
    generator: torch.Generator,
    *,
    n: int = 50,
    eps: float = 16 / 255,
    n_targets: int = 1,
    y_adv: int = -1,
    restarts: int = 2,
    steps: int = 240,
    lr: float = 0.4,
    shift: int = 2,
    flip: bool = False,
    resolution: int = 0,
    batch_size: int = 128,
    surrogate: str = "cnn",
    surrogate_width: int = 16,
    surrogate_epochs: int = 20,
    surrogate_lr: float = 0.05,
    surrogate_augment: bool = False,
    ensemble: int = 1,
) -> Poisoned:
    """Witches' Brew (Geiping et al. 2021): clean-label poisons whose gradient matches the target's.

    Draws the adversarial class `y_adv` (-1: at random), `n_targets` test rows of other classes,
    and `n` train rows of class `y_adv` as poisons (labels kept). A surrogate the attacker trains
    on the clean train set gives the gradient that would classify the targets as `y_adv`; each
    restart runs `steps` signed-Adam steps on 1 - cos(poison gradient, target gradient) under
    random translations by up to `shift` pixels (and horizontal flips if `flip`; wrong for
    digits), and the restart with the lowest final loss wins. `ensemble` > 1 averages the loss
    over that many independently trained surrogates; `resolution` r > 0 makes the perturbation
    an r x r image upsampled to the input size (smooth, e.g. digits' native 8 x 8).
    `surrogate_augment`: the surrogates train with the same shifts and flips, as Geiping et al.'s
    do when the victim trains with augmentation (the spec's train.shift/flip).

    `eps` is the l-inf bound in pixel units of the [0, 1] image (16/255 is the paper's CIFAR-10
    setting); `lr` is Adam's step as a fraction of `eps`. The surrogate is named here rather than
    taken from the spec's `model` section: the poisons then depend only on the attack's own
    parameters, the threat model (attacker knows the architecture family, not the victim's
    weights) is explicit in the spec, and `raysweep validate` type-checks it.
    """
    lo, hi = crafting.bounds(split, "gradient_matching")
    y_adv = _target_class(split, y_adv, generator, "gradient_matching")
    others = (split.y_test != y_adv).nonzero().flatten()
    target_idx = _draw(others, n_targets, generator, "gradient_matching targets")
    poison_idx = _draw(
        (split.y_train == y_adv).nonzero().flatten(), n, generator, "gradient_matching poisons"
    )
    models = [
        crafting.surrogate(
            split,
            generator,
            surrogate,
            width=surrogate_width,
            epochs=surrogate_epochs,
            lr=surrogate_lr,
            shift=shift if surrogate_augment else 0,
            flip=flip and surrogate_augment,
        )
        for _ in range(ensemble)
    ]
    y_t = torch.full((n_targets,), y_adv, device=split.y_test.device)
    target_grads = [crafting.param_grads(m, split.x_test[target_idx], y_t) for m in models]
    x0 = split.x_train[poison_idx]
    delta = crafting.brew(
        models,
        x0,
        split.y_train[poison_idx],
        target_grads,
        generator,
        lo=lo,
        hi=hi,
        eps=eps,
        restarts=restarts,
        steps=steps,
        lr=lr,
        shift=shift,
        flip=flip,
        batch_size=batch_size,
        resolution=resolution,
    )
    x = split.x_train.clone()
    x[poison_idx] = crafting.clamp(x0 + delta, lo, hi)
    return Poisoned(x, split.y_train.clone(), poison_idx, y_adv=y_adv, target_idx=target_idx)


def gradient_canceling(
    split: Split,
    generator: torch.Generator,
    *,
    n: int = 100,
    target_acc: float = 0.5,
    labels: GcLabels = "keep",
    eps: float = 1.0,
    steps: int = 200,
    lr: float = 0.1,
    batch_size: int = 256,
    surrogate: str = "cnn",
    surrogate_width: int = 16,
    surrogate_epochs: int = 20,
    surrogate_lr: float = 0.05,
    corrupt_step: float = 0.0005,
    corrupt_steps: int = 2000,
) -> Poisoned:
    """Gradient Canceling (Lu et al. 2023): poisons that make a low-accuracy model stationary.

    The target model theta_t is the attacker's clean surrogate corrupted GradPC-style
    (crafting.corrupt: fixed-length gradient-ascent steps on the clean loss until the accuracy
    on up to 2,048 clean train rows is `target_acc`). A corrupted clean model rather than one
    trained on mislabelled data: it stays near a model the victim's training can reach, and its
    accuracy is set directly. Then n random train rows become poisons, optimised by projected
    Adam (`lr` in standardised units) on
    1/2 ||grad L(D_clean; theta_t) + eps_d grad L(D_poison; theta_t)||^2, where
    eps_d = n / (N - n) because the victim's mean loss weighs the two sets that way.

    `labels`: "keep" (clean-label poisons) or "flip" (each poison starts as a label flip to a
    random other class, as model-targeted attacks are often initialised). `eps`: the l-inf bound
    on each poison's change in pixel units of the [0, 1] image; 1.0 leaves the inputs free in the
    valid range (Lu et al.'s setting).
    """
    if labels not in get_args(GcLabels) or not 0 < eps <= 1:
        raise ValueError(
            f"gradient_canceling: labels={labels!r}, eps={eps}; "
            "allowed: labels in ('keep', 'flip'), 0 < eps <= 1"
        )
    lo, hi = crafting.bounds(split, "gradient_canceling")
    rows = torch.arange(len(split.y_train), device=split.y_train.device)
    idx = _draw(rows, n, generator, "gradient_canceling")
    y = split.y_train.clone()
    if labels == "flip":
        y = _flip(y, idx, split.num_classes, generator)
    x0 = split.x_train[idx]
    ball = eps * (hi - lo)  # the l-inf ball, intersected with the valid range
    lo_p, hi_p = torch.maximum(x0 - ball, lo), torch.minimum(x0 + ball, hi)
    clean = torch.ones(len(split.y_train), dtype=torch.bool, device=split.y_train.device)
    clean[idx] = False
    x_c, y_c = split.x_train[clean], split.y_train[clean]
    check = torch.randperm(len(y_c), generator=generator)[:2048].to(y_c.device)
    model = crafting.surrogate(
        split, generator, surrogate, width=surrogate_width, epochs=surrogate_epochs, lr=surrogate_lr
    )
    model = crafting.corrupt(
        model,
        x_c,
        y_c,
        x_c[check],
        y_c[check],
        generator,
        target_acc=target_acc,
        step=corrupt_step,
        max_steps=corrupt_steps,
        batch_size=batch_size,
    )
    x = split.x_train.clone()
    x[idx] = crafting.cancel(
        model,
        x0,
        y[idx],
        crafting.summed_grads(model, x_c, y_c, batch_size),
        eps_d=n / len(y_c),
        lo=lo_p,
        hi=hi_p,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
    )
    return Poisoned(x, y, idx)


def backdoor(
    split: Split, generator: torch.Generator, *, n: int = 50, y_adv: int = 0, patch: int = 3
) -> Poisoned:
    """BadNets-style: paste a `patch` x `patch` black-and-white checkerboard into the bottom-right
    corner of n random train rows not of class `y_adv` (-1: drawn at random), relabel them `y_adv`."""
    lo, hi = crafting.bounds(split, "backdoor")
    y_adv = _target_class(split, y_adv, generator, "backdoor")
    c, h, w = split.input_shape
    if not 0 < patch <= min(h, w):
        raise ValueError(f"backdoor: patch={patch} must be in 1..{min(h, w)}")
    idx = _draw((split.y_train != y_adv).nonzero().flatten(), n, generator, "backdoor")
    mask = torch.zeros(1, h, w, device=lo.device)
    mask[:, h - patch :, w - patch :] = 1.0
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.to(lo.device), cols.to(lo.device)
    white = ((rows + cols) % 2 == 0).float()
    trigger = (lo + (hi - lo) * white) * mask  # (C, H, W): x_max on white squares, x_min on black
    x, y = split.x_train.clone(), split.y_train.clone()
    x[idx] = x[idx] * (1 - mask) + trigger * mask
    y[idx] = y_adv
    return Poisoned(x, y, idx, y_adv=y_adv, trigger=trigger, trigger_mask=mask)


def label_flip(split: Split, generator: torch.Generator, *, n: int = 100) -> Poisoned:
    """Give n random train rows a label drawn uniformly from the other classes (inputs kept)."""
    rows = torch.arange(len(split.y_train), device=split.y_train.device)
    idx = _draw(rows, n, generator, "label_flip")
    y = _flip(split.y_train, idx, split.num_classes, generator)
    return Poisoned(split.x_train.clone(), y, idx)


ATTACKS = {
    "gaussian": gaussian,
    "gradient_matching": gradient_matching,
    "gradient_canceling": gradient_canceling,
    "backdoor": backdoor,
    "label_flip": label_flip,
    "text_backdoor": text.text_backdoor,
}
