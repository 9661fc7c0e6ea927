"""Checkpoints: content-addressed, hash-checked, trained exactly once under concurrency."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch
from torch import nn

from raysweep.base.storage import open_store
from raysweep.experiment.checkpoints import CorruptCheckpoint, ensure, key_of, load, train_count

CONFIG = {"role": "poisoned", "seed": 0, "model": {"name": "linear"}}


def _slow_build():
    time.sleep(0.5)  # long enough that every process asks while the first is still training
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _ask(root):
    state = ensure(open_store(root), CONFIG, _slow_build)
    return state["weight"].sum().item()


def test_key_depends_on_content_only():
    assert key_of({"a": 1, "b": [1, 2]}) == key_of({"b": [1, 2], "a": 1})
    assert key_of({"a": 1}) != key_of({"a": 2})


def test_trained_once_when_many_processes_ask_at_once(tmp_path):
    with mp.get_context("fork").Pool(4) as pool:
        sums = pool.map(_ask, [str(tmp_path)] * 4)
    assert len(set(sums)) == 1
    assert train_count(open_store(str(tmp_path)), key_of(CONFIG)) == 1


def test_hash_checked_on_load(tmp_path):
    store = open_store(str(tmp_path))
    ensure(store, CONFIG, lambda: nn.Linear(3, 2))
    key = key_of(CONFIG)
    path = tmp_path / "checkpoints" / key / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint):
        load(store, key)


def test_keys_change_with_the_data_itself(tiny_spec_dict):
    """Same spec, different data (e.g. another CIFAR-10 copy under the same root): other keys."""
    import dataclasses

    from raysweep.experiment.spec import validate
    from raysweep.experiment.trial import checkpoint_config
    from raysweep.science.data import digits

    spec, split = validate(tiny_spec_dict, "<test>"), digits(size=8)
    other = dataclasses.replace(split, source="0" * 16)
    same = key_of(checkpoint_config(spec, split, 0, "poisoned"))
    assert same == key_of(checkpoint_config(spec, digits(size=8), 0, "poisoned"))
    assert same != key_of(checkpoint_config(spec, other, 0, "poisoned"))
