"""The Gaussian Unlearning Score as science: exact N(0,1) null, batched == per-sample, real signal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom, kstest

from raysweep.base.storage import open_store
from raysweep.experiment import metrics
from raysweep.experiment.metrics import (
    Probe,
    gaussian_scores,
    input_gradients,
    loss_mia,
    residual,
    residual_interval,
    resolution,
    summarise_scores,
)
from raysweep.experiment.spec import load
from raysweep.experiment.trial import prepare
from raysweep.science.models import mlp, seeded


def _trained_mlp(gen):
    """A small MLP trained on clean random data: it never saw any of the noise drawn below."""
    x = torch.randn(256, 1, 8, 8, generator=gen)
    y = (x.flatten(1)[:, :5].sum(1) > 0).long()
    model = seeded(lambda: mlp((1, 8, 8), 2, width=32), gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_null_scores_are_standard_normal(gen):
    model, x, y = _trained_mlp(gen)
    eps = 0.7
    idx = torch.randint(len(y), (600,), generator=gen)
    noise = eps * torch.randn((600, 1, 8, 8), generator=gen)
    scores = gaussian_scores(model, x[idx], y[idx], noise, eps)
    assert kstest(scores.numpy(), "norm").pvalue > 0.01
    s = summarise_scores(scores)
    assert abs(s["gus_z"]) < 3.5 and s["tpr_at_1fpr"] < 0.03


def test_batched_gradients_equal_per_sample_loop(gen):
    model, x, y = _trained_mlp(gen)
    batched = input_gradients(model, x[:40], y[:40], batch_size=16)
    loop = torch.cat([input_gradients(model, x[i : i + 1], y[i : i + 1]) for i in range(40)])
    assert batched.dtype == torch.float64
    assert torch.allclose(batched, loop, rtol=0, atol=1e-8)


def _saturated_linear(gen, n=40, d=12, k=5):
    """A linear classifier and rows it is certain about: margins 40..80 (loss below 1e-17)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, k))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(k, d, generator=gen))
        model[1].bias.zero_()
        x = torch.randn(n, 1, 1, d, generator=gen)
        z = model(x)
        # Scale each row so its margin over the runner-up is 40..80 logits (in row order).
        margin = z.topk(2).values.diff(dim=1).abs().flatten()
        x = x * (torch.linspace(40, 80, n) / margin).view(n, 1, 1, 1)
    return model.eval(), x, z.argmax(1)


def test_scores_are_exact_on_saturated_rows(gen):
    """grad_x loss = W^T (p - e_y): once 1 - p_y < 2^-53, p_y - 1 rounds to 0 and the true class
    drops out. The reference keeps the non-true-class mass in log space: p - e_y is
    (1 - p_y) (q - e_y) with q the softmax over the other classes, and 1 - p_y > 0 does not
    change a direction. Scores must match it to 1e-9 relative."""
    model, x, y = _saturated_linear(gen)
    loss = F.cross_entropy(model(x).double(), y, reduction="none")
    assert loss.max() < 1e-17
    W = model[1].weight.detach().double().numpy()
    z = x.flatten(1).double().numpy() @ W.T + model[1].bias.detach().double().numpy()
    z[np.arange(len(y)), y.numpy()] = -np.inf  # other classes only
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    q[np.arange(len(y)), y.numpy()] = -1.0  # q - e_y
    g = q @ W
    eps = 0.3
    noise = eps * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xi = noise.flatten(1).numpy()
    reference = (xi * g).sum(1) / (eps * np.linalg.norm(g, axis=1))
    scores = gaussian_scores(model, x, y, noise, eps).numpy()
    np.testing.assert_allclose(scores, reference, rtol=1e-9, atol=0)


def test_degenerate_rows_are_left_out_and_counted(gen):
    """A zero input gradient (every ReLU dead) carries no information about the noise: NaN, not 0."""
    model = mlp((1, 4, 4), 3, width=8, depth=1)
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.fill_(-1.0)  # the hidden layer is dead for every input
    x, y = torch.randn(10, 1, 4, 4, generator=gen), torch.randint(3, (10,), generator=gen)
    scores = gaussian_scores(model, x, y, torch.randn(10, 1, 4, 4, generator=gen), 1.0)
    assert scores.isnan().all()
    s = summarise_scores(torch.cat([scores[:3], torch.tensor([-1.0, -3.0], dtype=torch.float64)]))
    assert (
        s["gus_degenerate"] == 3 and s["gus"] == -2.0 and s["gus_z"] == pytest.approx(-2 * 2**0.5)
    )


def _mia_probe(forget, test) -> Probe:
    return Probe(None, None, *test, forget, None, None, None, None)


def test_loss_mia_ranks_rows_of_a_saturated_model(gen):
    """Every float32 loss here is exactly 0, so a threshold on the loss calls nobody a member.
    The forget rows are more certain (margins 70..80) than every test row (40..60), and the test
    rows tie in blocks of ten: the realised FPR stays at most 1% all the same."""
    model, x, y = _saturated_linear(gen, n=400)
    assert (F.cross_entropy(model(x), y, reduction="none") == 0).all()
    member, nonmember = (x[300:], y[300:]), (x[:200].repeat(10, 1, 1, 1), y[:200].repeat(10))
    out = loss_mia(model, _mia_probe(member, nonmember))
    assert out["loss_mia_tpr"] == 1.0
    assert 0 < out["loss_mia_fpr"] <= metrics.FPR


def _canary_rows(gen, n: int, first: int, width: int):
    """Random-label rows, each with one feature no other row has (set to 3): a row the model
    trained on can be memorised through it; a fresh row's feature was never trained."""
    x = torch.zeros(n, width)
    x[:, :16] = torch.randn(n, 16, generator=gen)
    x[torch.arange(n), first + torch.arange(n)] = 3.0
    return x.view(n, 1, 1, width), torch.randint(2, (n,), generator=gen)


def test_loss_mia_fires_on_memorised_rows_and_not_on_unseen_rows():
    gen = torch.Generator().manual_seed(0)
    n, width = 400, 16 + 200 + 2 * 400
    members = _canary_rows(gen, 200, 16, width)
    test = _canary_rows(gen, n, 16 + 200, width)
    unseen = _canary_rows(gen, n, 16 + 200 + n, width)
    model = seeded(lambda: mlp((1, 1, width), 2, width=64, depth=1), gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(members[0]), members[1]).backward()
        opt.step()
    model.eval()
    memorised = loss_mia(model, _mia_probe(members, test))
    assert memorised["loss_mia_tpr"] > 0.15 and memorised["loss_mia_fpr"] <= metrics.FPR
    # Rows never trained on are exchangeable with the test rows: TPR ~ Binomial(n, FPR) / n.
    calls = round(loss_mia(model, _mia_probe(unseen, test))["loss_mia_tpr"] * n)
    assert binom.sf(calls - 1, n, metrics.FPR) > 1e-3


def test_residual_interval_covers_the_true_r():
    """Paired units: a poisoned effect of 1, retrain 0, after 0.4 per unit, with unit noise that
    the three models share in part. Over 200 replicates the 95% interval covers r = 0.4 about
    95% of the time, and `resolution` is about 1.96 SE(gap) / gap."""
    gen = torch.Generator().manual_seed(0)
    n, covered, widths = 80, 0, []
    for _ in range(200):
        shared = torch.randn(n, generator=gen, dtype=torch.float64)
        own = torch.randn(3, n, generator=gen, dtype=torch.float64)
        before, after, retrain = 0.8 * shared + 0.6 * own + torch.tensor([[1.0], [0.4], [0.0]])
        lo, hi = residual_interval(before, after, retrain, gen)
        covered += lo <= 0.4 <= hi
        widths.append(resolution(before, retrain, gen))
    assert 0.90 <= covered / 200 <= 0.99
    # sd(before - retrain) = 0.6 * sqrt(2): resolution = 1.96 * 0.85 / sqrt(80) / 1 = 0.186
    assert np.median(widths) == pytest.approx(1.96 * 0.6 * 2**0.5 / n**0.5, rel=0.1)
    assert resolution(retrain, before, gen) == math.inf  # no effect: nothing to resolve


def test_summary_and_residual_arithmetic():
    s = summarise_scores(torch.tensor([-3.0, -1.0, 0.0, 0.0], dtype=torch.float64))
    assert s["gus"] == -1.0 and s["gus_z"] == -2.0
    assert math.isclose(s["gus_p"], 0.0455, abs_tol=1e-3) and s["tpr_at_1fpr"] == 0.25
    assert residual(0.5, 1.0, 0.0) == 0.5 and residual(1.2, 1.0, 0.0) == pytest.approx(1.2)
    assert math.isnan(residual(1.0, 1.0, 1.0))


def test_quickstart_poisoned_shows_poison_and_retrain_does_not(tmp_path):
    """The quickstart's science, at its real settings: detectable poison, clean retrain."""
    spec = load("search_spaces/quickstart.yaml")
    import json

    setup = prepare(json.dumps(spec.raw, sort_keys=True), open_store(str(tmp_path)).uri, spec.seed)
    before, retrain = setup.before, setup.retrain
    assert before["gus_z"] <= -5
    assert abs(retrain["gus_z"]) <= 3
    assert abs(before["control_gus_z"]) <= 3 and abs(retrain["control_gus_z"]) <= 3
    assert before["tpr_at_1fpr"] > retrain["tpr_at_1fpr"]
    assert abs(before["clean_acc_test"] - retrain["clean_acc_test"]) <= 0.03
    # r can be resolved (bench/science.py: 0.15-0.18 over 5 seeds x 2 thread counts) ...
    assert setup.attack_ok and setup.resolution <= 0.22
    assert before["gus_degenerate"] == retrain["gus_degenerate"] == 0
    # ... and the loss MIA can fire: it calls more poisons members on the model that fit them.
    assert before["loss_mia_tpr"] > retrain["loss_mia_tpr"]
    assert before["loss_mia_fpr"] <= 0.01 and retrain["loss_mia_fpr"] <= 0.01
