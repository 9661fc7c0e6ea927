"""How much memory one trial holds, counted from the spec alone: shapes on the meta device,
nothing allocated, no data file opened.

`trial(spec)` returns a `Footprint` (bytes by part, and the peak); `shape(spec)` the dataset's
rows as a trial holds them. `raysweep validate` refuses a peak no machine has (spec.py), the
driver one that this machine or no node of the cluster has (preflight.py), and a cost planner
can read the parts.

    >>> fp = trial(load("search_spaces/quickstart.yaml"))
    >>> fp.params, fp.peak          # bytes
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from raysweep.base.config import Resources, Train
from raysweep.poisoning.attacks import ATTACKS
from raysweep.science.data import DATASETS, split_indices
from raysweep.science.models import MODELS, Frozen, noise_shape, trainable

# ---------------------------------------------------------------- the dataset's rows


@dataclass(frozen=True)
class Shape:
    """A dataset's rows as a trial holds them: rows per split, one row's shape and dtype."""

    n_train: int
    n_val: int
    n_test: int
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    num_classes: int

    @property
    def rows(self) -> int:
        return self.n_train + self.n_val + self.n_test


def _digits(*, size, val_fraction, test_fraction, split_seed, **_) -> Shape:
    # scikit-learn's digits: 1,797 images (data.digits splits all of them).
    tr, va, te = split_indices(1797, val_fraction, test_fraction, split_seed)
    return Shape(len(tr), len(va), len(te), (1, size, size), torch.float32, 10)


def _cifar10(*, val_fraction, n_train, split_seed, **_) -> Shape:
    # CIFAR-10: 50,000 train and 10,000 test images of 3x32x32; val is cut from train.
    tr, va, _ = split_indices(50_000, val_fraction, 0.0, split_seed)
    return Shape(len(tr[:n_train]), len(va), 10_000, (3, 32, 32), torch.float32, 10)


def _imdb(*, max_len, n_train, n_test, val_fraction, split_seed, **_) -> Shape:
    # IMDb: 25,000 train and 25,000 test reviews, as max_len GPT-2 token ids (long).
    tr, va, _ = split_indices(25_000, val_fraction, 0.0, split_seed)
    test = 25_000 if n_test is None else min(n_test, 25_000)
    return Shape(len(tr[:n_train]), len(va), test, (max_len,), torch.long, 2)


def _synthetic_imdb(*, n_train, n_test, max_len, val_fraction, split_seed, **_) -> Shape:
    tr, va, _ = split_indices(n_train, val_fraction, 0.0, split_seed)
    return Shape(len(tr), len(va), n_test, (max_len,), torch.long, 2)


# The counts data.py's loaders produce, without loading: the published sizes of the datasets
# read from files, the spec's own counts for the generated ones, and data.split_indices' cut.
SHAPES: dict[str, Callable[..., Shape]] = {
    "digits": _digits,
    "cifar10": _cifar10,
    "imdb": _imdb,
    "synthetic_imdb": _synthetic_imdb,
}


class Sections(Protocol):
    """What `trial` reads of a spec: a `Spec`, or anything with its validated sections."""

    dataset: Mapping
    model: Mapping
    attack: Mapping
    train: Train
    resources: Resources


class Uncountable(ValueError):
    """A model with more modules than can be counted in seconds (`MAX_MODULES`)."""


def bound(fn: Callable, section: Mapping) -> dict:
    """A spec section's values bound to the function it configures, its defaults filled in."""
    kwargs = {k: v for k, v in section.items() if k != "name"}
    arguments = inspect.signature(fn).bind_partial(**kwargs)
    arguments.apply_defaults()
    return dict(arguments.arguments)


def shape(spec: Sections) -> Shape:
    """The dataset's rows per split, one row's shape, dtype and classes; nothing is loaded."""
    name = spec.dataset["name"]
    return SHAPES[name](**bound(DATASETS[name], spec.dataset))


# ---------------------------------------------------------------- the model

# Submodules a model may have for its size to be counted: building one on the meta device costs
# about 100 us per module on a busy 2-core machine, so this is about 2 s. The largest model
# here, gpt2-medium, has about 300.
MAX_MODULES = 20_000


@contextlib.contextmanager
def _at_most(n: int):
    """Raise ValueError once more than `n` submodules were registered (an absurd depth would
    otherwise take hours to build, even on the meta device)."""
    count = 0

    def hook(module, name, submodule):
        nonlocal count
        count += 1
        if count > n:
            raise Uncountable(f"more than {n} modules")

    handle = nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def model(spec: Sections, rows: Shape) -> nn.Module:
    """The spec's model on the meta device: shapes only (a pretrained GPT-2 is built, not read:
    its sizes must match the spec's)."""
    name = spec.model["name"]
    kwargs = {k: v for k, v in spec.model.items() if k not in ("name", "pretrained")}
    with torch.device("meta"), _at_most(MAX_MODULES):
        return MODELS[name](rows.input_shape, rows.num_classes, **kwargs)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_for_backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one training step of `net` on (x, y),
    each storage once and parameters not at all: the activations a step holds at its peak."""
    skip = {p.untyped_storage()._cdata for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            saved[storage._cdata] = storage.nbytes()
        return t

    net.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # as train.train computes its loss
        F.cross_entropy(net(x).float(), y, reduction="sum")
    return sum(saved.values())


# ---------------------------------------------------------------- the trial


@dataclass(frozen=True)
class Footprint:
    """Bytes one trial holds, by part; `peak` is all of them at once, the weights `COPIES` times.

    Activations are counted at train's micro-batch (batch_size / accumulate), as a CPU runs it:
    fp32, attention as a matrix. A GPU trial with precision bf16 counts them at half; its fused
    attention keeps no (T, T) matrix, so for GPT-2 on a GPU `peak` is an upper bound.
    """

    data: int  # clean train/val/test inputs and labels
    poisoned: int  # S_corr's copy of the train rows, its forget/retain split, Gaussian noise
    params: int  # one copy of the model's parameters and buffers
    grads: int  # gradients of the trainable parameters
    optimizer: int  # train's optimizer state: SGD momentum, or AdamW's two moments
    activations: int  # saved for backward by one micro-batch (+ a linear model's features)
    peak: int

    def parts(self) -> dict[str, int]:
        """Each part by name, `peak` left out."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "peak"}


# Weight copies alive at once: the trial's model, the two checkpoints' state dicts that the
# trial's setup keeps (trial.Setup), and a second model while both checkpoints are measured.
COPIES = 4


def trial(spec: Sections) -> Footprint:
    """The memory one trial of `spec` holds at its peak, counted on meta tensors (`Footprint`)."""
    rows = shape(spec)
    row = math.prod(rows.input_shape) * rows.dtype.itemsize
    label = torch.long.itemsize
    data = rows.rows * (row + label)
    net = model(spec, rows)
    params = _nbytes([*net.parameters(), *net.buffers()])
    grads = _nbytes(trainable(net))
    settings = spec.train.kwargs()
    moments = 1 if settings["optimizer"] == "sgd" else 2
    # S_corr is a copy of the train rows, and the forget/retain split another one.
    poisoned = 2 * rows.n_train * (row + label) + _noise(spec, net, rows)
    activations = _activations(net, rows, settings)
    if settings["precision"] == "bf16" and spec.resources.gpu > 0:
        activations //= 2  # train.autocast: bf16 on CUDA only
    parts = (data, poisoned, params, grads, moments * grads, activations)
    peak = sum(parts) + (COPIES - 1) * params
    return Footprint(*parts, peak=peak)


def _noise(spec: Sections, net: nn.Module, rows: Shape) -> int:
    """The Gaussian attack's noise, held twice: the poisons' and the control's (trial.Probe);
    a text model holds a third copy (gpt2.TokenEmbedding.noise)."""
    if spec.attack["name"] != "gaussian":
        return 0
    n = bound(ATTACKS["gaussian"], spec.attack)["n"]
    copies = 3 if rows.dtype == torch.long else 2
    return copies * n * math.prod(noise_shape(net, rows.input_shape)) * torch.float32.itemsize


def _activations(net: nn.Module, rows: Shape, settings: dict) -> int:
    """Saved for backward by one micro-batch, as train.train runs it: a model that starts with
    a frozen extractor trains its head on features computed once for every train row."""
    micro = -(-settings["batch_size"] // settings["accumulate"])
    micro = min(micro, rows.n_train)
    with torch.device("meta"):
        x = torch.zeros(micro, *rows.input_shape, dtype=rows.dtype)
        y = torch.zeros(micro, dtype=torch.long)
        if isinstance(net, nn.Sequential) and isinstance(net[0], Frozen):
            with torch.no_grad():
                features = net[0](x)
            head = net[1:]
            whole = rows.n_train * math.prod(features.shape[1:]) * features.element_size()
            return whole + saved_for_backward(head, features, y)
        return saved_for_backward(net, x, y)


# ---------------------------------------------------------------- reading it


def show(n: float) -> str:
    """Bytes in decimal units, as allocation errors print them: '409.6 GB'."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# Which spec key sets each part: where a user shrinks a trial that is too large.
KEYS = {
    "data": "dataset",
    "poisoned": "dataset",
    "params": "model",
    "grads": "model",
    "optimizer": "model",
    "activations": "train.batch_size",
}


def culprit(spec: Sections, fp: Footprint) -> tuple[str, object, str]:
    """(the spec key whose parts weigh most, its value, the peak and its two largest parts in
    words): what a refusal names."""
    weights = fp.parts() | {"params": COPIES * fp.params}
    by_key: dict[str, int] = {}
    for part, n in weights.items():
        by_key[KEYS[part]] = by_key.get(KEYS[part], 0) + n
    key = max(by_key, key=by_key.get)
    value = spec.train.batch_size if "." in key else dict(getattr(spec, key))
    top = sorted(weights, key=weights.get, reverse=True)[:2]
    named = {"params": f"parameters x{COPIES} copies", "data": "dataset tensors"}
    largest = ", ".join(f"{named.get(p, p)} {show(weights[p])}" for p in top)
    return key, value, f"one trial needs {show(fp.peak)} ({largest})"
