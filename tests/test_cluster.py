"""Cluster runs: cluster.yaml, multi-node sweeps on loopback, resume after a killed driver,
a killed worker node, failed trials, the doctor, and a local Ray that listens on loopback only.

Multi-node tests start real raylets with `ray start` on 127.0.0.2 (each 1 CPU), on their own
ports and temp dir, and stop them by killing exactly the processes under that temp dir.
Drivers run as `python -m raysweep` subprocesses, as a user (or `ray job submit`) runs them.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import TINY_SPEC

from raysweep import checkpoints, results, sweep
from raysweep.loopback import LoopbackCluster
from raysweep.spec import validate
from raysweep.storage import open_store

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_ray_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)

    head = config["available_node_types"][config["head_node_type"]]
    gpu = config["available_node_types"]["worker.gpu"]
    assert head["resources"]["CPU"] == 0  # trials never load the head
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    setup = " ".join(config["setup_commands"])
    assert "git+RAYSWEEP_REPO@RAYSWEEP_COMMIT" in setup  # filled in by sed at launch
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in config["file_mounts"]

    raw["max_worker"] = 3  # the validator is not a rubber stamp: a typo'd key fails
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(raw))


# ---------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _spec_file(tmp_path: Path, **changes) -> Path:
    raw = copy.deepcopy(TINY_SPEC) | changes
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _raysweep(*args: str, log: Path, env=None, wait: bool = True, timeout: float = 150):
    """Run `python -m raysweep ARGS` as a user would; its output goes to `log`."""
    cmd = [sys.executable, "-m", "raysweep", *args]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=env or _env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    if wait:
        proc.wait(timeout=timeout)
    return proc


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def _wait_rows(store, name: str, at_least: int, proc, log: Path, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(results.read(store, name))
        if n >= at_least:
            return n
        assert proc.poll() is None, f"driver exited early:\n{_tail(log)}"
        time.sleep(0.2)
    raise AssertionError(f"fewer than {at_least} rows after {timeout}s:\n{_tail(log)}")


def _assert_complete(df, spec) -> None:
    """Every planned trial exactly once: cells x trials_per_cell rows, no (cell, number) twice."""
    planned = len(spec.cells()) * spec.trials_per_cell
    assert len(df) == planned
    assert not df.duplicated(["phase", "cell", "trial_number"]).any()
    assert df.groupby("cell").size().to_dict() == {
        sweep.cell_name(m, b): spec.trials_per_cell for m, b in spec.cells()
    }


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's session: its local Ray, if any
    except ProcessLookupError:
        pass


# A spec whose trials each take about a second (full budget), so a kill lands mid-sweep.
SLOW = {
    "name": "slow",
    "methods": {"gd": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}},
    "budgets": [1.0],
    "trials_per_cell": 8,
}


# ---------------------------------------------------------------- local Ray


@pytest.mark.integration
def test_local_ray_listens_on_loopback_only(local_ray):
    import psutil

    @local_ray.remote(num_cpus=1)
    def pid() -> int:
        return os.getpid()

    local_ray.get([pid.remote() for _ in range(2)])  # workers up, with their servers
    me = psutil.Process()
    listening = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr):
                listening.append((proc.name(), c.laddr.ip, c.laddr.port))
    assert any("raylet" in name for name, _, _ in listening)
    assert any("gcs_server" in name for name, _, _ in listening)

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return addr.is_loopback

    assert [x for x in listening if not loopback(x[1])] == []


@pytest.mark.integration
def test_failed_trials_are_rows_and_study_failures(local_ray, tmp_path, tiny_spec_dict):
    """gradient ascent with a huge step diverges to NaN: a failed row, a FAIL in its study."""
    tiny_spec_dict["methods"]["ga"] = {"lr": 1000.0, "steps": 20}
    tiny_spec_dict["budgets"] = [0.1]
    spec = validate(tiny_spec_dict, "diverge")
    df = sweep.run(spec, str(tmp_path / "store"))
    _assert_complete(df, spec)
    ga, gd = df[df["method"] == "ga"], df[df["method"] == "gd"]
    assert (ga["status"] == "failed").all()
    assert ga["error"].str.contains("FloatingPointError: ga: non-finite").all()
    assert (gd["status"] == "ok").all()
    studies = sweep.open_studies(spec, open_store(str(tmp_path / "store")))
    states = {n: {t.state for t in s.get_trials(deepcopy=False)} for n, s in studies.items()}
    assert states == {
        "ga-b0.1": {optuna.trial.TrialState.FAIL},
        "gd-b0.1": {optuna.trial.TrialState.COMPLETE},
    }


# ---------------------------------------------------------------- resume


@pytest.mark.integration
def test_driver_killed_then_resume(tmp_path):
    """SIGKILL the driver mid-sweep; `run` refuses to start over, `run --resume` finishes it."""
    spec_path = _spec_file(tmp_path, **SLOW)
    spec = validate(yaml.safe_load(spec_path.read_text()), "slow")
    storage, log = str(tmp_path / "s"), tmp_path / "log"
    store = open_store(storage)
    args = ("run", str(spec_path), "--storage", storage, "--num-cpus", "2")
    driver = _raysweep(*args, log=log, wait=False)
    try:
        _wait_rows(store, "slow", 2, driver, log)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        _kill_group(driver)
    before = results.read(store, "slow").set_index(["cell", "trial_number"])
    assert 2 <= len(before) < 8, "the kill should land mid-sweep"

    again = _raysweep(*args, log=log)
    assert again.returncode == 2
    assert "already exists" in _tail(log) and "--resume" in _tail(log)

    resumed = _raysweep(*args, "--resume", log=log)
    assert resumed.returncode == 0, _tail(log)
    df = results.read(store, "slow")
    _assert_complete(df, spec)
    after = df.set_index(["cell", "trial_number"])
    # Trials finished before the kill were not re-run: their rows are untouched.
    assert (after.loc[before.index, "finished_at"] == before["finished_at"]).all()
    assert (df["status"] == "ok").all()

    done = _raysweep(*args, "--resume", log=log, timeout=60)
    assert done.returncode == 0
    assert "8/8 tuning trials recorded, 0 to run" in _tail(log)


# ---------------------------------------------------------------- two nodes


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    """Head + worker raylets on 127.0.0.2; created after the S3 fixture so nodes see its env."""
    cluster = LoopbackCluster(_env())
    try:
        cluster.add_node()
        cluster.add_node()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.integration
def test_two_node_sweep_on_object_store(two_nodes, s3_server, tmp_path):
    """Trials spread over both nodes, each checkpoint trained once, everything in S3."""
    uri, log = s3_server(), tmp_path / "log"
    spec_path = _spec_file(tmp_path)
    spec = validate(yaml.safe_load(spec_path.read_text()), "tiny")
    args = ("run", str(spec_path), "--storage", uri, "--address", two_nodes.address)
    driver = _raysweep(*args, log=log, env=two_nodes.env)
    assert driver.returncode == 0, _tail(log)

    store = open_store(uri)
    df = results.read(store, "tiny")
    _assert_complete(df, spec)
    assert (df["status"] == "ok").all(), df["error"].unique()
    assert df["node_id"].nunique() == 2, df["node_id"].value_counts()
    for key in {*df["poisoned_key"], *df["retrain_key"]}:
        assert checkpoints.train_count(store, key) == 1
    assert len({*df["poisoned_key"]}) == 1 and len({*df["retrain_key"]}) == 1
    assert store.exists("tiny/optuna.journal") and store.list("tiny/tune")  # Tune's state too


@pytest.mark.integration
def test_doctor_two_nodes(two_nodes, s3_server, tmp_path):
    log = tmp_path / "log"
    args = ("doctor", "--address", two_nodes.address)
    ok = _raysweep(*args, "--storage", s3_server(), log=log, env=two_nodes.env)
    out = _tail(log)
    assert ok.returncode == 0, out
    assert "2 nodes, 2 CPUs, 0 GPUs" in out and "no problems found" in out
    assert out.count(" ok") >= 3  # the driver's and both nodes' storage probes

    missing = s3_server().replace("raysweep-test-", "no-such-bucket-")
    bad = _raysweep(*args, "--storage", missing, log=log, env=two_nodes.env)
    assert bad.returncode == 1
    assert "storage error" in _tail(log)


@pytest.mark.integration
def test_worker_node_killed_mid_sweep(tmp_path):
    """A worker raylet dies mid-sweep: its trial is retried on the head, the sweep completes."""
    cluster = LoopbackCluster(_env())
    try:
        cluster.add_node()
        cluster.add_node()
        worker = _node_id(cluster, 1)
        spec_path = _spec_file(tmp_path, **SLOW)
        spec = validate(yaml.safe_load(spec_path.read_text()), "slow")
        storage, log = str(tmp_path / "s"), tmp_path / "log"
        args = ("run", str(spec_path), "--storage", storage, "--address", cluster.address)
        driver = _raysweep(*args, log=log, env=cluster.env, wait=False)
        store = open_store(storage)
        try:
            _wait_rows(store, "slow", 1, driver, log)
            deadline = time.monotonic() + 60
            while not cluster.running_trial(1):  # kill mid-trial, not between two
                assert time.monotonic() < deadline and driver.poll() is None, _tail(log)
                time.sleep(0.05)
            cluster.kill_node(1)
            killed_at = pd.Timestamp.now(tz="UTC")
            driver.wait(timeout=150)
        finally:
            _kill_group(driver)
        assert driver.returncode == 0, _tail(log)
        assert "its worker failed; retrying" in log.read_text()
        df = results.read(store, "slow")
        _assert_complete(df, spec)
        assert (df["status"] == "ok").all()
        assert not (df[df["started_at"] > killed_at]["node_id"] == worker).any()
        for key in {*df["poisoned_key"], *df["retrain_key"]}:
            assert checkpoints.train_count(store, key) == 1
    finally:
        cluster.stop()


def _node_id(cluster: LoopbackCluster, index: int) -> str:
    """The Ray node id of the cluster's `index`-th node, asked from a short-lived driver."""
    code = f"import json, ray; ray.init('{cluster.address}'); print(json.dumps(ray.nodes()))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=60
    )
    nodes = json.loads(out.stdout.strip().splitlines()[-1])
    port = cluster.nodes[index]["node-manager-port"]
    return next(n["NodeID"] for n in nodes if n["NodeManagerPort"] == port)
