"""Datasets as tensors: each entry of DATASETS returns a standardised, deterministically split `Split`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .text import imdb, synthetic_imdb  # text: GPT-2 token ids, see text.py


@dataclass(frozen=True)
class Split:
    """Train/val/test tensors; images are float32 (N, C, H, W) standardised per channel on train.

    `x_min`, `x_max` (shape (C, 1, 1)) are the valid input range: the image of pixel values 0
    and 1 under the standardisation. Attacks that edit pixels clamp to it.
    Text is long (N, T): GPT-2 token ids, right-padded (text.py). `noise_shape` is the shape of
    one row where the Gaussian attack's noise lives, which the model decides
    (models.noise_shape: the input itself for images, the token embeddings for text); the trial
    fills it in, None until then. `source` is the `digest` of the raw data the split was made
    from: checkpoint and poison keys include it.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    x_min: torch.Tensor | None = None
    x_max: torch.Tensor | None = None
    noise_shape: tuple[int, ...] | None = None
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def digest(*arrays) -> str:
    """sha256 of raw arrays (pixels as integers, token ids, labels): what a split was made from.

    Keys of checkpoints and poisons include it, so a changed data file never reuses weights or
    poisons made from other data. Raw values, not the standardised floats: their last bits can
    differ between thread counts and CPUs, which would split one key into several.
    """
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int):
    """A fixed permutation of range(n) cut into train/val/test; depends only on (n, fractions, seed)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def _standardise(x_train, *others):
    # Per-channel statistics from train only, so val/test never leak into preprocessing.
    dims = (0, 2, 3)
    mean, std = x_train.mean(dims, keepdim=True), x_train.std(dims, keepdim=True).clamp_min(1e-6)
    return [(x - mean) / std for x in (x_train, *others)]


def _make_split(x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes, source: str) -> Split:
    # Standardising an all-0 and an all-1 image gives the per-channel bounds of valid inputs.
    black, white = torch.zeros_like(x_tr[:1]), torch.ones_like(x_tr[:1])
    x_tr, x_va, x_te, lo, hi = _standardise(x_tr, x_va, x_te, black, white)
    bounds = lo[0, :, :1, :1], hi[0, :, :1, :1]
    return Split(x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes, *bounds, source=source)


def digits(
    *, size: int = 32, val_fraction: float = 0.2, test_fraction: float = 0.2, split_seed: int = 0
) -> Split:
    """scikit-learn's 8x8 digits (1,797 images, offline), bilinearly upsampled to size x size."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(bunch.target, dtype=torch.long)
    tr, va, te = split_indices(len(y), val_fraction, test_fraction, split_seed)
    source = digest(bunch.images.astype(np.uint8), bunch.target)  # pixel values are 0..16
    return _make_split(x[tr], y[tr], x[va], y[va], x[te], y[te], num_classes=10, source=source)


def _cifar_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.asarray(dataset.data)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.tensor(dataset.targets, dtype=torch.long)


def cifar10(
    *,
    root: str = "~/data/cifar10",
    val_fraction: float = 0.1,
    n_train: int | None = None,
    split_seed: int = 0,
) -> Split:
    """CIFAR-10 from torchvision's on-disk format under `root` (never downloads); val cut from train."""
    from torchvision.datasets import CIFAR10

    root = str(Path(root).expanduser())
    train, test = (CIFAR10(root, train=t, download=False) for t in (True, False))
    (x, y), (x_te, y_te) = _cifar_tensors(train), _cifar_tensors(test)
    source = digest(train.data, train.targets, test.data, test.targets)
    tr, va, _ = split_indices(len(y), val_fraction, 0.0, split_seed)
    if n_train is not None:
        tr = tr[:n_train]
    return _make_split(x[tr], y[tr], x[va], y[va], x_te, y_te, num_classes=10, source=source)


DATASETS = {
    "digits": digits,
    "cifar10": cifar10,
    "imdb": imdb,
    "synthetic_imdb": synthetic_imdb,
}
