"""Anytime budgets: one run measured at every budget it passes through equals separate runs."""

from __future__ import annotations

import pytest
import torch

from raysweep import unlearners as U
from raysweep.budget import Meter, metered
from raysweep.models import MODELS, seeded
from raysweep.spec import validate
from raysweep.storage import open_store
from raysweep.trial import run_trial

SHAPE, CLASSES = (3, 16, 16), 10
ANYTIME = sorted(set(U.UNLEARNERS) - U.PER_BUDGET)
STOPS = (50.0, 110.0)  # units: batches of 64 straddle both, so both split a batch
CAP = 200.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    retain = (torch.randn(64, *SHAPE, generator=g), torch.randint(0, CLASSES, (64,), generator=g))
    forget = (
        3 * torch.randn(16, *SHAPE, generator=g),
        torch.randint(0, CLASSES, (16,), generator=g),
    )
    return forget, retain


def run(method, model_name, data, cap, stops, at=lambda units, model: None):
    kwargs = {"mlp": {"width": 32}, "resnet18": {"width": 8}}[model_name]
    build = lambda: MODELS[model_name](SHAPE, CLASSES, **kwargs)
    model = seeded(build, torch.Generator().manual_seed(0))
    meter = Meter(cap, stops, lambda units: at(units, model))
    U.UNLEARNERS[method](model, *data, meter, torch.Generator().manual_seed(3))
    meter.finish()
    return model, meter


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_name", ["mlp", "resnet18"])
@pytest.mark.parametrize("method", ANYTIME)
def test_a_checkpoint_equals_a_separate_run_to_it_bit_for_bit(method, model_name, data):
    seen = {}
    _, meter = run(method, model_name, data, CAP, STOPS, lambda u, m: seen.update({u: snapshot(m)}))
    assert sorted(seen) == list(STOPS) and meter.used <= CAP
    for i, stop in enumerate(STOPS):
        alone, _ = run(method, model_name, data, stop, STOPS[:i])
        for name, value in snapshot(alone).items():
            assert torch.equal(seen[stop][name], value), (method, stop, name)


def test_the_meter_splits_a_straddling_batch_and_uses_both_parts(gen):
    x, y = torch.arange(40.0)[:, None], torch.arange(40)
    stops = []
    meter = Meter(40, (10.0, 25.0), stops.append)
    sizes = [len(yb) for _, yb in metered(meter, x, y, 16, gen)]
    assert sizes == [10, 6, 9, 7, 8] and stops == [10.0, 25.0] and meter.used == 40
    # The rows are the same shuffled stream as without checkpoints, only cut at 10 and 25.
    plain = torch.cat([yb for _, yb in metered(Meter(40), x, y, 16, gen.manual_seed(0))])
    gen.manual_seed(0)
    cut = torch.cat([yb for _, yb in metered(Meter(40, (10.0, 25.0)), x, y, 16, gen)])
    assert torch.equal(plain, cut)


def test_checkpoints_a_run_never_reaches_see_its_final_state():
    stops = []
    meter = Meter(100, (20.0, 60.0), stops.append)
    assert meter.take(30) == 20 and meter.take(5) == 5 and stops == [20.0]
    meter.finish()
    assert stops == [20.0, 60.0] and meter.used == 25


@pytest.mark.parametrize("method, params", [("gd", {"lr": 0.01}), ("ga", {"lr": 1e-4, "steps": 5})])
def test_a_checkpoint_row_equals_a_separate_trial_at_that_budget(
    method, params, tiny_spec_dict, tmp_path
):
    spec = validate({**tiny_spec_dict, "budgets": [0.02, 0.05, 0.1]})
    store = open_store(str(tmp_path))
    rows = []
    final = run_trial(spec, store, method, 0.1, params, 0, rows.append, checkpoints=(0.02, 0.05))
    assert [r["budget"] for r in rows] == [0.02, 0.05, 0.1] and rows[-1] is final
    for i, budget in enumerate((0.02, 0.05)):
        below = (0.02,)[:i]  # a run at 0.05 is measured at 0.02 too, and split there
        alone = run_trial(spec, store, method, budget, params, 0, lambda r: None, checkpoints=below)
        for key, value in alone.items():
            if key != "wall_s":
                assert rows[i][key] == value or (value != value and rows[i][key] != rows[i][key]), (
                    key
                )


def test_per_budget_methods_refuse_checkpoints(tiny_spec_dict, tmp_path):
    spec = validate({**tiny_spec_dict, "methods": {"l1_sparse": {"lr": 0.01}}})
    with pytest.raises(ValueError, match="l1_sparse: its runs are not prefixes"):
        run_trial(
            spec, open_store(str(tmp_path)), "l1_sparse", 0.1, {}, 0, print, checkpoints=(0.05,)
        )
