"""The relearning probe (issue 24, part 3): does the poison come back faster than after retraining?

A model that only hides the poison (its outputs moved, the fit to the noise still in its weights)
can relearn it from a little fine-tuning; a model that removed it relearns no faster than the
retrained reference, which never saw it. So both models get the same small fine-tune, with the
same batches in the same order, on

    retain:  the retain set S_r alone (no poison in it when every poison is known), and
    poisons: a random RELEARN_SHARE of the poisoned rows, as trained on;

then the attack's effect E (metrics.effect_units, test units) is measured on each. For Gaussian
poisoning the units are the poisons themselves, and only the poisons the second probe never used
are scored, in both probes: their noise is independent of the used ones', so fine-tuning on
those can move them only through what the model still carries. For the other attacks the units
are test rows, which no probe uses. relearn_gap = E(unlearned, probed) - E(retrain, probed),
paired over the units, with a 95 % paired-bootstrap interval (metrics.bootstrap_means).

The probe runs on copies, after the row is measured: it never changes the measured model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from raysweep.poisoning.records import RECORDS
from raysweep.science.budget import Meter, metered
from raysweep.science.models import seeded, trainable
from raysweep.science.train import autocast
from raysweep.unlearning.steps import Pair, descend, sgd

from .metrics import Probe, effect_units, paired_difference

# Each probe's cap per model, as a share of C_train: 2 % is under one pass over the train set
# (the quickstart: 863 units, 14 steps of 64), small beside the unlearning budgets it follows
# (5-10 %), so the probe reads what the model still carries, not what it could learn anew.
RELEARN_BUDGET = 0.02
RELEARN_LR = 0.01  # a fine-tuning step: a fifth of the quickstart's peak training lr (0.05)
RELEARN_BATCH = 64
RELEARN_MOMENTUM = 0.9
RELEARN_SHARE = 0.1  # the poisons the second probe fine-tunes on; the rest are scored
PROBES = ("retain", "poisons")


def probe_sets(probe: Probe, generator: torch.Generator) -> tuple[dict[str, Pair], torch.Tensor]:
    """The two probes' fine-tuning sets, and a mask over the poisons: True where unused."""
    p = probe.poisoned
    n = len(p.poison_idx)
    used = torch.randperm(n, generator=generator)[: max(1, round(RELEARN_SHARE * n))]
    held = torch.ones(n, dtype=torch.bool)
    held[used] = False
    rows = p.poison_idx[used.sort().values.to(p.poison_idx.device)]
    return {"retain": probe.retain, "poisons": (p.x[rows], p.y[rows])}, held


def fine_tuned(
    model: nn.Module, data: Pair, cap: float, generator: torch.Generator, precision: str
) -> nn.Module:
    """A copy of `model` after SGD on `data` until `cap` units are spent (budget.Meter)."""
    tuned = copy.deepcopy(model)
    opt = sgd(trainable(tuned), RELEARN_LR, RELEARN_MOMENTUM, 0.0)
    batches = metered(Meter(cap), *data, RELEARN_BATCH, generator)
    # Torch's own RNG forked and seeded from `generator` (dropout in text models): the probe is
    # reproducible and leaves the process's RNG as it found it.
    with autocast(precision, tuned):
        seeded(lambda: descend(tuned, opt, batches), generator)
    return tuned.eval()


def relearned_units(
    model: nn.Module, probe: Probe, attack: str, cap: float, seed: int, precision: str = "fp32"
) -> dict[str, torch.Tensor]:
    """Per probe, the effect units (test) of `model` fine-tuned with it. Every model probed with
    the same `seed` sees the same sets and batches, which is what pairs two models' units."""
    sets, held = probe_sets(probe, torch.Generator().manual_seed(seed))
    out = {}
    for i, name in enumerate(PROBES, start=1):
        batches = torch.Generator().manual_seed(seed + i)  # one stream per probe
        tuned = fine_tuned(model, sets[name], cap, batches, precision)
        units = effect_units(tuned, probe, attack)["test"].double().cpu()
        # units that are the poisons themselves (one per poison, in order): the held-out ones
        out[name] = units[held] if RECORDS[attack].units == "poisons" else units
    return out


def gaps(
    after: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, float]:
    """The row's relearn columns: per probe, relearn_gap_<probe> with its _lo and _hi."""
    out = {"relearn_budget": RELEARN_BUDGET}
    for name in PROBES:
        col = f"relearn_gap_{name}"
        out |= dict(
            zip(
                (col, f"{col}_lo", f"{col}_hi"),
                paired_difference(after[name], reference[name], generator),
            )
        )
    return out
