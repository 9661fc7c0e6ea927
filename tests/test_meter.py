"""The budget meter grants what fits and never more."""

from __future__ import annotations

import torch

from raysweep.budget import FORWARD_ONLY, Meter, metered


def test_meter_caps_and_truncates_last_batch():
    m = Meter(100)
    assert m.take(64) == 64 and m.take(64) == 36 and m.take(64) == 0
    assert m.used == 100


def test_forward_only_costs_a_third():
    m = Meter(10)
    assert m.take(100, FORWARD_ONLY) == 30
    assert m.used <= m.cap


def test_metered_batches_stop_at_the_cap(gen):
    x, y = torch.randn(50, 3), torch.randint(0, 2, (50,))
    m = Meter(130)
    seen = sum(len(yb) for _, yb in metered(m, x, y, 16, gen))
    assert seen == 130 and m.used == 130
