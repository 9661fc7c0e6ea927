"""The Gaussian Unlearning Score as science: exact N(0,1) null, batched == per-sample, real signal."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import kstest

from raysweep.metrics import gaussian_scores, input_gradients, residual, summarise_scores
from raysweep.models import mlp, seeded
from raysweep.spec import load
from raysweep.storage import open_store
from raysweep.trial import prepare


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
