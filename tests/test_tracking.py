"""`raysweep run SPEC --mlflow URI`: read back with MLflow's own client, the runs and their
metrics are the Parquet rows; without the extra, one line naming it."""

from __future__ import annotations

import math
import shutil
import sys

import pandas as pd
import pyarrow as pa
import pytest
import yaml
from conftest import TINY_SPEC

from raysweep.analysis import results
from raysweep.cli import main


def _spec_file(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_SPEC, "confirm": {"seeds": [1, 2]}}))
    return str(path)


def _copy(finished_run: str, tmp_path) -> str:
    storage = tmp_path / "storage"
    shutil.copytree(finished_run, storage / "tiny")
    return str(storage)


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_mlflow_runs_are_the_parquet_rows(finished_run, tmp_path, monkeypatch, capsys, store):
    mlflow = pytest.importorskip("mlflow")  # the extra; `make test` installs it (in dev)
    if store == "file":  # MLflow 3 keeps the file store only on request
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage, spec = _copy(finished_run, tmp_path), _spec_file(tmp_path)
    # The experiment is complete: `run` starts no Ray, reprints the table and logs every row.
    assert main(["run", spec, "--storage", storage, "--mlflow", uri]) == 0
    df = pd.read_parquet(f"{storage}/tiny/results")
    assert f"MLflow: {len(df)} new runs in experiment 'tiny'" in capsys.readouterr().out

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    # one run per row, names unique (8 tuning rows; confirm rows: one per chosen run and seed)
    assert len(runs) == len(df) and set(df["phase"]) == {"tune", "confirm"}
    numbers = [c for c, column in results.COLUMNS.items() if column.type == pa.float64()]
    numbers += list(results.measured_columns())
    for row in df.to_dict("records"):
        run = runs[f"{row['phase']}-{row['cell']}-{row['trial_number']:04d}"]
        params = run.data.params
        assert params["cell"] == row["cell"] and params["phase"] == row["phase"]
        assert params["method"] == row["method"] and float(params["budget"]) == row["budget"]
        assert int(params["seed"]) == row["seed"]
        if row["phase"] == "confirm":
            assert int(params["tuned_trial"]) == row["tuned_trial"]
        for name in TINY_SPEC["methods"][row["method"]]:
            assert float(params[name]) == row[f"hp_{name}"]  # lr, steps: each as its own param
        want = {c: row[c] for c in numbers if row[c] is not None and not math.isnan(row[c])}
        want |= {c: float(row[c]) for c in ("attack_ok", "feasible", "feasible_test")}
        assert run.data.metrics == want
        assert run.info.status == ("FINISHED" if row["status"] == "ok" else "FAILED")
        assert run.info.start_time == int(row["started_at"].timestamp() * 1000)
        assert run.info.end_time == int(row["finished_at"].timestamp() * 1000)
        assert run.data.tags["spec_hash"] == row["spec_hash"]

    # Logging again (a resumed or repeated run) adds nothing.
    assert main(["run", spec, "--storage", storage, "--mlflow", uri]) == 0
    assert "MLflow: 0 new runs" in capsys.readouterr().out
    assert len(client.search_runs([experiment.experiment_id])) == len(df)


def test_mlflow_without_the_extra_fails_in_one_line_before_any_compute(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    storage = tmp_path / "storage"
    argv = ["run", _spec_file(tmp_path), "--storage", str(storage), "--mlflow", "sqlite:///x.db"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'raysweep[mlflow]'" in err
    assert not (storage / "tiny" / "results").exists()  # nothing ran
