"""Damaged storage and missing data fail in one line, before `run` or `run --resume` writes
anything or starts Ray; a checkpoint failing its hash mid-sweep stops the whole sweep.

Each damage test tampers with a copy of one finished tiny experiment (built in-process, without
Ray), runs the CLI as a user would, and checks the one-line message and that every file under
the storage is byte-for-byte what it was (the driver lease, kept beside the experiments in
`.leases/`, is the one thing a refused driver may touch).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SPEC
from ray.tune.search import Searcher
from torch import nn

from raysweep.analysis import results
from raysweep.base.storage import LEASES_DIR, CorruptStorage, open_store
from raysweep.cli import main
from raysweep.experiment import checkpoints
from raysweep.experiment.spec import load
from raysweep.runner import cluster, preflight, sweep
from raysweep.runner.searcher import CellSearcher, open_studies, reconcile

SMALL = {"budgets": [0.1], "trials_per_cell": 1, "methods": {"gd": {"lr": 0.01}}}


def _spec_file(where: Path, **changes) -> Path:
    path = where / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_SPEC, **SMALL, **changes}))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-trial experiment, made by the sweep's own code in this process."""
    root = tmp_path_factory.mktemp("finished")
    spec = load(str(_spec_file(root)))
    store = open_store(str(root / "store"))
    cluster.record_spec(spec, store)
    studies = open_studies(spec, store)
    searcher = CellSearcher(spec, studies, reconcile(studies, results.read(store, spec.name)))
    while (config := searcher.suggest("t")) != Searcher.FINISHED:
        rows = sweep.execute(spec, store, config)
        assert all(row["status"] == "ok" for row in rows), [row["error"] for row in rows]
        searcher.on_trial_complete("t", sweep.reported(rows))
    return root


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    """A copy of the finished experiment to tamper with: tmp_path/{tiny.yaml, store/}."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _tree(root: Path) -> dict[str, str]:
    """Every file and directory under `root` (but the driver leases) with its content hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
        if LEASES_DIR not in p.parts
    }


def _refused(copy: Path, capsys, *args: str) -> str:
    """Run the CLI on the copy; assert exit 2, one line on stderr, no file changed; the line."""
    before = _tree(copy / "store")
    code = main([*args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert _tree(copy / "store") == before
    return err


def _resume(copy: Path, capsys) -> str:
    args = ("run", str(copy / "tiny.yaml"), "--storage", str(copy / "store"), "--resume")
    return _refused(copy, capsys, *args)


def _keys(copy: Path) -> tuple[str, str]:
    df = results.read(open_store(str(copy / "store")), "tiny")
    return df["poisoned_key"].iloc[0], df["retrain_key"].iloc[0]


def test_a_healthy_store_passes(copy, capsys):
    """The control: the undamaged copy passes every check and resumes (nothing left to run)."""
    spec, store = load(str(copy / "tiny.yaml")), open_store(str(copy / "store"))
    preflight.check_storage(spec, store, results.read(store, spec.name))
    assert main(["run", str(copy / "tiny.yaml"), "--storage", str(copy / "store"), "--resume"]) == 0
    assert "1/1 tuning trials recorded, 0 to run" in capsys.readouterr().out


def test_truncated_row_file(copy, capsys):
    (row,) = (copy / "store" / "tiny" / "results").glob("*.parquet")
    row.write_bytes(row.read_bytes()[: row.stat().st_size // 2])
    err = _resume(copy, capsys)
    assert f"{row}: not a readable Parquet row" in err and "move it out of results/" in err
    err = _refused(copy, capsys, "report", str(copy / "store" / "tiny"))
    assert f"{row}: not a readable Parquet row" in err


@pytest.mark.parametrize(
    "damage",
    [
        lambda lines: lines[:1] + [b"{not json"] + lines[1:],  # JSONDecodeError
        lambda lines: lines[:1] + [b"\xff\xfe\x00garbage"] + lines[1:],  # UnicodeDecodeError
        lambda lines: lines[:1] + [b"[1, 2]"] + lines[1:],  # JSON, but not an Optuna entry
    ],
    ids=["json", "utf8", "not-an-entry"],
)
def test_garbage_journal_line(copy, capsys, damage):
    journal = copy / "store" / "tiny" / "optuna.journal"
    lines = journal.read_bytes().split(b"\n")[:-1]
    journal.write_bytes(b"\n".join(damage(lines)) + b"\n")
    err = _resume(copy, capsys)
    assert f"{journal}: line 2 is not an Optuna journal entry" in err
    assert "keep only its first 1 lines (`head -n 1`)" in err


def test_torn_last_journal_line(copy, capsys):
    """Optuna skips a torn last line but appends after it; refused before that can happen."""
    journal = copy / "store" / "tiny" / "optuna.journal"
    data = journal.read_bytes()
    n = data.count(b"\n")
    journal.write_bytes(data + b'{"op_code": 5, "worker_id"')
    err = _resume(copy, capsys)
    assert f"line {n + 1} is not an Optuna journal entry" in err and f"head -n {n}" in err


def test_checkpoint_without_meta(copy, capsys):
    poisoned, _ = _keys(copy)
    where = copy / "store" / "checkpoints" / poisoned
    (where / "meta.json").unlink()
    err = _resume(copy, capsys)
    assert f"{where}: made before (trainings/ records it) but meta.json is missing" in err
    assert f"delete {where} and the next run trains it again" in err


def test_a_made_key_without_meta_is_refused_not_remade(tmp_path):
    """Inside a trial too: the damage is named, and the made-once count stays 1."""
    store, config = open_store(str(tmp_path)), {"seed": 0}
    checkpoints.ensure(store, config, lambda: nn.Linear(2, 2))
    key = checkpoints.key_of(config)
    store.delete(f"checkpoints/{key}/meta.json")
    with pytest.raises(checkpoints.CorruptCheckpoint, match="meta.json is missing"):
        checkpoints.ensure(store, config, lambda: pytest.fail("remade a damaged key"))
    assert checkpoints.train_count(store, key) == 1


def test_checkpoint_failing_its_hash_on_resume(copy, capsys):
    _, retrain = _keys(copy)
    weights = copy / "store" / "checkpoints" / retrain / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    err = _resume(copy, capsys)
    assert f"{weights}: does not match the sha256 in meta.json" in err
    assert f"delete {weights.parent} and the next run trains it again" in err


@pytest.mark.integration
def test_checkpoint_failing_its_hash_stops_the_sweep(copy, local_ray):
    """Another experiment shares the damaged checkpoint: its first trial stops the sweep, no
    row is written (not one failed row per trial) and nothing is retrained."""
    poisoned, _ = _keys(copy)
    weights = copy / "store" / "checkpoints" / poisoned / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    spec = load(str(_spec_file(copy, name="other", trials_per_cell=4)))
    with pytest.raises(CorruptStorage) as caught:
        sweep.run(spec, str(copy / "store"), max_concurrent=1)
    assert "\n" not in str(caught.value)
    assert f"{weights}: does not match the sha256 in meta.json" in str(caught.value)
    store = open_store(str(copy / "store"))
    assert len(results.read(store, "other")) == 0
    assert checkpoints.train_count(store, poisoned) == 1
    assert weights.read_bytes() == bytes(data)


def test_report_on_a_mistyped_path_creates_nothing(tmp_path, capsys):
    wrong = {
        tmp_path / "runz" / "tiny": "runz: no such directory",
        tmp_path / "runz": "no Parquet rows",
    }
    for run_dir, says in wrong.items():
        assert main(["report", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and says in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("junk", ["missing", "empty", "wrong-bytes"])
def test_cifar10_root_checked_before_anything_starts(tmp_path, capsys, junk):
    root = tmp_path / "cifar"
    if junk != "missing":
        batches = root / "cifar-10-batches-py"
        batches.mkdir(parents=True)
    if junk == "wrong-bytes":
        for name in ["data_batch_1", "data_batch_2", "test_batch", "batches.meta"]:
            (batches / name).write_bytes(b"not CIFAR-10")
    spec = _spec_file(tmp_path, dataset={"name": "cifar10", "root": str(root)})
    storage = tmp_path / "store"
    assert main(["run", str(spec), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    assert f"dataset.root: {batch} is " in err
    assert ("not CIFAR-10's (md5)" if junk == "wrong-bytes" else "missing") in err
    assert "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}" in err
    assert not storage.exists()  # refused before the storage (or Ray) was touched


# Values inside their domains that this data cannot hold: refused by `run` in one line, before
# the storage or Ray is touched (they used to fail inside every trial).
FITS = [
    (
        {"attack": {"name": "gaussian", "n": 5000, "eps": 2.0}},
        "attack.n: 5000; allowed: 1..1079 (the train rows)",
    ),
    (
        {"attack": {"name": "gradient_matching", "n": 200, "y_adv": -1}},
        "(the train rows of class y_adv, whichever class y_adv=-1 draws)",
    ),
    ({"attack": {"name": "backdoor", "n": 30, "y_adv": 12}}, "attack.y_adv: 12; allowed: -1"),
    ({"attack": {"name": "backdoor", "n": 30, "patch": 40}}, "attack.patch: 40; allowed: 1..16"),
    (
        {
            "dataset": {"name": "synthetic_imdb", "n_train": 200, "n_test": 50, "max_len": 16},
            "model": {"name": "gpt2", "n_layer": 1, "n_embd": 30, "n_head": 4},
            "attack": {"name": "gaussian", "n": 10, "eps": 0.03},
        },
        "model: cannot be built for synthetic_imdb's inputs",
    ),
]


@pytest.mark.parametrize(
    "change,expected", FITS, ids=["n", "n_of_one_class", "y_adv", "patch", "n_head"]
)
def test_values_the_data_cannot_hold_are_refused_before_anything_starts(
    tmp_path, capsys, change, expected
):
    spec = _spec_file(tmp_path, **change)
    storage = tmp_path / "store"
    assert main(["run", str(spec), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{spec}: " in err and expected in err, err
    assert not storage.exists()
