"""Autoscaling: cluster.yaml's node types simulated on this machine (raysweep.runner.loopback's
AutoscalingCluster: Ray's fake multi-node provider, autoscaler v2 as `ray up` runs it).

Sweeps of 0.25-GPU trials on logical GPUs (torch sees no CUDA: they compute on the CPU):
- from zero workers with max_concurrent 8: packing (most trials at once on one 1-GPU worker,
  from the rows), scale-up delay (the driver's demand -> a worker's raylet up -> the first
  trial on it), idle release (the last trial's end -> no worker left);
- max_concurrent 4 with its worker reclaimed through the provider mid-trial (a spot node):
  trials retried, rows lost and duplicated, trainings per checkpoint key.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from raysweep.analysis import results
from raysweep.base.storage import open_store
from raysweep.experiment import checkpoints
from raysweep.runner.loopback import AutoscalingCluster, peak_trials

REPO = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_S = 5.0
SPEC = {
    "name": "packed",
    "dataset": {"name": "digits", "size": 16},
    "model": {"name": "mlp", "width": 64, "depth": 1},
    "attack": {"name": "gaussian", "n": 30, "eps": 2.0},
    "train": {"epochs": 8, "lr": 0.05, "batch_size": 64},
    "methods": {"gd": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}},
    "budgets": [1.0],
    "trials_per_cell": 8,
    "delta": 0.05,
    "seed": 0,
    "resources": {"cpu": 1, "gpu": 0.25},
}


def _driver(cluster: AutoscalingCluster, storage: str, name: str, slots: int, log: Path):
    """`raysweep run` as a user submits it to the cluster, `slots` trials at once."""
    path = Path(storage).parent / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(copy.deepcopy(SPEC) | {"name": name}))
    cmd = [sys.executable, "-m", "raysweep", "run", str(path), "--storage", storage]
    cmd += ["--address", cluster.address, "--max-concurrent", str(slots)]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)


def _until(check, timeout: float, what: str) -> float:
    """time.time() once check() holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {timeout:.0f}s")
        time.sleep(0.05)
    return time.time()


def _busy(cluster: AutoscalingCluster) -> list[str]:
    """The worker nodes executing a trial now."""
    return [n for n in cluster.workers() if cluster.running_trial(n)]


def scale(cluster: AutoscalingCluster, storage: str) -> dict:
    """From zero workers, 8 trials at once: launch, packing and idle release."""
    log = Path(storage).parent / "scale.log"  # _driver makes the folder
    driver = _driver(cluster, storage, "scale", 8, log)
    demand = _until(lambda: "to run" in log.read_text(errors="replace"), 120, "driver")
    up = _until(cluster.workers, 120, "worker")
    driver.wait(timeout=300)
    if driver.returncode != 0:
        raise RuntimeError(log.read_text()[-3000:])
    released = _until(lambda: not cluster.workers(), IDLE_TIMEOUT_S + 120, "release")
    df = results.read(open_store(storage), "scale")
    peaks = peak_trials(df)
    return {
        "trials": len(df),
        "workers_used": len(peaks),
        "peak_trials_per_gpu": max(peaks.values()),
        "demand_to_worker_up_s": up - demand,
        "demand_to_first_trial_s": df["started_at"].min().timestamp() - demand,
        "idle_timeout_s": IDLE_TIMEOUT_S,
        # From the last trial's end: Tune's actors hold the worker until then, not after.
        "idle_release_s": released - df["finished_at"].max().timestamp(),
    }


def reclaim(cluster: AutoscalingCluster, storage: str) -> dict:
    """4 trials at once on one worker, reclaimed through the provider mid-trial."""
    log = Path(storage).parent / "reclaim.log"
    store = open_store(storage)
    driver = _driver(cluster, storage, "reclaim", 4, log)
    _until(lambda: len(results.read(store, "reclaim")) > 0, 240, "row")  # checkpoints made
    while not (busy := _busy(cluster)):  # reclaim mid-trial, not between two
        time.sleep(0.05)
    cluster.reclaim(busy[0])
    reclaimed = time.time()
    replaced = _until(lambda: set(cluster.workers()) - {busy[0]}, 120, "replacement")
    driver.wait(timeout=300)
    df = results.read(store, "reclaim")
    keys = {*df["poisoned_key"], *df["retrain_key"]}
    return {
        "exit_code": driver.returncode,
        "trials_planned": SPEC["trials_per_cell"],
        "trials_retried": log.read_text().count("its worker failed; retrying"),
        "rows_lost": SPEC["trials_per_cell"]
        - df[["cell", "trial_number"]].drop_duplicates().shape[0],
        "rows_duplicated": int(df.duplicated(["phase", "cell", "trial_number"]).sum()),
        "trainings_per_checkpoint": max(checkpoints.train_count(store, k) for k in keys),
        "reclaim_to_replacement_up_s": replaced - reclaimed,
    }


def main() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cluster = AutoscalingCluster(env | {"PYTHONUNBUFFERED": "1"}, config, IDLE_TIMEOUT_S)
    try:
        cluster.start()
        with tempfile.TemporaryDirectory() as tmp:
            out = scale(cluster, f"{tmp}/scale/s") | reclaim(cluster, f"{tmp}/reclaim/s")
    finally:
        cluster.stop()
    out["autoscaler"] = "v2"
    print(
        f"autoscaling: {out['peak_trials_per_gpu']} trials per logical GPU on "
        f"{out['workers_used']} workers launched from zero; demand -> worker up "
        f"{out['demand_to_worker_up_s']:.1f}s, -> first trial {out['demand_to_first_trial_s']:.1f}s; "
        f"released {out['idle_release_s']:.1f}s after the last trial (idle timeout {IDLE_TIMEOUT_S:g}s); "
        f"reclaimed worker: {out['trials_retried']} trials retried, {out['rows_lost']} rows lost, "
        f"{out['rows_duplicated']} duplicated, {out['trainings_per_checkpoint']} training per checkpoint"
    )
    return out


if __name__ == "__main__":
    main()
