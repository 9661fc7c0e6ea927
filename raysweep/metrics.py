"""Metrics (DESIGN section 4): each entry of METRICS maps (model, Probe) to named numbers.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

from . import text
from .attacks import Poisoned
from .models import noise_space

FPR = 0.01
Z_AT_FPR = float(norm.ppf(FPR))  # one-sided threshold on I: about -2.326


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


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return (logits(model, x).argmax(1) == y).float().mean().item()


def losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits(model, x), y, reduction="none")


def as_float64(model: nn.Module) -> nn.Module:
    """A frozen float64 copy in eval mode: scores are computed in double precision."""
    model64 = copy.deepcopy(model).double().eval()
    for p in model64.parameters():
        p.requires_grad_(False)
    return model64


def batch_input_gradients(model64: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients of the loss w.r.t. the clean input (models.noise_space: pixels, or
    token embeddings) of one batch, from one backward pass.

    In eval mode the samples of a batch do not interact, so the gradient of the summed loss with
    respect to the batch input is exactly the stack of per-sample input gradients.
    """
    embed, rest = noise_space(model64)
    r = embed(x).double().detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(rest(r, x), y, reduction="sum"), r)
    return g.flatten(1)


def input_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Per-sample input gradients in float64, one backward pass per batch of `batch_size`."""
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
    """I_i = <xi_i, g_i> / (eps ||g_i||) in float64, one per row."""
    g = input_gradients(model, x_clean, y)
    xi = noise.flatten(1).double().to(g.device)
    return (xi * g).sum(1) / (eps * g.norm(dim=1).clamp_min(1e-300))


def summarise_scores(scores: torch.Tensor) -> dict[str, float]:
    """gus = mean(I); z = gus * sqrt(n) (I ~ N(0,1) under the null); two-sided p; TPR at 1% FPR."""
    n = len(scores)
    gus = scores.mean().item()
    z = gus * math.sqrt(n)
    return {
        "gus": gus,
        "gus_z": z,
        "gus_p": float(2 * norm.sf(abs(z))),
        "tpr_at_1fpr": (scores <= Z_AT_FPR).double().mean().item(),
    }


def gaussian(model: nn.Module, probe: Probe) -> dict[str, float]:
    """GUS of the training noise, and the same statistic for fresh noise (must look N(0, 1))."""
    if probe.poisoned.noise is None:
        return {}
    y = probe.poisoned.y[probe.poisoned.poison_idx]
    scores = gaussian_scores(
        model, probe.x_clean_poison, y, probe.poisoned.noise, probe.poisoned.eps
    )
    out = summarise_scores(scores)
    control = gaussian_scores(
        model, probe.x_clean_poison, y, probe.control_noise, probe.poisoned.eps
    )
    out["control_gus_z"] = summarise_scores(control)["gus_z"]
    return out


def loss_mia(model: nn.Module, probe: Probe) -> dict[str, float]:
    """Loss-threshold MIA (Yeom et al.): TPR on the forget set at 1% FPR on held-out test rows."""
    member, nonmember = losses(model, *probe.forget), losses(model, probe.x_test, probe.y_test)
    threshold = torch.quantile(nonmember, FPR)
    return {"loss_mia_tpr": (member < threshold).float().mean().item()}


def targeted(model: nn.Module, probe: Probe) -> dict[str, float]:
    """gradient_matching: the fraction of the attack's target test rows classified as y_adv."""
    p = probe.poisoned
    if p.target_idx is None:
        return {}
    pred = logits(model, probe.x_test[p.target_idx]).argmax(1)
    return {"target_adv_rate": (pred == p.y_adv).float().mean().item()}


def backdoor(model: nn.Module, probe: Probe) -> dict[str, float]:
    """Backdoor attack success rate: triggered val/test rows classified as y_adv, over the rows
    whose true class is not y_adv (those would count as successes without any backdoor)."""
    p = probe.poisoned
    if p.trigger is None:
        return {}
    out = {}
    for split, x, y in (("val", probe.x_val, probe.y_val), ("test", probe.x_test, probe.y_test)):
        pred = logits(model, p.triggered(x[y != p.y_adv])).argmax(1)
        out[f"backdoor_asr_{split}"] = (pred == p.y_adv).float().mean().item()
    return out


def clean_acc(model: nn.Module, probe: Probe) -> dict[str, float]:
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
    "text_backdoor": text.backdoor_asr,
}

# The attack's effect E (higher = stronger poison) from a model's metrics, per split. For the
# accuracy attacks E is the clean error, so E_before - E_retrain is the accuracy drop the poison
# caused and r = (acc_retrain - acc_after) / (acc_retrain - acc_before). gradient_matching's
# targets are fixed test rows chosen by the attacker, with no val counterpart: both splits read
# the same rate, so tuning sees the targets (the paper's setting; noted in the report).
_error = lambda m, split: 1 - m[f"clean_acc_{split}"]
EFFECTS = {
    "gaussian": lambda m, split: -m["gus"],
    "gradient_matching": lambda m, split: m["target_adv_rate"],
    "gradient_canceling": _error,
    "backdoor": lambda m, split: m[f"backdoor_asr_{split}"],
    "label_flip": _error,
    "text_backdoor": lambda m, split: m[f"backdoor_asr_{split}"],
}

# The least E_before - E_retrain on val for an attack to count as working. Accuracy attacks: 3
# points, well above the spread between two seeds' trainings (about 1 point on digits' 359 val
# rows). Targeted and backdoor attacks: half of the targets / triggered rows moved to y_adv.
MIN_EFFECT = {
    "gradient_matching": 0.5,
    "gradient_canceling": 0.03,
    "backdoor": 0.5,
    "label_flip": 0.03,
}


def _effect_gap(attack: str):
    return lambda before, retrain: (
        before["effect_val"] - retrain["effect_val"] >= MIN_EFFECT[attack]
    )


# Did the attack work on the poisoned model (judged against the retrain reference)? Checked
# before any unlearning and recorded per row as `attack_ok`; a failed attack's rows stay in the
# results, marked, and its residual r is meaningless (its denominator is about 0).
ATTACK_OK = {
    "gaussian": lambda before, retrain: before["gus_p"] < 0.01 and before["gus"] < 0,
    **{attack: _effect_gap(attack) for attack in MIN_EFFECT},
    # the trigger flips at least half of the other class, and 0.2 more than without poisons
    "text_backdoor": lambda b, r: b["backdoor_asr_val"] >= max(0.5, r["backdoor_asr_val"] + 0.2),
}


def measure(model: nn.Module, probe: Probe, attack: str) -> dict[str, float]:
    """Every metric of one model, plus the attack's effect on val and test."""
    out: dict[str, float] = {}
    for fn in METRICS.values():
        out.update(fn(model, probe))
    out["effect_val"] = EFFECTS[attack](out, "val")
    out["effect_test"] = EFFECTS[attack](out, "test")
    return out


def residual(e_after: float, e_before: float, e_retrain: float) -> float:
    """r = (E_after - E_retrain) / (E_before - E_retrain): 0 = as retrained, 1 = nothing removed."""
    denom = e_before - e_retrain
    return (e_after - e_retrain) / denom if denom != 0 else float("nan")
