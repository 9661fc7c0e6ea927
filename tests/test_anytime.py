"""Anytime budgets: one run measured at every budget it passes through equals separate runs;
the sweep turns it into a trial of every cell, and a cell's best may come from a smaller one."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from conftest import sweep_in_process

from raysweep.analysis import results
from raysweep.base.storage import open_store
from raysweep.experiment.spec import validate
from raysweep.experiment.trial import run_trial
from raysweep.runner import sweep
from raysweep.runner.searcher import CellSearcher, open_studies, reconcile
from raysweep.science.budget import Meter, metered
from raysweep.science.models import MODELS, seeded
from raysweep.unlearning import unlearners as U

SHAPE, CLASSES = (3, 16, 16), 10
ANYTIME = sorted(set(U.UNLEARNERS) - U.PER_BUDGET)
STOPS = (50.0, 110.0)  # units: batches of 64 straddle both, so both split a batch
CAP = 200.0


pytestmark = pytest.mark.usefixtures("one_thread")


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
def test_a_stop_equals_a_separate_run_to_it_bit_for_bit(method, model_name, data):
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
    # The rows are the same shuffled stream as without stops, only cut at 10 and 25.
    plain = torch.cat([yb for _, yb in metered(Meter(40), x, y, 16, gen.manual_seed(0))])
    gen.manual_seed(0)
    cut = torch.cat([yb for _, yb in metered(Meter(40, (10.0, 25.0)), x, y, 16, gen)])
    assert torch.equal(plain, cut)


def test_stops_a_run_never_reaches_see_its_final_state():
    stops = []
    meter = Meter(100, (20.0, 60.0), stops.append)
    assert meter.take(30) == 20 and meter.take(5) == 5 and stops == [20.0]
    meter.finish()
    assert stops == [20.0, 60.0] and meter.used == 25


@pytest.mark.parametrize("method, params", [("gd", {"lr": 0.01}), ("ga", {"lr": 1e-4, "steps": 5})])
def test_a_stop_row_equals_a_separate_trial_at_that_budget(
    method, params, tiny_spec_dict, tmp_path
):
    spec = validate({**tiny_spec_dict, "budgets": [0.02, 0.05, 0.1]})
    store = open_store(str(tmp_path))
    rows = []
    final = run_trial(spec, store, method, 0.1, params, 0, rows.append, stops=(0.02, 0.05))
    assert [r["budget"] for r in rows] == [0.02, 0.05, 0.1] and rows[-1] is final
    for i, budget in enumerate((0.02, 0.05)):
        below = (0.02,)[:i]  # a run at 0.05 is measured at 0.02 too, and split there
        alone = run_trial(spec, store, method, budget, params, 0, lambda r: None, stops=below)
        for key, value in alone.items():
            if key != "wall_s":
                assert rows[i][key] == value or (value != value and rows[i][key] != rows[i][key]), (
                    key
                )


def test_per_budget_methods_refuse_stops(tiny_spec_dict, tmp_path):
    spec = validate({**tiny_spec_dict, "methods": {"l1_sparse": {"lr": 0.01}}})
    with pytest.raises(ValueError, match="l1_sparse: its runs are not prefixes"):
        run_trial(spec, open_store(str(tmp_path)), "l1_sparse", 0.1, {}, 0, print, stops=(0.05,))


# ---------------------------------------------------------------- the sweep: one run, every cell

BUDGETS = [0.02, 0.05, 0.1]
LR = {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}


@pytest.fixture
def anytime_spec(tiny_spec_dict):
    methods = {"gd": LR, "l1_sparse": LR}  # a prefix method and a PER_BUDGET one
    return validate({**tiny_spec_dict, "budgets": BUDGETS, "methods": methods})


def test_a_run_is_a_trial_of_every_cell_and_each_study_is_told_its_row(anytime_spec, tmp_path):
    spec, storage = anytime_spec, str(tmp_path)
    df = sweep_in_process(spec, storage)
    assert (df["status"] == "ok").all() and (df.groupby("cell").size() == 2).all()
    # gd: 2 runs at 10 %, each measured at all three budgets with one setting; l1_sparse: a run
    # per cell. Every cell observed trials_per_cell settings.
    gd, l1 = df[df["method"] == "gd"], df[df["method"] == "l1_sparse"]
    runs = sorted(gd["run_of"].unique())
    assert runs == ["gd-b0.1:0", "gd-b0.1:1"]
    assert all(sorted(gd.loc[gd["run_of"] == r, "budget"]) == BUDGETS for r in runs)
    assert (df.groupby("run_of")["hp_lr"].nunique() == 1).all()
    assert (l1["run_of"] == l1["cell"] + ":" + l1["trial_number"].astype(str)).all()
    journal = open_studies(spec, open_store(storage))
    for cell, rows in df.groupby("cell"):
        trials = journal[cell].get_trials(deepcopy=False)
        assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
        by_number = rows.set_index("trial_number")
        assert [t.value for t in trials] == list(by_number.loc[[0, 1], "objective"])
        assert [t.params["lr"] for t in trials] == list(by_number.loc[[0, 1], "hp_lr"])
    # A stop's row is the separate run at its budget (same setting and trial number).
    row = gd[gd["cell"] == "gd-b0.05"].iloc[0]
    lead = int(row["run_of"].split(":")[1])
    args = ("gd", 0.05, {"lr": row["hp_lr"]}, lead)
    alone = run_trial(spec, open_store(storage), *args, lambda r: None, stops=(0.02,))
    assert alone["residual"] == row["residual"] and alone["budget_units"] == row["budget_units"]


def test_a_failing_run_keeps_the_rows_of_the_budgets_it_passed(anytime_spec, tmp_path, monkeypatch):
    @functools.wraps(U.gd)
    def crashes_at_the_end(*args, **kwargs):
        U.gd(*args, **kwargs)
        raise RuntimeError("boom")

    spec, store = anytime_spec, open_store(str(tmp_path))
    studies = open_studies(spec, store)
    searcher = CellSearcher(spec, studies, {})
    config = searcher.suggest("t")
    assert config["cell"] == "gd-b0.1" and [c[:2] for c in config["stops"]] == [
        ["gd-b0.02", 0.02],
        ["gd-b0.05", 0.05],
    ]
    monkeypatch.setitem(U.UNLEARNERS, "gd", crashes_at_the_end)
    rows = sweep.execute(spec, store, config)
    assert [(r["cell"], r["status"]) for r in rows] == [
        ("gd-b0.02", "ok"),
        ("gd-b0.05", "ok"),
        ("gd-b0.1", "failed"),
    ]
    assert rows[-1]["error"] == "RuntimeError: boom"
    searcher.on_trial_complete("t", sweep.reported(rows))
    states = {c: studies[c].trials[0].state.name for c in ("gd-b0.02", "gd-b0.05", "gd-b0.1")}
    assert states == {"gd-b0.02": "COMPLETE", "gd-b0.05": "COMPLETE", "gd-b0.1": "FAIL"}


def test_an_interrupted_run_fails_in_every_cell_and_is_planned_again(anytime_spec, tmp_path):
    spec, store = anytime_spec, open_store(str(tmp_path))
    CellSearcher(spec, open_studies(spec, store), {}).suggest("t")  # the driver dies here
    studies = open_studies(spec, store)
    searcher = CellSearcher(spec, studies, reconcile(studies, results.read(store, spec.name)))
    for cell in ("gd-b0.02", "gd-b0.05", "gd-b0.1"):
        assert [t.state.name for t in studies[cell].trials] == ["FAIL"]
    config = searcher.suggest("t")
    assert config["number"] == 1 and [c[2] for c in config["stops"]] == [1, 1]
    assert searcher.remaining == 2 * 4 - 1  # gd's lead and l1_sparse's three cells, 2 runs each


# ---------------------------------------------------------------- a method may stop early


def test_the_tables_best_per_method_never_gets_worse_with_the_budget(finished_run):
    df = pd.read_parquet(f"{finished_run}/results")
    table = results.table(df)
    cells = table[table["source"] != "reference"]
    tune = df[df["phase"] == "tune"].set_index(["method", "budget", "trial_number"])
    chosen = [tune.loc[(r.method, r.from_budget, r.tuned_trial)] for r in cells.itertuples()]
    cells = cells.assign(objective=[r["objective"] for r in chosen])
    assert (cells["from_budget"] <= cells["budget"]).all()
    for _, g in cells.sort_values("budget").groupby("method"):
        assert g["objective"].is_monotonic_decreasing, g[["budget", "from_budget", "objective"]]


def test_a_cell_may_choose_a_smaller_budgets_row_and_confirms_it_there(tiny_spec_dict):
    spec = validate({**tiny_spec_dict, "confirm": {"seeds": [1, 2]}})
    tune = [("gd-b0.05", 0.05, 0, 0.2), ("gd-b0.1", 0.1, 0, 0.3), ("gd-b0.1", 0.1, 1, 0.25)]
    df = pd.DataFrame(
        [
            {"phase": "tune", "status": "ok", "attack": "gaussian", "method": "gd", "cell": cell,
             "budget": budget, "trial_number": n, "objective": obj, "feasible": True,
             "seed": 0, "tuned_trial": None, "hp_lr": obj / 10, "hp_steps": None}
            for cell, budget, n, obj in tune
        ]
    )  # fmt: skip
    best = results.best_per_cell(df)
    assert list(zip(best["budget"], best["from_budget"], best["cell"])) == [
        (0.05, 0.05, "gd-b0.05"),
        (0.1, 0.05, "gd-b0.05"),  # 0.2 at 5 % beats 0.25 at 10 %: the 10 % run may stop at 5 %
    ]
    plan = sweep.confirm_plan(spec, df)  # one re-run per seed serves both cells
    assert [(c["cell"], c["budget"], c["seed"], c["tuned_trial"]) for c in plan] == [
        ("gd-b0.05", 0.05, 1, 0),
        ("gd-b0.05", 0.05, 2, 0),
    ]
    assert "stops" not in plan[0]  # its setting: the journal's (sweep.tuned_settings)


def test_the_anytime_bench_compares_both_designs_on_the_same_cells(capsys):
    path = Path(__file__).parents[1] / "bench" / "anytime.py"
    loader = importlib.util.spec_from_file_location("anytime_bench", path)
    bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench)
    out = bench.main(["--trials", "2", "--repeats", "2", "--methods", "gd"])
    assert out["cells"] == 2 * len(bench.BUDGETS)
    # Equal settings: per cell pays every budget of the grid, anytime only the largest.
    assert out["units_ratio"] == pytest.approx(sum(bench.BUDGETS) / max(bench.BUDGETS), rel=0.02)
    for key in ("cells_no_worse", "cells_no_worse_at_target", "cells_no_worse_noise_floor"):
        assert 0 <= out[key] <= out["cells"]
    assert out["worse_mean"] <= out["worse_hi"]
    assert "noise floor" in capsys.readouterr().out
