"""Shared fixtures. Plain `pytest` runs everything; `-m "not integration"` skips real-Ray tests."""

from __future__ import annotations

import copy
import os

import pytest
import torch

# Nothing may download at test time: make any hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Dummy credentials for the loopback S3 server (s3_server), set before any test starts Ray so
# every Ray worker inherits them; no instance-metadata lookups (they would leave loopback).
for _k, _v in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_k, _v)
# MLflow's usage telemetry off (tests/test_tracking.py): nothing leaves this machine in tests.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# One thread per test process, as in a 1-CPU trial: on a shared 2-core machine two torch threads
# per process are many times slower, and results then match what the sweep computes.
torch.set_num_threads(1)

TINY_SPEC = {
    "name": "tiny",
    "dataset": {"name": "digits", "size": 16},
    "model": {"name": "mlp", "width": 64, "depth": 1},
    "attack": {"name": "gaussian", "n": 30, "eps": 2.0},
    "train": {"epochs": 8, "lr": 0.05, "batch_size": 64},
    "budgets": [0.05, 0.1],
    "trials_per_cell": 2,
    "delta": 0.05,
    "seed": 0,
    "methods": {
        "gd": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}},
        "ga": {"lr": {"low": 1e-6, "high": 1e-3, "log": True}, "steps": 5},
    },
}


@pytest.fixture
def tiny_spec_dict():
    """A spec small enough that a whole trial takes well under a second."""
    return copy.deepcopy(TINY_SPEC)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: two on a 2-core machine shared with other jobs run
    many times slower. Modules that unlearn many small models opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray on loopback with 2 CPUs, shared by the integration tests of this session."""
    import ray

    from raysweep.runner.sweep import start_ray

    start_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on loopback for this session: yields a URI maker."""
    import logging

    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    buckets = iter(range(10**6))

    def new_uri(prefix: str = "runs") -> str:
        """A fresh, empty bucket on the server, as a store URI pyarrow understands."""
        import pyarrow.fs as pafs

        bucket = f"raysweep-test-{next(buckets)}"
        query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{query}&allow_bucket_creation=true")
        fs.create_dir(bucket)
        return f"s3://{bucket}/{prefix}?{query}"

    yield new_uri
    server.stop()


def sweep_in_process(spec, storage: str):
    """The sweep's own searcher, trial and confirm code, without Ray: tuning, then confirmation."""
    from ray.tune.search import Searcher

    from raysweep.analysis import results
    from raysweep.base.storage import open_store
    from raysweep.runner import sweep
    from raysweep.runner.searcher import CellSearcher, open_studies, reconcile

    store = open_store(storage)
    studies = open_studies(spec, store)
    df = results.read(store, spec.name)
    searcher = CellSearcher(spec, studies, reconcile(studies, df), rows=df)
    i = 0
    while (config := searcher.suggest(f"t{i}")) != Searcher.FINISHED:
        rows = sweep.execute(spec, store, config)  # a row per budget the run was measured at
        searcher.on_trial_complete(f"t{i}", sweep.reported(rows))
        i += 1
    plan = sweep.confirm_plan(spec, results.read(store, spec.name))
    for config in sweep.tuned_settings(spec, store, plan):
        sweep.execute(spec, store, config)
    return results.read(store, spec.name)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """RUN_DIR of a finished tiny run (4 cells x 2 trials, confirmed on seeds 1 and 2), with its
    Optuna journal; shared by the report, MLflow and dashboard tests. Treat it as read-only."""
    from raysweep.experiment.spec import validate

    spec = validate({**TINY_SPEC, "confirm": {"seeds": [1, 2]}})
    storage = str(tmp_path_factory.mktemp("run"))
    sweep_in_process(spec, storage)
    return f"{storage}/{spec.name}"
