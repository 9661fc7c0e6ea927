"""`Poisoned`, the corrupted train set every attack in attacks.py returns, and its storage as
tensors (the trial crafts poisons once per store and loads them everywhere else)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from raysweep.science.data import Split, lengths


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
        """Inputs `x` with the backdoor's trigger: the patch pasted in (images), or the trigger
        sentence inserted into each review (text) at the same positions for every model measured:
        a fixed generator, not the trial's."""
        if self.trigger_ids is not None:
            return insert_trigger(x, self.trigger_ids, torch.Generator().manual_seed(0))
        return x * (1 - self.trigger_mask) + self.trigger * self.trigger_mask


def insert_trigger(x: torch.Tensor, trigger: torch.Tensor, generator: torch.Generator):
    """Rows of token ids `x` with the token ids `trigger` inserted at a random position of each.

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
