"""One storage code path: local directories and an S3-compatible server (moto, on loopback).

Every store test runs on both backends; the checkpoint, row and journal tests too. The Ray
tests at the end check that object-store locks serialise training across Ray workers.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import optuna
import pytest
import torch
from torch import nn

from raysweep import checkpoints, cluster, results, sweep
from raysweep.spec import validate
from raysweep.storage import Leases, open_store


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
        results.write_row(store, spec, base | {"trial_number": n, "objective": 0.5 + n})
    results.write_row(store, spec, base | {"trial_number": 1, "objective": 9.0})  # a re-run
    df = results.read(store, "tiny")
    assert sorted(df["trial_number"]) == [0, 1, 2]
    assert df.set_index("trial_number")["objective"][1] == 9.0
    assert list(df.columns[: len(results.COLUMNS)]) == list(results.COLUMNS)


def test_journal_survives_the_driver(store, tiny_spec_dict):
    """Studies reopened from the store (a new driver) continue where the last one stopped."""
    spec = validate(tiny_spec_dict, "tiny")
    journal, sync = cluster.open_journal(spec, store)
    studies = sweep.open_studies(spec, store, journal)
    study = studies["gd-b0.1"]
    done = study.ask()
    study.tell(done.number, 0.25)
    running = study.ask()
    sync()
    assert store.exists("tiny/optuna.journal")

    again = sweep.open_studies(spec, store)  # a fresh local copy, restored from the store
    trials = again["gd-b0.1"].get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    assert states == {
        done.number: optuna.trial.TrialState.COMPLETE,
        running.number: optuna.trial.TrialState.RUNNING,
    }
    assert again["gd-b0.1"].best_value == 0.25


def test_check_resume_rules(store, tiny_spec_dict):
    spec = validate(tiny_spec_dict, "tiny")
    cluster.check_resume(spec, store, resume=False)  # nothing there: a new run may start
    with pytest.raises(cluster.RunStateError, match="nothing to resume"):
        cluster.check_resume(spec, store, resume=True)
    record = {"spec": spec.raw, "spec_hash": spec.hash}
    store.write("tiny/spec.json", json.dumps(record).encode())
    with pytest.raises(cluster.RunStateError, match="already exists .*--resume"):
        cluster.check_resume(spec, store, resume=False)
    cluster.check_resume(spec, store, resume=True)
    cluster.check_resume(spec, store, resume=None)
    more = validate(tiny_spec_dict | {"trials_per_cell": 5}, "tiny")
    cluster.check_resume(more, store, resume=True)  # more trials: the same experiment, continued
    changed = validate(tiny_spec_dict | {"delta": 0.2, "trials_per_cell": 5}, "tiny")
    with pytest.raises(cluster.RunStateError, match="differs in: delta, trials_per_cell"):
        cluster.check_resume(changed, store, resume=True)


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


@pytest.mark.integration
def test_object_store_lock_serialises_ray_workers(local_ray, s3_server):
    """Two Ray workers race for one checkpoint key on S3: the lease lets exactly one train."""
    uri = s3_server()

    @local_ray.remote(num_cpus=1)
    def ask(uri: str) -> float:
        from raysweep import checkpoints
        from raysweep.storage import open_store

        def build():
            time.sleep(1.0)
            return torch.nn.Linear(8, 4)

        state = checkpoints.ensure(open_store(uri), {"seed": 4}, build)
        return float(state["weight"].sum())

    sums = local_ray.get([ask.remote(uri) for _ in range(2)])
    key = checkpoints.key_of({"seed": 4})
    assert checkpoints.train_count(open_store(uri), key) == 1
    assert sums[0] == sums[1]
