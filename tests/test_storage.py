"""One storage code path: local directories and an S3-compatible server (moto, on loopback).

Every store test runs on both backends; the checkpoint, row and journal tests too. The Ray
tests at the end check that object-store locks serialise training across Ray workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from raysweep.analysis import results
from raysweep.base import storage
from raysweep.base.storage import (
    LEASES_DIR,
    CorruptStorage,
    LeaseHeld,
    Leases,
    driver_lease,
    open_store,
)
from raysweep.experiment import checkpoints
from raysweep.experiment.spec import validate
from raysweep.runner import cluster, preflight
from raysweep.runner.rows import write_row
from raysweep.runner.searcher import open_studies


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_server")())


def test_write_read_list_delete(store):
    assert not store.exists("a/b.bin")
    store.write("a/b.bin", b"\x00\x01payload")
    store.write("a/c.bin", b"other")
    assert store.read("a/b.bin") == b"\x00\x01payload"
    assert store.list("a") == ["b.bin", "c.bin"]  # no temporaries, no markers
    store.write("a/b.bin", b"replaced")
    assert store.read("a/b.bin") == b"replaced"
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    assert store.list("a") == ["c.bin"]
    assert store.list("missing") == []


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))


def test_checkpoint_round_trip_is_hash_checked(store):
    model = _model(0)
    checkpoints.save(store, "k1", model, {"seed": 0})
    meta = json.loads(store.read("checkpoints/k1/meta.json"))
    weights = store.read("checkpoints/k1/weights.safetensors")
    assert meta["sha256"] == hashlib.sha256(weights).hexdigest()
    assert weights[8:9] == b"{"  # safetensors: header length, then a JSON header; no pickle
    state = checkpoints.load(store, "k1")
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor)


def test_corrupt_weights_raise(store):
    checkpoints.save(store, "k2", _model(1), {"seed": 1})
    data = bytearray(store.read("checkpoints/k2/weights.safetensors"))
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    store.write("checkpoints/k2/weights.safetensors", bytes(data))
    with pytest.raises(checkpoints.CorruptCheckpoint, match="sha256"):
        checkpoints.load(store, "k2")


def test_corrupt_meta_raises(store):
    checkpoints.save(store, "k3", _model(2), {"seed": 2})
    store.write("checkpoints/k3/meta.json", b"{not json")
    with pytest.raises(checkpoints.CorruptCheckpoint, match="meta.json"):
        checkpoints.load(store, "k3")


def test_ensure_trains_once_under_concurrency(store):
    """Four threads ask for the same key at once: one trains, all get the same weights."""
    calls, states = [], []

    def build():
        calls.append(1)
        time.sleep(0.3)  # long enough for the others to be waiting on the lock
        return _model(3)

    def ask():
        states.append(checkpoints.ensure(store, {"seed": 3}, build))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    key = checkpoints.key_of({"seed": 3})
    assert len(calls) == 1
    assert checkpoints.train_count(store, key) == 1
    assert all(torch.equal(s["0.weight"], states[0]["0.weight"]) for s in states)


def test_rows_round_trip(store, tiny_spec_dict):
    spec = validate(tiny_spec_dict, "tiny")
    base = {"experiment": "tiny", "phase": "tune", "cell": "gd-b0.1", "status": "ok"}
    for n in range(3):
        write_row(store, spec, base | {"trial_number": n, "objective": 0.5 + n})
    write_row(store, spec, base | {"trial_number": 1, "objective": 9.0})  # a re-run
    df = results.read(store, "tiny")
    assert sorted(df["trial_number"]) == [0, 1, 2]
    assert df.set_index("trial_number")["objective"][1] == 9.0
    assert list(df.columns[: len(results.COLUMNS)]) == list(results.COLUMNS)


def test_damaged_rows_and_journal_are_named(store, tiny_spec_dict):
    """On either backend: a truncated row file and a garbage journal line, named in one line."""
    spec = validate(tiny_spec_dict, "tiny")
    base = {"experiment": "tiny", "phase": "tune", "cell": "gd-b0.1", "status": "ok"}
    rel = write_row(store, spec, base | {"trial_number": 0})
    write_row(store, spec, base | {"trial_number": 1})
    store.write(rel, store.read(rel)[:-20])
    with pytest.raises(CorruptStorage) as damaged:
        results.read(store, "tiny")
    assert str(damaged.value).startswith(f"{store.path(rel)}: not a readable Parquet row")
    journal, sync = cluster.open_journal(spec, store)
    open_studies(spec, store, journal)["gd-b0.1"].ask()
    sync()
    preflight.check_journal(store, "tiny")  # healthy
    lines = store.read("tiny/optuna.journal").split(b"\n")
    store.write("tiny/optuna.journal", b"\n".join([lines[0], b"\x00{garbage", *lines[1:]]))
    with pytest.raises(CorruptStorage, match="optuna.journal: line 2 is not an Optuna journal"):
        preflight.check_journal(store, "tiny")


def test_journal_survives_the_driver(store, tiny_spec_dict):
    """Studies reopened from the store (a new driver) continue where the last one stopped."""
    spec = validate(tiny_spec_dict, "tiny")
    journal, sync = cluster.open_journal(spec, store)
    studies = open_studies(spec, store, journal)
    study = studies["gd-b0.1"]
    done = study.ask()
    study.tell(done.number, 0.25)
    running = study.ask()
    sync()
    assert store.exists("tiny/optuna.journal")

    again = open_studies(spec, store)  # a fresh local copy, restored from the store
    trials = again["gd-b0.1"].get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    assert states == {
        done.number: optuna.trial.TrialState.COMPLETE,
        running.number: optuna.trial.TrialState.RUNNING,
    }
    assert again["gd-b0.1"].best_value == 0.25


def test_check_resume_rules(store, tiny_spec_dict):
    spec, rows = validate(tiny_spec_dict, "tiny"), results.read(store, "tiny")  # none yet
    cluster.check_resume(spec, store, False, rows)  # nothing there: a new run may start
    with pytest.raises(cluster.RunStateError, match="nothing to resume"):
        cluster.check_resume(spec, store, True, rows)
    record = {"spec": spec.raw, "spec_hash": spec.hash}
    store.write("tiny/spec.json", json.dumps(record).encode())
    with pytest.raises(cluster.RunStateError, match="already exists .*--resume"):
        cluster.check_resume(spec, store, False, rows)
    cluster.check_resume(spec, store, True, rows)
    cluster.check_resume(spec, store, None, rows)
    more = validate(tiny_spec_dict | {"trials_per_cell": 5}, "tiny")
    cluster.check_resume(more, store, True, rows)  # more trials: the same experiment, continued
    changed = validate(tiny_spec_dict | {"delta": 0.2, "trials_per_cell": 5}, "tiny")
    with pytest.raises(cluster.RunStateError, match="differs in: delta, trials_per_cell"):
        cluster.check_resume(changed, store, True, rows)


def test_leases_expire_and_pass_on():
    table = Leases()
    assert table.acquire("k", "a", ttl=0.2)
    assert not table.acquire("k", "b", ttl=0.2)
    assert table.acquire("k", "a", ttl=0.2)  # renewal by the holder
    time.sleep(0.25)
    assert table.acquire("k", "b", ttl=0.2)  # a's lease expired: a died without releasing
    table.release("k", "a")  # a stale release changes nothing
    assert not table.acquire("k", "a", ttl=0.2)
    table.release("k", "b")
    assert table.acquire("k", "a", ttl=0.2)


def test_a_second_driver_is_refused_naming_the_first(store):
    """While one driver holds the experiment, another is refused at once, in one line."""
    with driver_lease(store, "tiny"):
        holder = json.loads(store.read(f"{LEASES_DIR}/tiny"))
        with pytest.raises(LeaseHeld) as refused:
            with driver_lease(store, "tiny"):
                pytest.fail("two drivers hold one experiment")
        with driver_lease(store, "other"):  # one lease per experiment, not per store
            pass
    line = str(refused.value)
    assert "\n" not in line
    assert f"{store.path('tiny')}: another driver is running this experiment" in line
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since {holder['started_at']}" in line
    with driver_lease(store, "tiny"):  # released on exit
        pass


def test_a_dead_drivers_flock_is_taken_over(tmp_path):
    """A driver killed while it holds a local lease: the kernel frees its flock at once."""
    code = (
        "import sys, time; from raysweep.base.storage import driver_lease, open_store\n"
        f"with driver_lease(open_store({str(tmp_path)!r}), 'tiny'):\n"
        "    print('held', flush=True); time.sleep(120)"
    )
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}, since"):
            with driver_lease(open_store(str(tmp_path)), "tiny"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with driver_lease(open_store(str(tmp_path)), "tiny"):
        pass


def test_stale_object_store_leases_are_taken_over(s3_server, monkeypatch):
    """Expired, or held by a process of this host that is gone: taken over. Live: refused."""
    monkeypatch.setattr(storage, "SETTLE_S", 0.05)
    store = open_store(s3_server())
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    here = {"host": socket.gethostname(), "pidns": storage._pid_namespace(), "started_at": "t0"}
    elsewhere = {"host": "other-host", "pid": 1, "started_at": "t0"}
    leases = {
        "expired": (elsewhere | {"expires": time.time() - 1}, True),
        "dead": (here | {"pid": int(dead.stdout), "expires": time.time() + 60}, True),
        "torn": (None, True),
        "live": (elsewhere | {"expires": time.time() + 60}, False),
    }
    for name, (lease, taken) in leases.items():
        data = b"{torn" if lease is None else json.dumps(lease).encode()
        store.write(f"{LEASES_DIR}/{name}", data)
        if taken:
            with driver_lease(store, name):
                assert json.loads(store.read(f"{LEASES_DIR}/{name}"))["pid"] == os.getpid()
            assert not store.exists(f"{LEASES_DIR}/{name}")  # released
        else:
            with pytest.raises(LeaseHeld, match="host other-host, pid 1, since t0.*expires within"):
                with driver_lease(store, name):
                    pass


def test_an_object_store_lease_is_renewed_while_held(s3_server, monkeypatch):
    """The holder rewrites its lease every LEASE_S / 4, so it outlives LEASE_S while the driver
    runs (here 0.4 s, held 1.2 s), and removes it when it ends."""
    monkeypatch.setattr(storage, "SETTLE_S", 0.05)
    monkeypatch.setattr(storage, "LEASE_S", 0.4)
    store, rel = open_store(s3_server()), f"{LEASES_DIR}/tiny"
    with driver_lease(store, "tiny"):
        first = json.loads(store.read(rel))["expires"]
        time.sleep(1.2)  # three lease lengths: it would have expired twice without renewal
        later = json.loads(store.read(rel))["expires"]
        assert later > first + 0.4, (first, later)
    assert not store.exists(rel)


def test_a_renewer_stops_for_good_once_its_lease_is_lost():
    """`renew` runs every period while the block runs; once it returns False (another driver
    took the lease over) it is not called again, and never after the block."""
    calls = []

    def renew() -> bool:
        calls.append(time.monotonic())
        return len(calls) < 2  # the second renewal finds the lease taken over

    with storage._renewing(renew, 0.01, "test"):
        deadline = time.monotonic() + 30
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # twenty periods more
    assert len(calls) == 2


@pytest.mark.integration
def test_object_store_lock_serialises_ray_workers(local_ray, s3_server):
    """Two Ray workers race for one checkpoint key on S3: the lease lets exactly one train."""
    uri = s3_server()

    @local_ray.remote(num_cpus=1)
    def ask(uri: str) -> float:
        from raysweep.base.storage import open_store
        from raysweep.experiment import checkpoints

        def build():
            time.sleep(1.0)
            return torch.nn.Linear(8, 4)

        state = checkpoints.ensure(open_store(uri), {"seed": 4}, build)
        return float(state["weight"].sum())

    sums = local_ray.get([ask.remote(uri) for _ in range(2)])
    key = checkpoints.key_of({"seed": 4})
    assert checkpoints.train_count(open_store(uri), key) == 1
    assert sums[0] == sums[1]
