"""A real sweep on local Ray: 2 cells x 2 trials -> Parquet with the documented columns."""

from __future__ import annotations

import pandas as pd
import pytest

from raysweep.analysis import results
from raysweep.base.storage import open_store
from raysweep.experiment.checkpoints import train_count
from raysweep.experiment.spec import validate
from raysweep.experiment.trial import run_trial
from raysweep.runner import cluster, sweep


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
    assert set(results.schema(spec).names) == set(back.columns)
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
    cluster.check_resume(spec, store, resume=False)
