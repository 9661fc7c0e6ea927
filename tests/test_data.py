"""Datasets: deterministic disjoint splits; CIFAR-10 read from its real on-disk format."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import torch
from torchvision.datasets import CIFAR10

from raysweep.science.data import cifar10, digest, digits, split_indices


def test_split_indices_are_a_deterministic_partition():
    a = split_indices(100, 0.2, 0.1, seed=3)
    b = split_indices(100, 0.2, 0.1, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(100))
    assert [len(x) for x in a] == [70, 20, 10]
    assert not torch.equal(a[0], split_indices(100, 0.2, 0.1, seed=4)[0])


def test_digits_shapes_and_standardisation():
    s = digits(size=32)
    assert s.input_shape == (1, 32, 32) and s.num_classes == 10
    assert len(s.y_train) + len(s.y_val) + len(s.y_test) == 1797
    assert abs(s.x_train.mean().item()) < 1e-4 and abs(s.x_train.std().item() - 1) < 1e-2


def _write_tiny_cifar(root, n_per_batch=20, n_test=30, seed=0) -> dict[str, str]:
    """CIFAR-10's python format: pickled dicts of uint8 rows (N, 3072) and labels; returns md5s."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    md5 = {}

    def dump(name, obj):
        path = folder / name
        path.write_bytes(pickle.dumps(obj))
        md5[name] = hashlib.md5(path.read_bytes()).hexdigest()

    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [
        ("test_batch", n_test)
    ]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        dump(name, {"data": data, "labels": rng.integers(0, 10, size=n).tolist()})
    dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return md5


def test_cifar10_loads_real_format_through_torchvision(tmp_path, monkeypatch):
    md5 = _write_tiny_cifar(tmp_path)
    # torchvision checks each file's md5 against the real release; point it at our tiny files.
    monkeypatch.setattr(CIFAR10, "train_list", [[f, md5[f]] for f in md5 if f.startswith("data")])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    s = cifar10(root=str(tmp_path), val_fraction=0.2)
    assert s.input_shape == (3, 32, 32)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (80, 20, 30)
    again = cifar10(root=str(tmp_path), val_fraction=0.2)
    assert torch.equal(s.x_val, again.x_val)
    assert s.source == again.source  # the same files, the same key for every artifact
    other = tmp_path / "other"
    md5_other = _write_tiny_cifar(other, seed=1)  # another copy of the data, same shapes
    monkeypatch.setattr(
        CIFAR10, "train_list", [[f, md5_other[f]] for f in md5 if f.startswith("data")]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5_other["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5_other["batches.meta"]})
    assert cifar10(root=str(other), val_fraction=0.2).source != s.source


def test_source_digest_names_the_raw_data_not_its_floats():
    """Checkpoint keys include `source`: the same data must give the same digest whatever the
    thread count (float reductions differ with it), and different parameters a different one."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = digits(size=16)
        torch.set_num_threads(1)
        b = digits(size=16)
    finally:
        torch.set_num_threads(threads)
    assert a.source == b.source and len(a.source) == 16
    assert digest(np.arange(4, dtype=np.uint8)) != digest(np.arange(4, dtype=np.int64))
    assert digest(np.zeros((2, 3))) != digest(np.zeros((3, 2)))
    assert digest(torch.arange(5)) == digest(np.arange(5))
