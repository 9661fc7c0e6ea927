"""Metrics (docs/design.md §4): each entry of METRICS maps (model, Probe) to named numbers.

The Gaussian Unlearning Score (paper's Algorithm 1): for poison i with clean input x_i, label y_i
and training noise xi_i, g_i = grad_x loss(theta; x_i, y_i) at the clean input (eval mode) and
I_i = <xi_i, g_i> / (eps ||g_i||). If theta never saw xi_i, I_i ~ N(0, 1) exactly, because it is
a standard normal projected on a unit vector that does not depend on it. A model that fit
x_i + xi_i has lower loss along xi_i, so I_i drifts negative.

"Input" is wherever the model says the noise lives (models.noise_space): the pixels for images,
the token embeddings for text, where padding gets no noise and, by causality, no gradient.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

from raysweep.poisoning.poisoned import Poisoned
from raysweep.poisoning.records import RECORDS
from raysweep.science.models import chunked, noise_space
from raysweep.science.stats import (
    FPR,
    MAX_DEGENERATE,
    Z_AT_FPR,
    anderson_darling,
    anderson_darling_rows,
)


@dataclass(frozen=True)
class Probe:
    """Everything the metrics look at besides the model."""

    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    forget: tuple[torch.Tensor, torch.Tensor]  # the poisoned rows as trained on
    retain: tuple[torch.Tensor, torch.Tensor]
    poisoned: Poisoned
    x_clean_poison: torch.Tensor  # clean inputs of the poisoned rows, aligned with poisoned.noise
    control_noise: torch.Tensor | None  # fresh noise never used in training (the null control)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return chunked(model, x)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return (logits(model, x).argmax(1) == y).float().mean().item()


def log_odds_against(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row, log((1 - p_y) / p_y) = logsumexp over k != y of (z_k - z_y), from the logits.

    The cross-entropy loss is softplus of it, so it ranks rows exactly as the loss does, but it
    keeps full relative precision however confident the model is: once 1 - p_y falls below the
    float's resolution the loss rounds to 0 (float32: rows tie at 0) and its gradient p - e_y
    loses the true class (p_y - 1 rounds to 0), while this stays graded. Its gradient is
    (p - e_y) / (1 - p_y): the loss gradient's direction, with the factor that underflows
    divided out.
    """
    z = logits - logits.gather(1, y[:, None])
    return torch.logsumexp(z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -math.inf), dim=1)


def as_float64(model: nn.Module) -> nn.Module:
    """A frozen float64 copy in eval mode: scores are computed in double precision."""
    model64 = copy.deepcopy(model).double().eval()
    for p in model64.parameters():
        p.requires_grad_(False)
    return model64


def batch_input_gradients(model64: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample input-gradient directions of the loss at the clean input (models.noise_space:
    pixels, or token embeddings) of one batch, from one backward pass.

    Each row is grad_x loss / (1 - p_y), the gradient of `log_odds_against`: exactly the loss
    gradient's direction (all the Gaussian score uses), also on rows where p_y rounds to 1 and
    the loss's own gradient would point the wrong way. In eval mode the samples of a batch do
    not interact, so the gradient of the summed objective with respect to the batch input is
    exactly the stack of per-sample gradients.
    """
    embed, rest = noise_space(model64)
    r = embed(x).double().detach().requires_grad_(True)
    (g,) = torch.autograd.grad(log_odds_against(rest(r, x), y).sum(), r)
    return g.flatten(1)


def input_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Per-sample input-gradient directions in float64, one backward pass per `batch_size` rows."""
    model64 = as_float64(model)
    chunks = range(0, len(x), batch_size)
    return torch.cat(
        [
            batch_input_gradients(model64, x[i : i + batch_size], y[i : i + batch_size])
            for i in chunks
        ]
    )


def gaussian_scores(
    model: nn.Module, x_clean: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, eps: float
) -> torch.Tensor:
    """I_i = <xi_i, g_i> / (eps ||g_i||) in float64, one per row; NaN where g_i is zero or not
    finite (a dead unit or a diverged model): such a gradient says nothing about the noise."""
    g = input_gradients(model, x_clean, y)
    xi = noise.flatten(1).double().to(g.device)
    norm = g.norm(dim=1)
    scores = (xi * g).sum(1) / (eps * norm)
    return scores.masked_fill(~(torch.isfinite(g).all(1) & (norm > 0)), math.nan)


def summarise_scores(scores: torch.Tensor) -> dict[str, float]:
    """Over the informative (non-NaN) scores: gus = mean(I); z = gus * sqrt(n) (I ~ N(0,1) under
    the null); two-sided p; TPR at 1% FPR; and how many were degenerate (NaN, left out)."""
    valid = scores[~scores.isnan()]
    n = len(valid)
    gus = valid.mean().item() if n else math.nan
    z = gus * math.sqrt(n)
    return {
        "gus": gus,
        "gus_z": z,
        "gus_p": float(2 * norm.sf(abs(z))),
        "tpr_at_1fpr": (valid <= Z_AT_FPR).double().mean().item() if n else math.nan,
        "gus_degenerate": float(len(scores) - n),
    }


def poison_scores(model: nn.Module, probe: Probe, noise: torch.Tensor | None = None):
    """The per-poison scores I_i of the training noise (or of `noise`: the null control)."""
    p = probe.poisoned
    y = p.y[p.poison_idx]
    return gaussian_scores(
        model, probe.x_clean_poison, y, p.noise if noise is None else noise, p.eps
    )


def gaussian(model: nn.Module, probe: Probe) -> dict[str, float]:
    """GUS of the training noise, and the same statistic for fresh noise (must look N(0, 1))."""
    if probe.poisoned.noise is None:
        return {}
    out = summarise_scores(poison_scores(model, probe))
    out["control_gus_z"] = summarise_scores(poison_scores(model, probe, probe.control_noise))[
        "gus_z"
    ]
    return out


def loss_mia(model: nn.Module, probe: Probe) -> dict[str, float]:
    """Loss-threshold MIA (Yeom et al.): forget rows called members at 1% FPR on held-out test rows.

    Rows are ranked by `log_odds_against` in float64 (the loss's order, without the float32 loss's
    ties at exactly 0). A row is called a member when its score is strictly below the
    floor(1% x n)-th smallest test score, so at most 1% of test rows are called members however
    many tie; the realised FPR is reported beside the TPR.
    """
    member = log_odds_against(logits(model, probe.forget[0]).double(), probe.forget[1])
    nonmember = log_odds_against(logits(model, probe.x_test).double(), probe.y_test)
    threshold = nonmember.sort().values[int(FPR * len(nonmember))]
    return {
        "loss_mia_tpr": (member < threshold).double().mean().item(),
        "loss_mia_fpr": (nonmember < threshold).double().mean().item(),
    }


def target_hits(model: nn.Module, probe: Probe) -> torch.Tensor:
    """gradient_matching: per target test row, 1 if classified as y_adv."""
    p = probe.poisoned
    return (logits(model, probe.x_test[p.target_idx]).argmax(1) == p.y_adv).double()


def targeted(model: nn.Module, probe: Probe) -> dict[str, float]:
    """gradient_matching: the fraction of the attack's target test rows classified as y_adv."""
    if probe.poisoned.target_idx is None:
        return {}
    return {"target_adv_rate": target_hits(model, probe).mean().item()}


def _splits(probe: Probe) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"val": (probe.x_val, probe.y_val), "test": (probe.x_test, probe.y_test)}


def triggered(probe: Probe, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The rows of (x, y) a backdoor is judged on, with its trigger (a patch, or a sentence for
    text: Poisoned.triggered): those whose true class is not y_adv (they would count as
    successes without any backdoor). One selection for the success rate (`backdoor_hits`) and
    the oracles' margins (`MARGINS`)."""
    p = probe.poisoned
    return p.triggered(x[y != p.y_adv])


def backdoor_hits(model: nn.Module, probe: Probe, x: torch.Tensor, y: torch.Tensor):
    """Per row of (x, y) whose true class is not y_adv: 1 if the triggered row (`triggered`) is
    classified as y_adv."""
    return (logits(model, triggered(probe, x, y)).argmax(1) == probe.poisoned.y_adv).double()


def backdoor(model: nn.Module, probe: Probe) -> dict[str, float]:
    """Backdoor attack success rate on triggered val/test rows (`backdoor_hits`): images with
    the patch, or reviews with the trigger sentence."""
    if probe.poisoned.trigger is None and probe.poisoned.trigger_ids is None:
        return {}
    return {
        f"backdoor_asr_{split}": backdoor_hits(model, probe, x, y).mean().item()
        for split, (x, y) in _splits(probe).items()
    }


def errors(model: nn.Module, probe: Probe) -> dict[str, torch.Tensor]:
    """Per val/test row, 1 if misclassified."""
    return {
        split: (logits(model, x).argmax(1) != y).double()
        for split, (x, y) in _splits(probe).items()
    }


def clean_acc(model: nn.Module, probe: Probe) -> dict[str, float]:
    """Accuracy on clean val and test rows (utility, and `feasible`'s check), on the retain set
    and on the forget set."""
    return {
        "clean_acc_val": accuracy(model, probe.x_val, probe.y_val),
        "clean_acc_test": accuracy(model, probe.x_test, probe.y_test),
        "retain_acc": accuracy(model, *probe.retain),
        "forget_acc": accuracy(model, *probe.forget),
    }


METRICS = {
    "clean_acc": clean_acc,
    "gaussian": gaussian,
    "loss_mia": loss_mia,
    "targeted": targeted,
    "backdoor": backdoor,
}


def _both(units: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"val": units, "test": units}


# The attack's effect E (higher = stronger poison) of a model, per split, as the units it is the
# mean of: E = nanmean(units), by the attack record's `units` (records.Units). Units are paired
# across the poisoned, unlearned and retrained models (the same poisons, targets and rows), which
# `bootstrap_means` keeps when it resamples.
#   poisons: -I_i per Gaussian poison (NaN where degenerate): the score is computed on the poisons
#     themselves, in no evaluation split, so val and test read the same units;
#   rows: the error (0/1) per clean row, so E_before - E_retrain is the accuracy drop the poison
#     caused and r = (acc_retrain - acc_after) / (acc_retrain - acc_before);
#   targets: fixed test rows chosen by the attacker, with no val counterpart: both splits read
#     the same hits, so tuning sees the targets (the paper's setting);
#   triggered: the hit (0/1) per triggered row of another class.
UNITS = {
    "poisons": lambda model, probe: _both(-poison_scores(model, probe)),
    "targets": lambda model, probe: _both(target_hits(model, probe)),
    "rows": errors,
    "triggered": lambda model, probe: {
        split: backdoor_hits(model, probe, x, y) for split, (x, y) in _splits(probe).items()
    },
}


def effect_units(model: nn.Module, probe: Probe, attack: str) -> dict[str, torch.Tensor]:
    """The units of `attack`'s effect E of `model`, per split (UNITS, by its record)."""
    return UNITS[RECORDS[attack].units](model, probe)


@dataclass(frozen=True)
class Objective:
    """What a study minimises on val, from r on val and the effect units on val (for Gaussian
    poisoning -I_i per poison): `value`, and whether it reads the units as per-poison N(0, 1)
    scores, so is defined only for attacks whose record says they are (`Attack.scores`).
    `noise(resolution, units, generator)`: the smallest change in the value one run can tell
    apart, in the value's own units (the convergence rule's threshold, analysis/convergence.py),
    from r's `resolution` on the seed and the run's units on val."""

    value: Callable[[float, torch.Tensor], float]
    needs_scores: bool
    doc: str
    noise: Callable[[float, torch.Tensor, torch.Generator], float]


def anderson_darling_noise(units: torch.Tensor, generator: torch.Generator) -> float:
    """Half-width of the 95 % bootstrap interval of the Anderson-Darling distance of the per-poison
    scores -units (the poisons resampled with replacement); NaN with fewer than two scores."""
    s = -units[~units.isnan()].double()
    if len(s) < 2:
        return math.nan
    draws = [anderson_darling_rows(s[idx].numpy()) for idx in resampled(len(s), generator)]
    lo, hi = _interval(torch.from_numpy(np.concatenate(draws)))
    return (hi - lo) / 2


# The spec's `objective`. residual: |r| (docs/design.md §5); it cannot tell removal from hiding: a
# mean back at 0 with a few poisons still memorised, or scores pushed past N(0, 1), read alike.
# anderson_darling sees both, where the exact null (Gaussian poisoning) says what clean is. Its
# values stay far below the infeasible 10 (trial.objective): 0.52-0.60 for the quickstart's
# poisoned models, 0.002 for their retrain references (1 / 150 expected by chance).
OBJECTIVES = {
    # |r|'s noise is r's resolution: r's interval on one seed is about that wide (resolution).
    "residual": Objective(
        lambda r_val, units: abs(r_val),
        False,
        "|r| on val (default)",
        lambda resolution, units, generator: resolution,
    ),
    "anderson_darling": Objective(
        lambda r_val, units: anderson_darling(-units.numpy()),
        True,
        "the per-poison scores' Anderson-Darling distance from N(0, 1) (gaussian only)",
        lambda resolution, units, generator: anderson_darling_noise(units, generator),
    ),
}


def measure(
    model: nn.Module, probe: Probe, attack: str
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Every metric of one model, its effect E on val and test, and E's units per split."""
    out: dict[str, float] = {}
    for fn in METRICS.values():
        out.update(fn(model, probe))
    units = {split: u.double().cpu() for split, u in effect_units(model, probe, attack).items()}
    for split, u in units.items():
        out[f"effect_{split}"] = torch.nanmean(u).item() if len(u) else math.nan
    return out, units


def residual(e_after: float, e_before: float, e_retrain: float) -> float:
    """r = (E_after - E_retrain) / (E_before - E_retrain): 0 = as retrained, 1 = nothing removed."""
    denom = e_before - e_retrain
    return (e_after - e_retrain) / denom if denom != 0 else float("nan")


# Degenerate units (a NaN Gaussian score: zero or non-finite input gradient) are left out of r the
# same way for all three models: r and its interval are computed on the units every model scores,
# so the three means are over the same poisons; with fewer than MIN_PAIRED of the units left, r is
# NaN rather than a ratio resting on whichever poisons happen to remain. The share matches
# MAX_DEGENERATE: an unlearned model past it is infeasible anyway. Accuracy, target and backdoor
# units are never NaN, so for them this is the plain mean.
MIN_PAIRED = 1 - MAX_DEGENERATE


def paired(before: torch.Tensor, after: torch.Tensor, retrain: torch.Tensor):
    """The three models' units where all three are non-NaN; None when fewer than MIN_PAIRED of
    the units (or none) remain."""
    keep = ~(before.isnan() | after.isnan() | retrain.isnan())
    if before.numel() == 0 or keep.sum().item() < MIN_PAIRED * before.numel():
        return None
    return before[keep], after[keep], retrain[keep]


def paired_residual(before: torch.Tensor, after: torch.Tensor, retrain: torch.Tensor) -> float:
    """r from the three models' effect units, on the units all three score (`paired`)."""
    units = paired(before, after, retrain)
    if units is None:
        return math.nan
    b, a, r = (torch.nanmean(u).item() for u in units)
    return residual(a, b, r)


# Uncertainty. E is a mean over units (poisons, targets, rows), so r inherits their sampling
# noise: with n Gaussian poisons of sd ~1, r's standard error is about sqrt(2 / n) / (E_before -
# E_retrain). A paired bootstrap over the units (the same resampled units for all three models)
# gives r's interval; it keeps the pairing, which is what makes accuracy attacks measurable: the
# models disagree on few rows, and only those move the difference.
LEVEL = 0.95
DRAWS = 2000


def bootstrap_means(
    units: list[torch.Tensor], generator: torch.Generator, draws: int = DRAWS
) -> torch.Tensor:
    """(len(units), draws) means of the paired units, resampled with replacement together."""
    stacked = torch.stack(units).double()
    idx = resampled(stacked.shape[1], generator, draws)
    return torch.cat([torch.nanmean(stacked[:, i], dim=2) for i in idx], dim=1)


def resampled(n: int, generator: torch.Generator, draws: int = DRAWS):
    """`draws` bootstrap resamples of n units' indices, in (at most 200, n) chunks: bounded
    memory, 200 draws x n units at a time."""
    for start in range(0, draws, 200):
        yield torch.randint(n, (min(200, draws - start), n), generator=generator)


def _interval(samples: torch.Tensor) -> tuple[float, float]:
    q = torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2], dtype=samples.dtype)
    lo, hi = torch.nanquantile(samples, q).tolist()
    return lo, hi


def residual_interval(
    before: torch.Tensor, after: torch.Tensor, retrain: torch.Tensor, generator: torch.Generator
) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of r from the three models' paired effect units,
    on the units all three score (`paired`)."""
    units = paired(before, after, retrain)
    if units is None:
        return math.nan, math.nan
    b, a, r = bootstrap_means(list(units), generator)
    return _interval((a - r) / (b - r))


def resolution(before: torch.Tensor, retrain: torch.Tensor, generator: torch.Generator) -> float:
    """Half-width of the 95% bootstrap interval of E_before - E_retrain, relative to it.

    That is about the half-width of any r's interval on this seed (r's numerator is measured with
    the same noise as its denominator), so a resolution of 0.4 means an r of 0.5 and one of 1.0
    cannot be told apart. Infinite when the poisoned model shows no effect over the retrain.
    """
    gap = (before.nanmean() - retrain.nanmean()).item() if before.numel() else 0.0
    if not gap > 0:
        return math.inf
    b, r = bootstrap_means([before, retrain], generator)
    lo, hi = _interval(b - r)
    return (hi - lo) / 2 / gap


def paired_difference(
    a: torch.Tensor, b: torch.Tensor, generator: torch.Generator
) -> tuple[float, float, float]:
    """mean(a - b) over the units both score, and its 95 % paired-bootstrap interval (the same
    resampled units for both); NaN with fewer than two such units."""
    keep = ~(a.isnan() | b.isnan())
    if keep.sum().item() < 2:
        return math.nan, math.nan, math.nan
    a, b = a[keep], b[keep]
    boot_a, boot_b = bootstrap_means([a, b], generator)
    return (a.mean() - b.mean()).item(), *_interval(boot_a - boot_b)


# Retrain oracles (issue 24, part 2): K more retrain-from-scratch models per confirm seed, each
# from its own initialisation and batch order, give what retraining itself spreads over. Each
# unit the effect E is the mean of (UNITS) gets a continuous margin, higher = more of the
# poison's effect, whose sign is the unit's 0/1 outcome up to ties: for accuracy attacks the log
# odds against the true class (> 0: misclassified), for targets and triggered rows the log odds
# of y_adv (> 0: moved to y_adv), for Gaussian noise the unit itself, -I_i. Test split only:
# oracles are trained for confirm rows, which the report reads on test.


def _toward(model: nn.Module, x: torch.Tensor, y_adv: int) -> torch.Tensor:
    """log(p_adv / (1 - p_adv)) per row of x, in float64 (log_odds_against, negated)."""
    z = logits(model, x).double()
    return -log_odds_against(z, torch.full((len(z),), y_adv, device=z.device))


def _against(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return log_odds_against(logits(model, x).double(), y)


# Per kind of units (records.Units), as UNITS: on the triggered test rows the success rate
# counts (`triggered`, the hits' own selection).
MARGINS = {
    "poisons": lambda model, probe: -poison_scores(model, probe),
    "targets": lambda model, probe: _toward(
        model, probe.x_test[probe.poisoned.target_idx], probe.poisoned.y_adv
    ),
    "rows": lambda model, probe: _against(model, probe.x_test, probe.y_test),
    "triggered": lambda model, probe: _toward(
        model, triggered(probe, probe.x_test, probe.y_test), probe.poisoned.y_adv
    ),
}


def margins(model: nn.Module, probe: Probe, attack: str) -> torch.Tensor:
    """Per test unit of E, `model`'s margin toward the poison's effect (MARGINS, by the attack
    record's units), float64 on the CPU."""
    return MARGINS[RECORDS[attack].units](model.eval(), probe).double().cpu()


def outside_counts(models: torch.Tensor) -> torch.Tensor:
    """Per model (row of the (K + 1, n) margins), on how many units its margin lies strictly
    outside the [min, max] of the other K models' margins on that unit."""
    out = []
    for j in range(len(models)):
        others = torch.cat([models[:j], models[j + 1 :]])
        outside = (models[j] < others.min(0).values) | (models[j] > others.max(0).values)
        out.append(int(outside.sum()))
    return torch.tensor(out)


def oracle_test(model: torch.Tensor, oracles: torch.Tensor) -> dict[str, float]:
    """Is `model` (its (n,) margins) one more retrain oracle? Against the (K, n) `oracles`' margins:

    oracle_outside: the share of units where its margin lies strictly outside the oracles'
    [min, max] (KLoM-style, per unit). A model exchangeable with the oracles has each unit there
    with probability at most 2 / (K + 1), but units are not independent (one model may be more
    confident on all of them), so no binomial over units is valid. oracle_p is a permutation p
    that is: every one of the K + 1 models is judged by the same count against the other K, and
    p = (the models whose count is at least `model`'s) / (K + 1). Exact for any dependence
    between units, and at least 1 / (K + 1): that is all K oracles can tell (K = 19 for 0.05).
    Units where any model's margin is NaN (a degenerate Gaussian score) are left out; NaN when
    none remain.
    """
    stacked = torch.cat([model[None], oracles]).double()
    stacked = stacked[:, ~stacked.isnan().any(0)]
    if stacked.shape[1] == 0:
        return {"oracle_outside": math.nan, "oracle_p": math.nan}
    counts = outside_counts(stacked)
    return {
        "oracle_outside": counts[0].item() / stacked.shape[1],
        "oracle_p": (counts >= counts[0]).sum().item() / len(counts),
    }


def oracle_band(
    before: torch.Tensor, oracles: list[torch.Tensor], retrain: torch.Tensor
) -> tuple[float, float]:
    """Where retraining itself lands on r: the least and greatest r of the oracles' test units
    against the poisoned model and the retrain reference (`paired_residual`, one rule for
    degenerate units). A model like the oracles lands inside with probability (K - 1) / (K + 1)."""
    rs = [paired_residual(before, o, retrain) for o in oracles]
    return float(np.min(rs)), float(np.max(rs))  # NaN if any oracle's r is
