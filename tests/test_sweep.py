"""A real sweep on local Ray: 2 cells x 2 trials -> Parquet with the documented columns."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from raysweep import cli
from raysweep.analysis import results
from raysweep.base.storage import open_store
from raysweep.experiment.checkpoints import train_count
from raysweep.experiment.spec import validate
from raysweep.experiment.trial import run_trial
from raysweep.runner import cluster, sweep
from raysweep.runner.rows import schema


def test_trial_runs_without_ray(tmp_path, tiny_spec_dict):
    spec, rows = validate(tiny_spec_dict), []
    row = run_trial(spec, open_store(str(tmp_path)), "gd", 0.05, {"lr": 0.01}, 0, rows.append)
    assert rows == [row] and 0 < row["budget_used"] <= 1
    again = run_trial(spec, open_store(str(tmp_path)), "gd", 0.05, {"lr": 0.01}, 0, rows.append)
    assert again["after_gus"] == row["after_gus"]  # same seed, same result


@pytest.mark.integration
def test_sweep_two_cells_two_trials(tmp_path, tiny_spec_dict, local_ray, monkeypatch):
    tiny_spec_dict["budgets"] = [0.05]
    spec = validate(tiny_spec_dict)
    monkeypatch.chdir(tmp_path)  # a relative --storage must mean the same place in Ray workers
    df = sweep.run(spec, ".")
    back = pd.read_parquet(tmp_path / "tiny" / "results")
    assert len(back) == len(df) == 4
    assert set(schema(spec).names) == set(back.columns)
    assert (back.groupby("cell").size() == 2).all()
    assert (back["status"] == "ok").all(), back["error"].tolist()
    assert back[["cell", "trial_number"]].duplicated().sum() == 0
    assert ((back["budget_used"] > 0) & (back["budget_used"] <= 1)).all()
    assert set(back["hp_steps"].dropna()) == {5}
    store = open_store(str(tmp_path))
    for key in set(back["poisoned_key"]) | set(back["retrain_key"]):
        assert train_count(store, key) == 1
    # Running the same spec again over its complete experiment adds no rows, and the CLI's
    # plain `run` allows it (so `make quickstart` twice just reprints the table).
    assert len(sweep.run(spec, str(tmp_path))) == 4
    cluster.check_resume(spec, store, False, results.read(store, spec.name))


@pytest.mark.integration
def test_a_run_reads_its_rows_once_per_phase(tmp_path, tiny_spec_dict, local_ray, monkeypatch):
    """`raysweep run` reads results/ (on an object store a LIST and a GET per row) once per
    phase and passes the rows along: when it starts (preflight, resume rules, the studies), when
    tuning ends (the confirm plan) and when confirming ends (the run's record, the summary)."""
    raw = tiny_spec_dict | {"budgets": [0.05], "trials_per_cell": 1, "confirm": {"seeds": [1]}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    reads, read = [], results.read

    def counted(store, experiment):
        df = read(store, experiment)
        reads.append(len(df))  # how many rows each read found: which phase it was
        return df

    monkeypatch.setattr(results, "read", counted)
    run = ["run", str(tmp_path / "tiny.yaml"), "--storage", str(tmp_path / "runs")]
    assert cli.main(run) == 0
    assert reads == [0, 2, 4]  # nothing yet; gd's and ga's tuning rows; and their confirm rows
    reads.clear()
    assert cli.main(run) == 0  # the same spec over its complete experiment: nothing runs
    assert reads == [4]
