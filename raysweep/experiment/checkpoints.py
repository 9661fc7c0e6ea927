"""Content-addressed artifacts: made once per key, shared by every trial, verified on load.

Two kinds live in a store: trained weights, `checkpoints/<key>/weights.safetensors`, and crafted
poisons, `poisons/<key>/poisons.safetensors` (only the poisoned rows; trial.poison). Beside the
tensors: meta.json (the config that determines them, what the maker adds, and the tensors'
sha256; written after the tensors, so its presence means "complete"), and one file per time the
key was made, under trainings/ or craftings/ (written last; the count must stay 1). A key with
such a record but no meta.json was damaged after it was made: it is refused, never remade.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from raysweep.base.storage import CorruptStorage, Store


class CorruptCheckpoint(CorruptStorage):
    """A stored artifact that fails its checks, as one line naming it and the fix."""


def key_of(config: dict) -> str:
    """A content hash of everything that determines an artifact (weights or poisons)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


FILES = {"checkpoints": "weights.safetensors", "poisons": "poisons.safetensors"}
EVENTS = {"checkpoints": "trainings", "poisons": "craftings"}
MAKES = {"checkpoints": "trains", "poisons": "crafts"}
Tensors = dict[str, torch.Tensor]


def write(store: Store, kind: str, key: str, tensors: Tensors, meta: dict) -> None:
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    store.write(f"{kind}/{key}/{FILES[kind]}", data)
    meta = {"key": key, **meta, "sha256": hashlib.sha256(data).hexdigest()}
    store.write(f"{kind}/{key}/meta.json", json.dumps(meta, indent=1, default=str).encode())


def read(store: Store, kind: str, key: str) -> tuple[Tensors, dict]:
    """(tensors, meta) of a complete artifact, after checking its sha256 against meta.json.

    Shared files are parsed, never unpickled: JSON and safetensors (a header and raw tensors).
    """
    where = store.path(f"{kind}/{key}")
    try:
        meta = json.loads(store.read(f"{kind}/{key}/meta.json"))
        expected = meta["sha256"]
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        fix = remedy(store, kind, key)
        raise CorruptCheckpoint(f"{where}/meta.json: unreadable ({e}); {fix}") from None
    try:
        data = store.read(f"{kind}/{key}/{FILES[kind]}")
    except FileNotFoundError:
        fix = remedy(store, kind, key)
        raise CorruptCheckpoint(f"{where}/{FILES[kind]}: missing; {fix}") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise CorruptCheckpoint(
            f"{where}/{FILES[kind]}: does not match the sha256 in meta.json; "
            f"{remedy(store, kind, key)}"
        )
    return st_load(data), meta


def remedy(store: Store, kind: str, key: str) -> str:
    """What to do about a damaged artifact: delete its directory, and the next run remakes it."""
    return f"delete {store.path(f'{kind}/{key}')} and the next run {MAKES[kind]} it again"


def check_made(store: Store, kind: str, key: str) -> None:
    """CorruptCheckpoint if `key` was made (a record under trainings/ or craftings/) but has no
    meta.json: remaking it silently would break made-once and hide the damage."""
    if not store.exists(f"{kind}/{key}/meta.json") and made_count(store, kind, key):
        raise CorruptCheckpoint(
            f"{store.path(f'{kind}/{key}')}: made before ({EVENTS[kind]}/ records it) but "
            f"meta.json is missing; {remedy(store, kind, key)}"
        )


def ensure_artifact(
    store: Store, kind: str, config: dict, make: Callable[[], tuple[Tensors, dict]]
) -> tuple[Tensors, dict]:
    """(tensors, meta) of the `kind` artifact for `config`, calling `make()` -> (tensors, extra
    meta) first if no one has.

    Concurrent callers of the same key serialise on a lock; the first makes it, the rest wait and
    load, so each key is made exactly once however many trials ask at the same moment, on any
    node (`Store.lock`: flock on shared disks, a lease in the Ray cluster for object stores).
    meta.json and then the made record are written last, so a maker that dies mid-way leaves the
    key unmade and the next holder of the lock makes it (`check_made`: a record without
    meta.json is damage, refused).
    """
    key = key_of(config)
    if not store.exists(f"{kind}/{key}/meta.json"):
        with store.lock(f"{kind}/.locks/{key}"):
            _make_held(store, kind, config, make)
    return read(store, kind, key)


def _make_held(
    store: Store, kind: str, config: dict, make: Callable[[], tuple[Tensors, dict]]
) -> None:
    """Holding the key's lock: make and write the artifact unless someone already has."""
    key = key_of(config)
    check_made(store, kind, key)
    if not store.exists(f"{kind}/{key}/meta.json"):
        tensors, extra = make()
        write(store, kind, key, tensors, {"config": config, **extra})
        event = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        event_name = f"{kind}/{key}/{EVENTS[kind]}/{uuid.uuid4().hex}.json"
        store.write(event_name, json.dumps(event).encode())


def save(store: Store, key: str, model: nn.Module, config: dict) -> None:
    write(store, "checkpoints", key, model.state_dict(), {"config": config})


def load(store: Store, key: str) -> Tensors:
    """The state dict of a complete checkpoint, hash-checked (`read`)."""
    return read(store, "checkpoints", key)[0]


def ensure(store: Store, config: dict, build: Callable[[], nn.Module]) -> Tensors:
    """The state dict of the checkpoint for `config`, training it with `build()` first if no one
    has (once per key, see `ensure_artifact`)."""
    return ensure_artifact(store, "checkpoints", config, _trained(build))[0]


def _trained(build: Callable[[], nn.Module]) -> Callable[[], tuple[Tensors, dict]]:
    """A checkpoint's `make` for ensure_artifact: train with `build()`, keep its state dict."""
    return lambda: (build().state_dict(), {})


def ensure_each(store: Store, wanted: list[tuple[dict, Callable[[], nn.Module]]]) -> list[Tensors]:
    """The state dicts of several checkpoints, [(config, build), ...], each trained once
    (`ensure`), shared out among the processes that ask for them at the same time.

    First every key not yet made whose lock is free is trained here (`Store.try_lock`: a held
    lock means another process is training that key, so this one moves on to the next); then
    each is loaded, waiting on the keys others still train. Trials that all need the same K
    retrain oracles thus train different ones in parallel instead of queueing behind the first.
    """
    for config, build in wanted:
        key = key_of(config)
        if store.exists(f"checkpoints/{key}/meta.json"):
            continue
        with store.try_lock(f"checkpoints/.locks/{key}") as held:
            if held:
                _make_held(store, "checkpoints", config, _trained(build))
    return [ensure(store, config, build) for config, build in wanted]


def made_count(store: Store, kind: str, key: str) -> int:
    """How many times the `kind` artifact `key` has been made (1 in a healthy store)."""
    return len(store.list(f"{kind}/{key}/{EVENTS[kind]}"))


def train_count(store: Store, key: str) -> int:
    """How many times checkpoint `key` has been trained (1 in a healthy store)."""
    return made_count(store, "checkpoints", key)
