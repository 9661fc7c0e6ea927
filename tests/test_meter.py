"""The budget meter grants what fits and never more."""

from __future__ import annotations

import torch

from raysweep.science import budget
from raysweep.science.budget import Meter, forward_cost, metered
from raysweep.science.models import MODELS


def test_meter_caps_and_truncates_last_batch():
    m = Meter(100)
    assert m.take(64) == 64 and m.take(64) == 36 and m.take(64) == 0
    assert m.used == 100


def test_fractional_cost_grants_what_fits():
    m = Meter(10)
    assert m.take(100, 0.4) == 25 and m.take(1, 0.4) == 0
    assert m.used <= m.cap


def test_forward_cost_is_counted_per_model_config_once(monkeypatch):
    x = torch.zeros(1, 1, 8, 8)
    mlp, cnn = MODELS["mlp"]((1, 8, 8), 10, width=16), MODELS["cnn"]((1, 8, 8), 10, width=4)
    costs = {name: forward_cost(m, x) for name, m in (("mlp", mlp), ("cnn", cnn))}
    # Per model, not one constant; each a forward's share, below a whole unit.
    assert costs["mlp"] != costs["cnn"] and all(0 < c < 1 for c in costs.values())
    monkeypatch.setattr(budget, "flops", lambda fn: 1 / 0)  # a second count would raise
    again = MODELS["mlp"]((1, 8, 8), 10, width=16)  # another model of the same config
    assert forward_cost(again, torch.ones(5, 1, 8, 8)) == costs["mlp"]


def test_metered_batches_stop_at_the_cap(gen):
    x, y = torch.randn(50, 3), torch.randint(0, 2, (50,))
    m = Meter(130)
    seen = sum(len(yb) for _, yb in metered(m, x, y, 16, gen))
    assert seen == 130 and m.used == 130
