"""A linear model's frozen extractor: its own checkpoint, trained once per key on the clean train
set, and loaded into every model that sits on it (`trial.extractor_state` makes or reads it).

Keyed by the data, the extractor's settings and the seed, not by the attack or the head's
training: every spec that shares them shares one extractor, and the attacker who knows it (the
fine-tuning threat model) sees the same weights as the victim.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from raysweep.science.data import Split
from raysweep.science.models import MODELS, Frozen, blocks, extractor_model, seeded
from raysweep.science.train import train

from .spec import Spec

# The linear model's extractor settings and their defaults (models.linear's signature).
DEFAULTS = {
    p.name: p.default
    for p in inspect.signature(MODELS["linear"]).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}


def settings(spec: Spec) -> dict:
    """The extractor's settings as the spec's model section gives them, defaults filled in."""
    return {k: spec.model.get(k, d) for k, d in DEFAULTS.items()}


def config(spec: Spec, split: Split, seed: int) -> dict | None:
    """What determines the extractor's weights (its checkpoint key); None: not a linear model."""
    if spec.model["name"] != "linear":
        return None
    role = {"role": "extractor", "dataset": spec.dataset, "data": split.source}
    return {**role, **settings(spec), "seed": seed}


def fit(spec: Spec, split: Split, init: torch.Generator, stream: torch.Generator, device):
    """Train the extractor's classifier on the clean train set: its own epochs, learning rate and
    optimizer (the spec's train section is how the head learns), train's other defaults."""
    arch = settings(spec)
    names = ("extractor", "width", "depth", "heads")
    build = lambda: extractor_model(split.input_shape, split.num_classes, *(arch[n] for n in names))
    model = seeded(build, init).to(device)
    kw = {"epochs": arch["extractor_epochs"], "lr": arch["extractor_lr"]}
    return train(
        model, split.x_train, split.y_train, stream, **kw, optimizer=arch["extractor_optimizer"]
    )


def frozen(model: nn.Module) -> Frozen | None:
    """A linear model's frozen extractor (its first block); None for every other model."""
    first = blocks(model)[0]
    return first if isinstance(first, Frozen) else None


def load(model: nn.Module, state: dict) -> None:
    """Give a linear model's extractor the checkpoint's weights. The body's keys are the
    extractor classifier's minus its final layer, so every one must be there."""
    body = frozen(model).body
    missing = set(body.state_dict()) - set(state)
    if missing:
        raise ValueError(f"extractor checkpoint lacks {sorted(missing)[:3]}")
    body.load_state_dict({k: v for k, v in state.items() if k in body.state_dict()})
