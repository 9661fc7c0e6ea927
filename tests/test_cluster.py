"""Cluster runs: cluster.yaml, multi-node sweeps on loopback, resume after a killed driver,
a killed worker node, failed trials, the doctor, and a local Ray that listens on loopback only.

Multi-node tests start real raylets with `ray start` on 127.0.0.2 (each 1 CPU), on their own
ports and temp dir, and stop them by killing exactly the processes under that temp dir.
Drivers run as `python -m raysweep` subprocesses, as a user (or `ray job submit`) runs them.
"""

from __future__ import annotations

import contextlib
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

from raysweep.analysis import results
from raysweep.base.storage import LEASES_DIR, open_store
from raysweep.experiment import checkpoints
from raysweep.experiment.spec import validate
from raysweep.runner import preflight, sweep
from raysweep.runner.loopback import LoopbackCluster
from raysweep.runner.searcher import cell_name, open_studies

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
    # Least privilege: the user's security group (SSH from their CIDR) on every node, so ray up
    # creates none (its own admits SSH from anywhere); workers get only the bucket's profile.
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["SecurityGroupIds"] == ["RAYSWEEP_SECURITY_GROUP"]
    assert gpu["node_config"]["IamInstanceProfile"] == {"Name": "raysweep-worker"}
    assert "0.0.0.0/0" not in (REPO / "cluster.yaml").read_text()

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
        cell_name(m, b): spec.trials_per_cell for m, b in spec.cells()
    }


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _wait_lease(store, name: str, proc, log: Path, timeout: float = 60) -> dict:
    """The driver lease of experiment `name` once `proc` holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.exists(f"{LEASES_DIR}/{name}"):
            try:
                holder = json.loads(store.read(f"{LEASES_DIR}/{name}"))
            except ValueError:  # written but not yet filled in
                holder = {}
            if holder.get("pid") == proc.pid:
                return holder
        assert proc.poll() is None, f"driver exited early:\n{_tail(log)}"
        time.sleep(0.1)
    raise AssertionError(f"no lease after {timeout}s:\n{_tail(log)}")


def _second_driver_refused(first, holder: dict, args, log: Path, env=None) -> None:
    """A second `run --resume` while `first` runs: exit 2, exactly one line naming the first."""
    second = _raysweep(*args, "--resume", log=log, env=env, timeout=60)
    assert first.poll() is None, "the first driver ended before the second was refused"
    lines = log.read_text().strip().splitlines()
    assert second.returncode == 2, _tail(log)
    assert len(lines) == 1, lines
    who = f"(host {socket.gethostname()}, pid {first.pid}, since {holder['started_at']})"
    assert "another driver is running this experiment " + who in lines[0]


def _one_study_trial_per_row(spec, store) -> None:
    """The journal agrees with the rows: each cell's study has exactly its trials, all complete."""
    for name, study in open_studies(spec, store).items():
        states = [t.state for t in study.get_trials(deepcopy=False)]
        assert states == [optuna.trial.TrialState.COMPLETE] * spec.trials_per_cell, (name, states)


def _kill_mid_trial(busy, kill, driver, log: Path):
    """Wait until `busy()` names a node executing a trial, `kill` it (mid-trial, not between
    two); return the node and when."""
    deadline = time.monotonic() + 60
    while not (nodes := busy()):
        assert time.monotonic() < deadline and driver.poll() is None, _tail(log)
        time.sleep(0.05)
    kill(nodes[0])
    return nodes[0], pd.Timestamp.now(tz="UTC")


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
    assert [x for x in listening if not _loopback(x[1])] == []


@pytest.fixture
def report_url():
    """A loopback HTTP server standing in for Ray's usage-stats URL: yields (url, requests)."""
    import http.server
    import threading

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_GET = do_POST

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/", hits
    server.shutdown()


@pytest.mark.integration
def test_local_ray_sends_nothing_off_the_machine(tmp_path, report_url):
    """A local Ray started by raysweep from an environment that does not turn usage statistics
    off: every Ray process it starts has them off, the report URL is never contacted, the
    dashboard's web UI is not served and no process talks to another host."""
    import psutil

    url, hits = report_url
    env = {k: v for k, v in _env().items() if k != "RAY_USAGE_STATS_ENABLED"}
    env["RAY_USAGE_STATS_REPORT_URL"] = url  # where Ray would send its reports
    code = (
        "import sys, ray; from raysweep.runner.cluster import start_ray; start_ray(None, num_cpus=1); "
        "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"
    )
    log = open(tmp_path / "log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    try:
        assert driver.stdout.readline().strip(), _tail(tmp_path / "log")
        seen = {}
        for proc in psutil.Process(driver.pid).children(recursive=True):
            try:
                seen[proc.pid] = (proc.name(), proc.cmdline(), proc.environ())
                remote = [c.raddr.ip for c in proc.net_connections(kind="inet") if c.raddr]
            except psutil.NoSuchProcess:
                continue
            assert all(_loopback(ip) for ip in remote), (proc.cmdline(), remote)
        # Ray's Python processes retitle themselves (setproctitle: "ray::IDLE"), which blanks
        # /proc/<pid>/environ; they inherit the environment of the raylet that starts them.
        readable = {name: environ for name, _, environ in seen.values() if environ}
        assert {"gcs_server", "raylet"} <= set(readable), readable.keys()
        api_server = []
        for _, cmdline, environ in seen.values():
            assert not environ or environ.get("RAY_USAGE_STATS_ENABLED") == "0", cmdline
            if any(part.endswith("dashboard/dashboard.py") for part in cmdline):
                api_server = cmdline
        # Ray's API server stays, for its usage-stats module alone: no web UI, on loopback.
        assert "--disable-frontend" in api_server and "--host=127.0.0.1" in api_server
        (log_dir,) = [a.split("=", 1)[1] for a in api_server if a.startswith("--log-dir=")]
        deadline = time.monotonic() + 20
        while not any(  # said once its usage-stats module has run (and would have reported)
            "Usage reporting is disabled" in p.read_text(errors="replace")
            for p in Path(log_dir).glob("dashboard*")
        ):
            assert time.monotonic() < deadline, "the API server never ran its usage-stats module"
            time.sleep(0.1)
        time.sleep(1.0)  # time for a report it would send right after saying so
        assert hits == []
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)
        _kill_group(driver)
        log.close()


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
    studies = open_studies(spec, open_store(str(tmp_path / "store")))
    states = {n: {t.state for t in s.get_trials(deepcopy=False)} for n, s in studies.items()}
    assert states == {
        "ga-b0.1": {optuna.trial.TrialState.FAIL},
        "gd-b0.1": {optuna.trial.TrialState.COMPLETE},
    }


# ---------------------------------------------------------------- resume


def _start_slow(tmp_path, **overrides):
    """`raysweep run` of the SLOW spec (with `overrides`) started in the background:
    (spec, store, the run's CLI args, its log, the driver process)."""
    spec_path = _spec_file(tmp_path, **SLOW | overrides)
    spec = validate(yaml.safe_load(spec_path.read_text()), "slow")
    storage, log = str(tmp_path / "s"), tmp_path / "log"
    args = ("run", str(spec_path), "--storage", storage, "--num-cpus", "2")
    return spec, open_store(storage), args, log, _raysweep(*args, log=log, wait=False)


@pytest.mark.integration
def test_driver_killed_then_resume(tmp_path):
    """SIGKILL the driver mid-sweep; `run` refuses to start over, `run --resume` finishes it."""
    spec, store, args, log, driver = _start_slow(tmp_path)
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


# A driver as start_ray makes one: its reaper started, then "Ray" (a child carrying the mark,
# which starts a grandchild with an empty environment, as a retitled Ray process reads), then
# a process of its own started without the mark.
FAKE_DRIVER = """
import os, subprocess, sys, time
from raysweep.runner import cluster
from raysweep.runner import reaper
env = dict(os.environ, **{reaper.ENV: cluster.reap_with_driver()})
nap = [sys.executable, "-c", "import time; time.sleep(300)"]
spawn = "import subprocess, time; subprocess.Popen(%r, env={}); time.sleep(300)" % (nap,)
ray = subprocess.Popen([sys.executable, "-c", spawn], env=env)
own = subprocess.Popen(nap)
print(ray.pid, own.pid, flush=True)
time.sleep(300)
"""


def test_the_reaper_ends_what_the_mark_and_descent_name_and_nothing_else(tmp_path):
    """kill -9 of a driver: its reaper ends the marked child and the unmarked grandchild that
    child started, within 5 s; the driver's own unmarked child lives on."""
    import psutil

    driver = subprocess.Popen(
        [sys.executable, "-c", FAKE_DRIVER], env=_env(), stdout=subprocess.PIPE, text=True
    )
    started = []
    try:
        ray_pid, own_pid = map(int, driver.stdout.readline().split())
        ray, own = psutil.Process(ray_pid), psutil.Process(own_pid)
        started = [ray, own]
        deadline = time.monotonic() + 30
        # Found by descent, not by its mark: its environment is empty once it has exec'd.
        while not (kids := ray.children()) or kids[0].environ():
            assert time.monotonic() < deadline, "the grandchild never started"
            time.sleep(0.05)
        grandchild = kids[0]
        started.append(grandchild)
        time.sleep(1.0)  # the reaper's record is brought up to date every 0.5 s
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 5
        while _running(ray) or _running(grandchild):
            assert time.monotonic() < deadline, "the reaper left the marked processes"
            time.sleep(0.1)
        assert _running(own)  # not Ray's: never the reaper's to end
    finally:
        for proc in started:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            driver.kill()


@pytest.mark.integration
def test_a_killed_driver_takes_its_local_ray_with_it(tmp_path):
    """SIGKILL a `raysweep run` mid-sweep: within 15 s no process it started is left (Ray's
    agents used to hang on after their raylet died), found by the driver's process tree just
    before the kill and told apart from a reused id by its start time."""
    import psutil

    spec_path = _spec_file(tmp_path, **SLOW)
    storage, log = str(tmp_path / "s"), tmp_path / "log"
    args = ("run", str(spec_path), "--storage", storage, "--num-cpus", "2")
    driver = _raysweep(*args, log=log, wait=False)
    started = []
    try:
        _wait_rows(open_store(storage), "slow", 1, driver, log)  # trials running
        started = psutil.Process(driver.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        for part in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            assert part in names, names
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 15
        while left := [p for p in started if _running(p)]:
            assert time.monotonic() < deadline, [(p.pid, p.cmdline()) for p in left]
            time.sleep(0.2)
    finally:
        for p in started:  # what the test started, by id: a failed run leaves nothing either
            with contextlib.suppress(psutil.Error):
                p.kill()
        _kill_group(driver)


def _running(proc) -> bool:
    import psutil

    try:  # is_running compares the start time: a reused id is another process
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.integration
def test_a_refused_row_write_stops_a_real_sweep_and_resume_completes_it(tmp_path):
    """Mid-sweep, the row files of the trials still to come are made unwritable (a directory
    where each will be renamed: refused even to root): `raysweep run` stops with exit 2 and one
    line naming the path and the cause; once they are removed, `--resume` completes every
    planned trial exactly once, every row written before the fault byte for byte unchanged."""
    spec, store, args, log, driver = _start_slow(tmp_path, trials_per_cell=24)
    try:
        n = _wait_rows(store, "slow", 2, driver, log)
        cell = cell_name("gd", 1.0)
        # Far more trials to come than can finish while these are made (tenths of a second).
        blocked = []
        for k in range(n + 1, 24):
            path = Path(store.path(results.row_name("slow", "tune", cell, k)))
            with contextlib.suppress(FileExistsError):  # written meanwhile: not a fault
                path.mkdir()
                blocked.append(path)
        driver.wait(timeout=120)
    finally:
        _kill_group(driver)
    lines = log.read_text().strip().splitlines()
    assert driver.returncode == 2, _tail(log)
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]], _tail(log)
    assert any(f"error: {p}: cannot be written (IsADirectoryError" in errors[0] for p in blocked)
    assert "raysweep run SPEC --resume" in errors[0]
    for path in blocked:
        path.rmdir()  # the fault removed
    rows = lambda: {p.name: p.read_bytes() for p in Path(store.path("slow/results")).glob("*")}
    before = rows()
    assert not list(Path(store.path("slow/results")).glob(".tmp-*"))  # the refused ones removed
    assert n <= len(before) < 24, "the fault should land mid-sweep"

    resumed = _raysweep(*args, "--resume", log=log)
    assert resumed.returncode == 0, _tail(log)
    _assert_complete(results.read(store, "slow"), spec)
    after = rows()
    assert {k: after[k] for k in before} == before  # none lost, none overwritten
    summary = f"slow: {24 - len(before)} trials run (0 failed), 24 recorded in all"
    assert summary in _tail(log)
    # The trials the fault cut short stay failed in their study, each re-planned once.
    preflight.check_agreement(store, "slow", results.read(store, "slow"))


@pytest.mark.integration
def test_a_second_driver_is_refused_while_the_first_runs(tmp_path):
    """The first driver holds the experiment's lease (flock); a second, started mid-sweep, is
    refused before it starts Ray or writes anything, and the first finishes undisturbed."""
    spec_path = _spec_file(tmp_path, **SLOW)
    spec = validate(yaml.safe_load(spec_path.read_text()), "slow")
    storage = str(tmp_path / "s")
    store = open_store(storage)
    args = ("run", str(spec_path), "--storage", storage, "--num-cpus", "2")
    first = _raysweep(*args, log=tmp_path / "log1", wait=False)
    try:
        holder = _wait_lease(store, "slow", first, tmp_path / "log1")
        _second_driver_refused(first, holder, args, tmp_path / "log2")
        first.wait(timeout=150)
    finally:
        _kill_group(first)
    assert first.returncode == 0, _tail(tmp_path / "log1")
    _assert_complete(results.read(store, "slow"), spec)
    _one_study_trial_per_row(spec, store)


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
def test_a_second_driver_is_refused_on_the_object_store(two_nodes, s3_server, tmp_path):
    """Two drivers of one S3 experiment on the loopback cluster: the lease object in the store
    refuses the second; the first completes with its journal and rows in agreement."""
    uri = s3_server()
    spec_path = _spec_file(tmp_path, **SLOW)
    spec = validate(yaml.safe_load(spec_path.read_text()), "slow")
    args = ("run", str(spec_path), "--storage", uri, "--address", two_nodes.address)
    first = _raysweep(*args, log=tmp_path / "log1", env=two_nodes.env, wait=False)
    store = open_store(uri)
    try:
        holder = _wait_lease(store, "slow", first, tmp_path / "log1")
        _second_driver_refused(first, holder, args, tmp_path / "log2", env=two_nodes.env)
        first.wait(timeout=150)
    finally:
        _kill_group(first)
    assert first.returncode == 0, _tail(tmp_path / "log1")
    _assert_complete(results.read(store, "slow"), spec)
    _one_study_trial_per_row(spec, store)
    assert not store.exists(f"{LEASES_DIR}/slow")  # released when the first ended


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
            _, killed_at = _kill_mid_trial(
                lambda: [1] if cluster.running_trial(1) else [], cluster.kill_node, driver, log
            )
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
