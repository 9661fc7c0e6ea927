"""MLflow tracking for `raysweep run SPEC --mlflow URI` (the optional extra `raysweep[mlflow]`,
built on mlflow-skinny: the full `mlflow` package pins pyarrow below what raysweep uses).

One MLflow experiment per raysweep experiment (same name), one MLflow run per Parquet row: its
cell, phase, attack, method, budget, seed and hyperparameters as params, every number of the row
as a metric, its status and provenance as tags, its start and end as the run's. The Parquet rows
stay the record: runs are logged from them once the sweep returns, so a resumed or re-run sweep
logs only the rows that are new or were replaced (a re-run confirm seed), never a duplicate.
Part of the run, not of the report: a row's params are typed by its method's signature
(rows.params_of), which takes the unlearners and so torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from raysweep.analysis import results
from raysweep.experiment.spec import Spec

from . import rows

EXTRA = "raysweep[mlflow]"
ROW_TAG = "raysweep.row"  # which Parquet row a run is: <phase>-<cell>-<trial_number>
FINISHED_TAG = "raysweep.finished_at"  # tells a replaced row from the one already logged
PARAMS = ("cell", "phase", "attack", "method", "budget", "seed", "trial_number", "tuned_trial")
TAGS = (
    "status",
    "error",
    "infeasible_reason",
    "spec_hash",
    "poisoned_key",
    "retrain_key",
    "host",
    "node_id",
    "versions",
)
FLAGS = ("attack_ok", "feasible", "feasible_test")  # booleans, logged as 0/1 metrics


class TrackingError(RuntimeError):
    """MLflow is missing or refused the tracking URI, said in one line."""


@dataclass(frozen=True)
class Tracker:
    client: object  # mlflow.MlflowClient
    experiment_id: str


def connect(uri: str, experiment: str) -> Tracker:
    """MLflow's client on URI and the experiment's id (created if new), before any compute."""
    try:
        # Imported here, not at the top: MLflow is an optional extra, and this is its one user.
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise TrackingError(
            f"--mlflow needs MLflow, which is not installed: pip install '{EXTRA}'"
        ) from None
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        eid = found.experiment_id if found else client.create_experiment(experiment)
    except MlflowException as e:
        raise TrackingError(f"--mlflow {uri}: {str(e.message).splitlines()[0]}") from None
    return Tracker(client, eid)


def row_key(row: dict) -> str:
    return f"{row['phase']}-{row['cell']}-{int(row['trial_number']):04d}"


def metrics_of(row: dict) -> dict[str, float]:
    """Every number of the row MLflow can hold as a metric (nulls and NaN left out)."""
    names = [c for c, column in results.COLUMNS.items() if column.type == pa.float64()]
    names += list(results.measured_columns())
    out = {n: float(row[n]) for n in names if row.get(n) is not None}
    out |= {n: float(bool(row[n])) for n in FLAGS if row.get(n) is not None}
    return {n: v for n, v in out.items() if not math.isnan(v)}


def params_of(spec: Spec, row: dict) -> dict[str, str]:
    """The row's cell and design as params, and its hyperparameters as its method takes them."""
    design = {n: row[n] for n in PARAMS if row.get(n) is not None and not pd.isna(row[n])}
    design |= {n: int(design[n]) for n in ("seed", "trial_number", "tuned_trial") if n in design}
    return {k: str(v) for k, v in (design | rows.params_of(spec, row)).items()}


def _ms(t) -> int | None:
    return None if t is None or pd.isna(t) else int(pd.Timestamp(t).timestamp() * 1000)


def _logged(tracker: Tracker) -> dict[str, tuple[str, str]]:
    """The runs already in the experiment: row key -> (run id, finished_at tag)."""
    out, token = {}, None
    while True:
        page = tracker.client.search_runs([tracker.experiment_id], page_token=token)
        for run in page:
            tags = run.data.tags
            out[tags.get(ROW_TAG)] = (run.info.run_id, tags.get(FINISHED_TAG))
        token = page.token
        if not token:
            return out


def log_rows(tracker: Tracker, spec: Spec, df: pd.DataFrame) -> int:
    """Log each row not in the experiment yet (or replaced since) as one run; how many logged."""
    from mlflow.entities import Metric, Param, RunTag  # the extra, as in `connect`

    logged = _logged(tracker)
    client, n = tracker.client, 0
    for row in df.to_dict("records"):
        key, finished = row_key(row), str(row.get("finished_at"))
        if key in logged:
            if logged[key][1] == finished:
                continue
            client.delete_run(logged[key][0])  # the row was replaced (confirm re-run)
        tags = {t: str(row[t])[:5000] for t in TAGS if row.get(t) is not None}
        tags |= {ROW_TAG: key, FINISHED_TAG: finished}
        run = client.create_run(
            tracker.experiment_id, start_time=_ms(row.get("started_at")), run_name=key
        )
        at = _ms(row.get("finished_at")) or 0
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, at, 0) for k, v in metrics_of(row).items()],
            params=[Param(k, v) for k, v in params_of(spec, row).items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        status = "FINISHED" if row["status"] == "ok" else "FAILED"
        client.set_terminated(run.info.run_id, status, end_time=_ms(row.get("finished_at")))
        n += 1
    return n
