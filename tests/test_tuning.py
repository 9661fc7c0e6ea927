"""Best-shot tuning: equal trials per cell, val for tuning and test for reports, studies that
resume where they stopped, and a confirm phase on fresh seeds that is idempotent."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from raysweep.analysis import results
from raysweep.base.storage import open_store
from raysweep.experiment.spec import SpecError, distributions, validate
from raysweep.experiment.trial import prepare
from raysweep.runner import sweep
from raysweep.runner.searcher import cell_name
from raysweep.science.data import DATASETS

# ---------------------------------------------------------------- confirm settings in the spec


def test_confirm_defaults_to_no_seeds(tiny_spec_dict):
    assert validate(tiny_spec_dict).raw["confirm"] == {"seeds": []}


@pytest.mark.parametrize(
    "confirm, message",
    [
        ({"seeds": [1, 1]}, "confirm.seeds: [1, 1] repeats a seed"),
        ({"seeds": [1, 0]}, "confirm.seeds: 0 is the tuning seed"),
        ({"seeds": [1, "2"]}, "confirm.seeds[1]: '2' is not int"),
        ({"seeds": 3}, "confirm.seeds: 3; allowed: a list of ints"),
        ({"seed": [1]}, "confirm: unknown key 'seed' (did you mean 'seeds'?)"),
        ([1, 2], "confirm: must be a mapping"),
    ],
)
def test_confirm_settings_are_validated(tiny_spec_dict, confirm, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        validate({**tiny_spec_dict, "confirm": confirm}, "spec.yaml")


# ---------------------------------------------------------------- the confirm plan


def _rows(spec, tune: list[tuple], confirm: list[tuple] = ()) -> pd.DataFrame:
    """Rows as results.read gives them: tune (cell, number, objective, feasible, hp) and
    confirm (cell, seed, tuned_trial, status)."""
    rows = []
    for cell, number, objective, feasible, hp in tune:
        method, budget = cell.split("-b")
        rows.append(
            {"phase": "tune", "status": "ok", "cell": cell, "trial_number": number,
             "tuned_trial": None, "seed": spec.seed, "objective": objective,
             "feasible": feasible, "attack": "gaussian", "method": method,
             "budget": float(budget), **hp}
        )  # fmt: skip
    for cell, seed, tuned, status in confirm:
        method, budget = cell.split("-b")
        rows.append(
            {"phase": "confirm", "status": status, "cell": cell, "trial_number": seed,
             "tuned_trial": tuned, "seed": seed, "attack": "gaussian", "method": method,
             "budget": float(budget)}
        )  # fmt: skip
    return pd.DataFrame(rows)  # hp_steps: floats with NaN, as Parquet ints with nulls read


def test_confirm_plan_reruns_the_best_on_missing_and_failed_seeds_only(tiny_spec_dict):
    spec = validate({**tiny_spec_dict, "confirm": {"seeds": [1, 2, 3]}})
    tune = [
        ("gd-b0.1", 0, 0.5, True, {"hp_lr": 0.1}),
        ("gd-b0.1", 1, 0.3, True, {"hp_lr": 0.01}),
        ("gd-b0.1", 2, 0.1, False, {"hp_lr": 1.0}),  # lower r, but breaks the utility constraint
        ("ga-b0.1", 0, 10.2, False, {"hp_lr": 1e-4, "hp_steps": 5.0}),
        ("ga-b0.1", 1, 10.1, False, {"hp_lr": 1e-5, "hp_steps": 7.0}),
    ]
    confirm = [("gd-b0.1", 1, 1, "ok"), ("gd-b0.1", 2, 1, "failed"), ("ga-b0.1", 1, 1, "ok")]
    plan = sweep.confirm_plan(spec, _rows(spec, tune, confirm))
    got = [(c["cell"], c["seed"], c["tuned_trial"]) for c in plan]
    assert got == [("ga-b0.1", 2, 1), ("gd-b0.1", 2, 1), ("ga-b0.1", 3, 1), ("gd-b0.1", 3, 1)]
    # The setting itself comes from the tuned trial in the journal (sweep.tuned_settings).
    assert all(c["phase"] == "confirm" and c["number"] == c["seed"] for c in plan)

    # More tuning found a better setting: every seed of that cell is re-run with it.
    better = [*tune, ("gd-b0.1", 3, 0.2, True, {"hp_lr": 0.02})]
    plan = sweep.confirm_plan(spec, _rows(spec, better, confirm))
    assert [(c["seed"], c["tuned_trial"]) for c in plan if c["cell"] == "gd-b0.1"] == [
        (1, 3),
        (2, 3),
        (3, 3),
    ]
    assert sweep.confirm_plan(validate(tiny_spec_dict), _rows(spec, tune, confirm)) == []


# ---------------------------------------------------------------- val tunes, test reports


def _relabel(split_name: str):
    """The digits dataset with one split's labels all wrong (shifted by one class)."""
    digits = DATASETS["digits"]

    @functools.wraps(digits)  # the spec is validated against this signature
    def corrupted(**kwargs):
        split = digits(**kwargs)
        y = getattr(split, f"y_{split_name}")
        return dataclasses.replace(split, **{f"y_{split_name}": (y + 1) % split.num_classes})

    return corrupted


def _trial(spec, store, monkeypatch, corrupt: str | None) -> tuple[dict, pd.DataFrame]:
    """One in-process trial (a setting that wrecks accuracy) on data with `corrupt` relabelled;
    returns its row and the report table's numbers for it."""
    config = {"phase": "tune", "cell": "ga-b0.1", "method": "ga", "budget": 0.1, "number": 0,
              "seed": spec.seed, "tuned_trial": None, "params": {"lr": 0.2, "steps": 5}}  # fmt: skip
    with monkeypatch.context() as m:
        if corrupt:
            m.setitem(DATASETS, "digits", _relabel(corrupt))
        prepare.cache_clear()  # the data, checkpoints and reference metrics are cached
        [row] = sweep.execute(spec, store, config)
    prepare.cache_clear()
    assert row["status"] == "ok", row["error"]
    table = results.table(pd.DataFrame([row])).set_index("method")
    return row, table[list(results.STATS) + [f"{s}_std" for s in results.STATS]]


def test_tuning_reads_only_val_and_the_report_only_test(tiny_spec_dict, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    spec, store = validate(tiny_spec_dict), open_store(str(tmp_path))
    base, base_report = _trial(spec, store, monkeypatch, None)
    val, val_report = _trial(spec, store, monkeypatch, "val")
    test, test_report = _trial(spec, store, monkeypatch, "test")
    tuning = ("objective", "feasible", "residual_val", "after_clean_acc_val")

    # The setting wrecks accuracy: infeasible on true val labels; with every val label wrong,
    # retrain's val accuracy is ~0 too, so the same trial becomes feasible. Tuning moved ...
    assert not base["feasible"] and val["feasible"]
    assert base["objective"] > 10 and val["objective"] == abs(val["residual_val"])
    # ... and the report did not.
    pd.testing.assert_frame_equal(val_report, base_report)

    # Wrong test labels move the report (accuracy, loss MIA) and nothing tuning reads.
    assert {k: test[k] for k in tuning} == {k: base[k] for k in tuning}
    assert (test_report["clean_acc"] != base_report["clean_acc"]).all()
    for model in ("poisoned", "retrain"):
        assert test_report.loc[model, "clean_acc"] < base_report.loc[model, "clean_acc"] - 0.5
    assert (
        test_report.loc["poisoned", "loss_mia_tpr"] != base_report.loc["poisoned", "loss_mia_tpr"]
    )
    assert test["residual"] == base["residual"]  # see below
    # The report averages the runs feasible on test: the wrecked model is not (its numbers are
    # hidden, and counted as 0 of 1 feasible) until wrong test labels wreck retrain's accuracy too.
    assert not base["feasible_test"] and test["feasible_test"]
    assert math.isnan(base_report.loc["ga", "residual"])
    assert test_report.loc["ga", "residual"] == test["residual"]
    # For the Gaussian attack r comes from the poisons' scores, which belong to no split, so
    # r on val and r on test are the same number (residual_val == residual).


# ---------------------------------------------------------------- a real sweep on local Ray


def _journal(storage: str, name: str) -> JournalStorage:
    return JournalStorage(JournalFileBackend(f"{storage}/{name}/optuna.journal"))


@pytest.mark.integration
def test_sweep_equal_trials_resume_continues_studies_confirm_is_idempotent(
    local_ray, tiny_spec_dict, tmp_path
):
    storage = str(tmp_path)
    spec = validate({**tiny_spec_dict, "confirm": {"seeds": [1]}})
    cells = [cell_name(m, b) for m, b in spec.cells()]

    df = sweep.run(spec, storage)
    tuned = df[df["phase"] == "tune"]
    assert tuned.groupby("cell").size().to_dict() == dict.fromkeys(cells, 2)
    # The studies are plain Optuna studies in a journal file (what optuna-dashboard opens).
    journal = _journal(storage, spec.name)
    assert sorted(optuna.get_all_study_names(journal)) == sorted(cells)
    first = {}
    for cell in cells:
        study = optuna.load_study(study_name=cell, storage=journal)
        assert [t.number for t in study.trials] == [0, 1]
        assert all(t.state.is_finished() for t in study.trials)
        first[cell] = [t.params for t in study.trials]
    # Confirmed: each distinct chosen row (a cell's best may be a smaller budget's row).
    confirmed = df[df["phase"] == "confirm"].set_index("cell")
    best = results.best_per_cell(df).drop_duplicates("cell").set_index("cell")
    assert (confirmed["seed"] == 1).all() and sorted(confirmed.index) == sorted(best.index)
    assert (confirmed["tuned_trial"] == best.loc[confirmed.index, "trial_number"]).all()

    # A driver killed mid-trial: a study holds a RUNNING trial whose row never reached storage.
    dists, _ = distributions("gd", spec.methods["gd"])
    optuna.load_study(study_name="gd-b0.05", storage=journal).ask(dists)

    more = validate({**tiny_spec_dict, "trials_per_cell": 3, "confirm": {"seeds": [1]}})
    df2 = sweep.run(more, storage)
    tuned2 = df2[df2["phase"] == "tune"]
    assert tuned2.groupby("cell").size().to_dict() == dict.fromkeys(cells, 3)
    journal = _journal(storage, spec.name)
    for cell in cells:
        trials = optuna.load_study(study_name=cell, storage=journal).trials
        assert [t.params for t in trials[:2]] == first[cell]  # continued, not restarted
        if cell == "gd-b0.05":  # the interrupted trial is FAIL and re-planned as number 3
            assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
            assert sorted(tuned2.loc[tuned2["cell"] == cell, "trial_number"]) == [0, 1, 3]
        else:
            assert [t.number for t in trials] == [0, 1, 2]

    # Confirm rows: still one per chosen row; re-run exactly where the best setting changed.
    confirmed2 = df2[df2["phase"] == "confirm"].set_index("cell")
    best2 = results.best_per_cell(df2).drop_duplicates("cell").set_index("cell")
    assert set(best2.index) <= set(confirmed2.index)
    assert (confirmed2.loc[best2.index, "tuned_trial"] == best2["trial_number"]).all()
    for cell in set(best2.index) & set(best.index):
        same = best2.loc[cell, "trial_number"] == best.loc[cell, "trial_number"]
        unchanged = confirmed2.loc[cell, "finished_at"] == confirmed.loc[cell, "finished_at"]
        assert unchanged == same


def test_tpe_vs_random_bench_runs_both_samplers_on_the_same_cells(capsys):
    path = Path(__file__).parents[1] / "bench" / "tpe_vs_random.py"
    loader = importlib.util.spec_from_file_location("tpe_vs_random", path)
    bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench)
    out = bench.main(["--trials", "3", "--repeats", "1"])
    assert set(out["curves"]) == {"gd-b0.1", "ngd-b0.1", "ga-b0.1"}
    for curves in out["curves"].values():
        for kind in ("tpe", "random"):
            (curve,) = curves[kind]
            assert len(curve) == 3 and all(a >= b for a, b in zip(curve, curve[1:]))
    assert "best feasible r on val after k trials" in capsys.readouterr().out
