"""Poisoning attacks: each entry of ATTACKS maps a clean `Split` to the corrupted train set `Poisoned`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import text
from .data import Split


@dataclass(frozen=True)
class Poisoned:
    """The corrupted train set S_corr and what the attack's metric needs.

    `x`, `y` are S_corr (same length and order as the clean train set); `poison_idx` are the rows
    the attack changed. `noise` holds the Gaussian attack's per-row noise (row i of `noise` belongs
    to `poison_idx[i]`) and `eps` its standard deviation; other attacks leave them empty.
    `y_adv` and `trigger_ids` are the text backdoor's target class and trigger token ids.
    """

    x: torch.Tensor
    y: torch.Tensor
    poison_idx: torch.Tensor
    noise: torch.Tensor | None = None
    eps: float = 0.0
    y_adv: int | None = None
    trigger_ids: torch.Tensor | None = None

    def without_poisons(self) -> tuple[torch.Tensor, torch.Tensor]:
        """S_corr minus every poisoned row: what the retrain reference is trained on."""
        keep = torch.ones(len(self.y), dtype=torch.bool)
        keep[self.poison_idx] = False
        return self.x[keep], self.y[keep]


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
    x = split.x_train.clone()
    x[idx] += noise
    return Poisoned(x, split.y_train.clone(), idx, noise=noise, eps=eps)


ATTACKS = {
    "gaussian": gaussian,
    "text_backdoor": text.text_backdoor,
}
