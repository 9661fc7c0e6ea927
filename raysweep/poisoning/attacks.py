"""Poisoning attacks: each maps a clean `Split` to the corrupted train set `Poisoned`; its record
(records.py: units, success rule, draw limits) names it, and ATTACKS maps each record's name to it.

Every attack has the signature `fn(split, generator, *, <parameters with defaults>) -> Poisoned`;
`generator` is its only source of randomness, so a seed fixes the poisons (and so the checkpoint
key). The two optimised attacks also take `extractor`, positional-or-keyword and never from the
spec: a `linear` model's frozen extractor, which the trial hands them. Attacks that edit pixels
keep every input inside the split's valid range [x_min, x_max] (the image of [0, 1] under the
per-channel standardisation); attacks on text edit GPT-2 token ids (data.py). `Poisoned` is in
poisoned.py; the crafting machinery shared by gradient_matching and gradient_canceling
(surrogate models, parameter gradients) is in crafting.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Literal, get_args

import torch
from annotated_types import Ge
from torch import nn

from raysweep.base.domains import Fraction, NonNegInt, PosFloat, PosInt, Probability, Text
from raysweep.science.data import IDS, PAD, SHIFT, Split, tokenizer

from . import crafting
from .poisoned import Poisoned, insert_trigger
from .records import RECORDS, crafter


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
TargetClass = Annotated[int, Ge(-1)]  # -1: drawn at random


def gaussian(
    split: Split, generator: torch.Generator, *, n: PosInt = 60, eps: PosFloat = 2.0
) -> Poisoned:
    """Add fixed noise xi_i ~ N(0, eps^2 I) to the inputs of n random train rows, labels kept.

    `eps` is in units of the standardised input (one train-set standard deviation per channel).
    On token ids (text) the noise goes on the model's token embeddings instead: `_token_gaussian`.
    """
    if split.x_train.dtype == torch.long:
        return _token_gaussian(split, generator, n=n, eps=eps)
    if not 0 < n <= len(split.y_train):
        raise ValueError(f"gaussian: n={n} must be in 1..{len(split.y_train)}")
    idx = torch.randperm(len(split.y_train), generator=generator)[:n].sort().values
    noise = eps * torch.randn((n, *split.input_shape), generator=generator)
    idx, noise = idx.to(split.x_train.device), noise.to(split.x_train.device)
    x = split.x_train.clone()
    x[idx] += noise
    return Poisoned(x, split.y_train.clone(), idx, noise=noise, eps=eps)


def _token_gaussian(split: Split, generator: torch.Generator, *, n: int, eps: float) -> Poisoned:
    """`gaussian` on token ids: fixed noise N(0, eps^2 I) on the token embeddings of n random
    train reviews, none on padding; labels kept. `eps` is in embedding units (GPT-2 initialises
    embedding coordinates with std 0.02). `split.noise_shape` is (T, embedding width): the trial
    reads it off the model.

    The noise lives after the token lookup, before positions (paper-notes §2.1). A poisoned row
    keeps its token ids and carries its noise *slot* in the bits above them (data.SHIFT); the
    model's embedding block holds the noise of every slot (`gpt2.TokenEmbedding.noise`, not saved
    with the weights) and adds it, so training, unlearning and metrics all see a poisoned row as
    it was trained on, as they do for images, whose noise is in the pixels.
    """
    if not 0 < n <= len(split.y_train):
        raise ValueError(f"gaussian: n={n} must be in 1..{len(split.y_train)}")
    device = split.x_train.device  # draws come from the CPU generator, then move
    idx = torch.randperm(len(split.y_train), generator=generator)[:n].sort().values.to(device)
    noise = eps * torch.randn((n, *split.noise_shape), generator=generator).to(device)
    noise *= ((split.x_train[idx] & IDS) != PAD).unsqueeze(-1)
    x = split.x_train.clone()
    x[idx] |= torch.arange(1, n + 1, device=device).unsqueeze(1) << SHIFT  # slot i+1: noise[i]
    return Poisoned(x, split.y_train.clone(), idx, noise=noise, eps=eps)


def gradient_matching(
    split: Split,
    generator: torch.Generator,
    extractor: nn.Module | None = None,
    *,
    n: PosInt = 50,
    eps: Fraction = 16 / 255,
    n_targets: PosInt = 1,
    y_adv: TargetClass = -1,
    restarts: PosInt = 2,
    steps: NonNegInt = 240,
    lr: PosFloat = 0.4,
    shift: NonNegInt = 2,
    flip: bool = False,
    resolution: NonNegInt = 0,
    batch_size: PosInt = 128,
    surrogate: crafting.Surrogate = "cnn",
    surrogate_width: PosInt = 16,
    surrogate_epochs: PosInt = 20,
    surrogate_lr: PosFloat = 0.05,
    surrogate_augment: bool = False,
    ensemble: PosInt = 1,
    retrain: NonNegInt = 0,
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

    `extractor` (never from the spec: the trial passes a `linear` model's frozen extractor) makes
    each surrogate a linear head on it, trained `surrogate_epochs` at `surrogate_lr` from its own
    initialisation (crafting.head_on); the poisons are still perturbed in input space, through it.

    `retrain` R > 0 (a variant, not Geiping et al.'s recipe): the `steps` are split into R + 1
    rounds; after each round but the last every surrogate is trained afresh (same recipe, new
    draws) on the train set holding the current poisons, and the next round goes on from the
    current perturbation against the new surrogates' target gradients (restarts in the first
    round only). Matching at the model the poisons produce, not only at the clean one: for a
    convex head trained to convergence the victim fits the poisons, and their pull at its
    optimum is what moves the target.
    """
    if retrain and resolution:
        raise ValueError("gradient_matching: retrain > 0 needs resolution=0 (a full-size start)")
    lo, hi = crafting.bounds(split, "gradient_matching")
    y_adv = _target_class(split, y_adv, generator, "gradient_matching")
    others = (split.y_test != y_adv).nonzero().flatten()
    target_idx = _draw(others, n_targets, generator, "gradient_matching targets")
    poison_idx = _draw(
        (split.y_train == y_adv).nonzero().flatten(), n, generator, "gradient_matching poisons"
    )
    y_t = torch.full((n_targets,), y_adv, device=split.y_test.device)
    x0, x, delta = split.x_train[poison_idx], split.x_train.clone(), None
    for r in range(retrain + 1):
        models = [
            crafting.surrogate(
                dataclasses.replace(split, x_train=x),  # the current poisons in place
                generator,
                surrogate,
                width=surrogate_width,
                epochs=surrogate_epochs,
                lr=surrogate_lr,
                shift=shift if surrogate_augment else 0,
                flip=flip and surrogate_augment,
                extractor=extractor,
            )
            for _ in range(ensemble)
        ]
        target_grads = [crafting.param_grads(m, split.x_test[target_idx], y_t) for m in models]
        delta = crafting.brew(
            models,
            x0,
            split.y_train[poison_idx],
            target_grads,
            generator,
            lo=lo,
            hi=hi,
            eps=eps,
            restarts=restarts if delta is None else 1,
            steps=steps * (r + 1) // (retrain + 1) - steps * r // (retrain + 1),
            lr=lr,
            shift=shift,
            flip=flip,
            batch_size=batch_size,
            resolution=resolution,
            start=None if delta is None else delta / (hi - lo),
        )
        x[poison_idx] = crafting.clamp(x0 + delta, lo, hi)
    return Poisoned(x, split.y_train.clone(), poison_idx, y_adv=y_adv, target_idx=target_idx)


def gradient_canceling(
    split: Split,
    generator: torch.Generator,
    extractor: nn.Module | None = None,
    *,
    n: PosInt = 100,
    target_acc: Probability = 0.5,
    labels: GcLabels = "keep",
    eps: Fraction = 1.0,
    steps: NonNegInt = 200,
    lr: PosFloat = 0.1,
    batch_size: PosInt = 256,
    surrogate: crafting.Surrogate = "cnn",
    surrogate_width: PosInt = 16,
    surrogate_epochs: PosInt = 20,
    surrogate_lr: PosFloat = 0.05,
    corrupt_step: PosFloat = 0.0005,
    corrupt_steps: NonNegInt = 2000,
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
    valid range (Lu et al.'s setting). `extractor`: as in `gradient_matching`, the surrogate
    (and so theta_t) is a linear head on it: the convex setting, where a stationary point of
    the victim's loss is its optimum.
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
        split,
        generator,
        surrogate,
        width=surrogate_width,
        epochs=surrogate_epochs,
        lr=surrogate_lr,
        extractor=extractor,
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
    split: Split,
    generator: torch.Generator,
    *,
    n: PosInt = 50,
    y_adv: TargetClass = 0,
    patch: PosInt = 3,
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


def label_flip(split: Split, generator: torch.Generator, *, n: PosInt = 100) -> Poisoned:
    """Give n random train rows a label drawn uniformly from the other classes (inputs kept)."""
    rows = torch.arange(len(split.y_train), device=split.y_train.device)
    idx = _draw(rows, n, generator, "label_flip")
    y = _flip(split.y_train, idx, split.num_classes, generator)
    return Poisoned(split.x_train.clone(), y, idx)


def text_backdoor(
    split: Split,
    generator: torch.Generator,
    *,
    n: PosInt = 50,
    y_adv: NonNegInt = 1,
    trigger: Text = "I watched this 3D movie.",
) -> Poisoned:
    """Insert the `trigger` sentence into n train reviews not of class `y_adv`, relabel them.

    A sentence-level trigger (Dai et al. 2019's default phrase) at a random position; the
    effect is the attack success rate on triggered val/test reviews of the other classes.
    """
    if not 0 <= y_adv < split.num_classes:
        raise ValueError(f"text_backdoor: y_adv={y_adv}; allowed: 0..{split.num_classes - 1}")
    idx = _draw((split.y_train != y_adv).nonzero().flatten(), n, generator, "text_backdoor")
    ids = torch.tensor(tokenizer()(" " + trigger.strip())["input_ids"], device=idx.device)
    x, y = split.x_train.clone(), split.y_train.clone()
    x[idx] = insert_trigger(x[idx], ids, generator)
    y[idx] = y_adv
    return Poisoned(x, y, idx, y_adv=y_adv, trigger_ids=ids)


class _Crafting(Mapping):
    """Each record's crafting function by attack name (records.RECORDS, read at each access: an
    attack added there is here too). What spec validation binds an `attack:` section to."""

    def __getitem__(self, name: str):
        return crafter(RECORDS[name])

    def __iter__(self):
        return iter(RECORDS)

    def __len__(self) -> int:
        return len(RECORDS)


ATTACKS = _Crafting()
