"""One record per attack: everything raysweep knows about it, in one line of `RECORDS`.

A record says how the attack crafts (its function), what its effect E is the mean of (`units`),
when it worked on the poisoned model (`check`: the `attack_ok` rule, and how the attack-check
figure draws it), which rows its counts are drawn from (`draws`: preflight's limits), how many
surrogate models it trains while crafting (`surrogates`: the plan's cost), and whether its units
are the per-poison Gaussian scores a row stores. Every table keyed by attack name is read from
here: attacks.ATTACKS (the crafting functions), metrics' effect units and margins, trial's
`attack_ok` and stored scores, preflight's draw limits, the plan's surrogate trainings, the
objectives an attack allows, the report's attack check.

Adding an attack is two edits: its crafting function (in attacks.py) and its line here.

Torch-free, like everything the report reads: the crafting function is named, not imported,
and loaded only where poisons are crafted (`crafter`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from raysweep.science.stats import Z_DETECTED

# What the effect E of a model is the mean of, per split (metrics.UNITS computes each; higher =
# stronger poison): "poisons": -I_i per Gaussian poison (no split: val and test read the same);
# "targets": per target test row, 1 if classified as y_adv (both splits read the targets);
# "rows": per val/test row, 1 if misclassified (an accuracy attack); "triggered": per val/test
# row not of class y_adv, 1 if its triggered copy is classified as y_adv.
Units = Literal["poisons", "targets", "rows", "triggered"]

# Which rows a count parameter draws from (preflight.draw_limits computes how many there are).
Pool = Literal["train", "train of y_adv", "train not of y_adv", "test not of y_adv"]


@dataclass(frozen=True)
class Check:
    """When an attack worked on the poisoned model, judged against its retrain reference before
    any unlearning (`attack_ok` is this and r resolved), and how the attack-check figure draws it.

    `column` is the metric of the two models the figure plots (times `scale`, under `label`);
    `line(retrain)` is the threshold drawn from the retrain model's metrics; `worked(before,
    retrain)` is the rule itself, on the two models' metrics. Build checks with `gap`, `reaches`
    or `gaussian_detected`, which state each rule once.
    """

    column: str
    label: str
    scale: float
    line: Callable[[dict], float]
    worked: Callable[[dict, dict], bool]
    below: bool = False  # success is the poisoned model below the line, not above it


EFFECT_LABEL = "attack effect E on val (%)\n(higher = stronger poison)"


def gap(least: float) -> Check:
    """E_before - E_retrain on val at least `least`. Written as the difference, not as E_before
    against E_retrain + least: the two round differently, and attack_ok must not change."""
    return Check(
        "effect_val",
        EFFECT_LABEL,
        100,
        line=lambda retrain: retrain["effect_val"] + least,
        worked=lambda before, retrain: before["effect_val"] - retrain["effect_val"] >= least,
    )


def reaches(column: str, label: str, least: float, over: float) -> Check:
    """`column` of the poisoned model at least `least`, and `over` more than the retrain's."""

    def line(retrain: dict) -> float:
        return max(least, retrain[column] + over)

    return Check(column, label, 100, line, lambda before, retrain: before[column] >= line(retrain))


def gaussian_detected() -> Check:
    """The poisoned model's scores show the noise: z = mean(I)·√n at or below Z_DETECTED, i.e.
    two-sided p < 0.01 and negative. The rule reads gus_p and gus, as rows always have; the line
    is its z, `gus_z <= Z_DETECTED` (the same verdict: checked float by float around it)."""
    return Check(
        "gus_z",
        "poison-score z = mean(I)·√n\n(N(0, 1) if never trained on)",
        1,
        line=lambda retrain: Z_DETECTED,
        worked=lambda before, retrain: before["gus_p"] < 0.01 and before["gus"] < 0,
        below=True,
    )


@dataclass(frozen=True)
class Attack:
    """One attack (see the module's docstring). `craft` names its crafting function: its name in
    poisoning/attacks.py, or "module:function" for one defined elsewhere (a plugin, a test)."""

    craft: str
    units: Units
    check: Check
    draws: dict[str, Pool] = field(default_factory=lambda: {"n": "train"})
    # Surrogate models it trains while crafting one poison set, from its bound arguments
    # (`raysweep plan` counts their cost): none for an attack that crafts without training.
    surrogates: Callable[[dict], int] = lambda attack: 0

    @property
    def scores(self) -> bool:
        """Its units are the per-poison Gaussian scores (negated), which each row stores as
        before_/after_/retrain_scores so the report can draw them."""
        return self.units == "poisons"


def crafter(attack: Attack) -> Callable:
    """The attack's crafting function `fn(split, generator, *, ...) -> Poisoned`, imported now."""
    module, _, name = attack.craft.rpartition(":")
    return getattr(importlib.import_module(module or "raysweep.poisoning.attacks"), name)


# The least E_before - E_retrain on val for an accuracy, targeted or image-backdoor attack to
# count as working. Accuracy attacks: 3 points, well above the spread between two seeds'
# trainings (about 1 point on digits' 359 val rows). Targeted and backdoor attacks: half of the
# targets / triggered rows moved to y_adv.
ACCURACY_GAP, MOVED_GAP = 0.03, 0.5
_ASR = "triggered val rows moved to y_adv (%)"

RECORDS: dict[str, Attack] = {
    "gaussian": Attack("gaussian", "poisons", gaussian_detected()),
    "gradient_matching": Attack(
        "gradient_matching",
        "targets",
        gap(MOVED_GAP),
        draws={"n": "train of y_adv", "n_targets": "test not of y_adv"},
        surrogates=lambda a: a["ensemble"] * (a["retrain"] + 1),  # each retrained `retrain` times
    ),
    "gradient_canceling": Attack(
        "gradient_canceling", "rows", gap(ACCURACY_GAP), surrogates=lambda a: 1
    ),
    "backdoor": Attack("backdoor", "triggered", gap(MOVED_GAP), {"n": "train not of y_adv"}),
    "label_flip": Attack("label_flip", "rows", gap(ACCURACY_GAP)),
    # The trigger flips at least half of the other class, and 0.2 more than without poisons.
    "text_backdoor": Attack(
        "text_backdoor",
        "triggered",
        reaches("backdoor_asr_val", _ASR, 0.5, 0.2),
        {"n": "train not of y_adv"},
    ),
}
