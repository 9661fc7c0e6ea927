"""An autoscaling cluster simulated on this machine: cluster.yaml's node types on Ray's fake
multi-node provider (raysweep.runner.loopback.AutoscalingCluster), autoscaler v2 as `ray up` runs it.

GPU workers start from zero when a sweep asks for them, pack `gpu: 0.25` trials four to a
logical GPU, are released when idle, and one reclaimed mid-sweep (terminated through the
provider, as a spot node) loses no trial. Trials compute on the CPU: torch sees no CUDA.
Drivers run as `python -m raysweep` subprocesses with the cluster's environment (its token,
Ray's cluster mode off so that 127.0.0.1 stays 127.0.0.1).
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from test_cluster import (
    SLOW,
    _assert_complete,
    _env,
    _kill_group,
    _kill_mid_trial,
    _raysweep,
    _spec_file,
    _tail,
    _wait_rows,
)

from raysweep.analysis import results
from raysweep.base.storage import open_store
from raysweep.experiment import checkpoints
from raysweep.experiment.spec import validate
from raysweep.runner.loopback import AutoscalingCluster, peak_trials
from raysweep.runner.searcher import open_studies

REPO = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_S = 5.0
# Four trials to a logical GPU: a worker.gpu node (4 CPUs, 1 GPU) holds four of them. The
# quickstart's MLP, so that a trial lasts seconds and a reclaim lands inside one.
PACKED = SLOW | {
    "resources": {"cpu": 1, "gpu": 0.25},
    "dataset": {"name": "digits", "size": 32},
    "model": {"name": "mlp", "width": 512, "depth": 2},
}


@pytest.fixture(scope="module")
def autoscaling():
    """cluster.yaml's head (no trial CPUs) and worker.gpu type (min 0), started on 127.0.0.1."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cluster = AutoscalingCluster(_env() | {"PYTHONUNBUFFERED": "1"}, config, IDLE_TIMEOUT_S)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _studies_match_rows(spec, store, df: pd.DataFrame) -> None:
    """Each study's complete trials are the cell's rows; any other trial failed without a row
    (a run Tune ended without its row, planned again by the sweep's next pass)."""
    for name, study in open_studies(spec, store).items():
        rows = set(df.loc[df["cell"] == name, "trial_number"])
        trials = study.get_trials(deepcopy=False)
        complete = {t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
        assert complete == rows and len(rows) == spec.trials_per_cell, (name, complete, rows)
        others = [t for t in trials if t.number not in complete]
        assert all(t.state == optuna.trial.TrialState.FAIL for t in others), others


def _released(cluster: AutoscalingCluster, timeout: float) -> None:
    """Wait until no worker node is left."""
    deadline = time.monotonic() + timeout
    while cluster.workers():
        assert time.monotonic() < deadline, f"workers still up: {list(cluster.workers())}"
        time.sleep(0.2)


def _wait_line(log: Path, text: str, proc, timeout: float = 60) -> float:
    """time.time() once `text` is in the driver's log."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline and proc.poll() is None, _tail(log)
        time.sleep(0.05)
    return time.time()


@pytest.mark.integration
def test_workers_launch_from_zero_pack_four_per_gpu_and_are_released(autoscaling, tmp_path):
    """max_concurrent 8 with no worker up: the autoscaler launches two worker.gpu nodes, each
    runs four 0.25-GPU trials at once, and both are released once idle."""
    _released(autoscaling, 60)
    spec_path = _spec_file(tmp_path, **PACKED)
    spec = validate(yaml.safe_load(spec_path.read_text()), "slow")
    storage, log = str(tmp_path / "s"), tmp_path / "log"
    args = ("run", str(spec_path), "--storage", storage, "--address", autoscaling.address)
    driver = _raysweep(*args, "--max-concurrent", "8", log=log, env=autoscaling.env, wait=False)
    try:
        demand = _wait_line(log, "to run", driver)  # the driver then connects and asks
        driver.wait(timeout=240)
    finally:
        _kill_group(driver)
    assert driver.returncode == 0, _tail(log)
    df = results.read(open_store(storage), "slow")
    _assert_complete(df, spec)
    assert (df["status"] == "ok").all(), df["error"].unique()

    peaks = peak_trials(df)
    assert len(peaks) == 2, peaks  # 8 x 0.25 GPU: two 1-GPU workers, none of it on the head
    assert max(peaks.values()) == 4, peaks
    first = df["started_at"].min().timestamp() - demand
    assert 0 < first < 120, first  # demand -> first trial on a worker launched for it

    _released(autoscaling, IDLE_TIMEOUT_S + 60)
    # From the last trial's end: Tune's actors hold the workers until then, not after.
    released = time.time() - df["finished_at"].max().timestamp()
    assert released >= IDLE_TIMEOUT_S, released  # idle for the timeout, not at once
    print(f"peaks {peaks}, first trial {first:.1f}s after demand, released after {released:.1f}s")


@pytest.mark.integration
def test_reclaimed_worker_mid_sweep(autoscaling, tmp_path):
    """A worker terminated through the provider mid-trial: its trials are retried on a worker
    launched in its place; every trial ends exactly once and each checkpoint is trained once."""
    spec_path = _spec_file(tmp_path, **PACKED)
    spec = validate(yaml.safe_load(spec_path.read_text()), "slow")
    storage, log = str(tmp_path / "s"), tmp_path / "log"
    args = ("run", str(spec_path), "--storage", storage, "--address", autoscaling.address)
    driver = _raysweep(*args, "--max-concurrent", "4", log=log, env=autoscaling.env, wait=False)
    store = open_store(storage)
    try:
        _wait_rows(store, "slow", 1, driver, log, timeout=180)  # checkpoints trained by now
        busy = lambda: [n for n in autoscaling.workers() if autoscaling.running_trial(n)]
        reclaimed, reclaimed_at = _kill_mid_trial(busy, autoscaling.reclaim, driver, log)
        driver.wait(timeout=240)
    finally:
        _kill_group(driver)
    assert driver.returncode == 0, _tail(log)
    assert "its worker failed; retrying" in log.read_text()
    df = results.read(store, "slow")
    _assert_complete(df, spec)
    _studies_match_rows(spec, store, df)
    assert (df["status"] == "ok").all(), df["error"].unique()
    after = df[df["started_at"] > reclaimed_at]
    assert len(after) and not (after["node_id"] == reclaimed).any()
    for key in {*df["poisoned_key"], *df["retrain_key"]}:
        assert checkpoints.train_count(store, key) == 1
