"""Content-addressed checkpoints: trained once per key, shared by every trial, verified on load.

Layout under the store: checkpoints/<key>/weights.safetensors, meta.json (the config that
determines the weights and the weights' sha256; written last, so its presence means "complete"),
and trainings/<id>.json, one file per time the key was trained (the count must stay 1).
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

from .storage import Store


class CorruptCheckpoint(RuntimeError):
    pass


def key_of(config: dict) -> str:
    """A content hash of everything that determines the weights."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _dir(key: str) -> str:
    return f"checkpoints/{key}"


def save(store: Store, key: str, model: nn.Module, config: dict) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = st_save(state)
    store.write(f"{_dir(key)}/weights.safetensors", data)
    meta = {"key": key, "config": config, "sha256": hashlib.sha256(data).hexdigest()}
    store.write(f"{_dir(key)}/meta.json", json.dumps(meta, indent=1, default=str).encode())


def load(store: Store, key: str) -> dict[str, torch.Tensor]:
    """The state dict of a complete checkpoint, after checking its sha256 against meta.json.

    Shared files are parsed, never unpickled: JSON and safetensors (a header and raw tensors).
    """
    where = store.path(_dir(key))
    try:
        meta = json.loads(store.read(f"{_dir(key)}/meta.json"))
        expected = meta["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{where}/meta.json: unreadable ({e})") from None
    data = store.read(f"{_dir(key)}/weights.safetensors")
    if hashlib.sha256(data).hexdigest() != expected:
        raise CorruptCheckpoint(f"{where}: weights do not match meta.json sha256")
    return st_load(data)


def ensure(store: Store, config: dict, build: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    """Load the checkpoint for `config`, training it with `build()` first if no one has.

    Concurrent callers of the same key serialise on a lock; the first trains, the rest wait and
    load, so each key is trained exactly once however many trials ask at the same moment, on
    any node (`Store.lock`: flock on shared disks, a lease in the Ray cluster for object stores).
    meta.json is written last, so a trainer that dies mid-way leaves the key untrained and the
    next holder of the lock trains it.
    """
    key = key_of(config)
    if not store.exists(f"{_dir(key)}/meta.json"):
        with store.lock(f"checkpoints/.locks/{key}"):
            if not store.exists(f"{_dir(key)}/meta.json"):
                model = build()
                event = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
                event_name = f"{_dir(key)}/trainings/{uuid.uuid4().hex}.json"
                store.write(event_name, json.dumps(event).encode())
                save(store, key, model, config)
    return load(store, key)


def train_count(store: Store, key: str) -> int:
    """How many times `key` has been trained (1 in a healthy store)."""
    return len(store.list(f"{_dir(key)}/trainings"))
