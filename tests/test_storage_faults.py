"""Nothing lost, whatever the storage does (issue 27): a refused write stops the sweep in one
line and a resume completes it; the journal and the rows agree or nothing runs; `repair`
rebuilds the studies from the rows; a start with nothing to do writes nothing; a damaged
spec.json or poison set is named before the run. Each case on local storage and moto S3.

The sweep is driven in process (`drive`: sweep.run's driver without Ray); a fault is injected
by a filesystem that refuses the writes to one kind of path after some succeed (`refusing`).
"""

from __future__ import annotations

import io
import json
import time
from unittest import mock

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.arrow import ArrowFSWrapper
from ray.tune.search import Searcher

from raysweep import cli
from raysweep.analysis import results
from raysweep.base.storage import CorruptStorage, Store, WriteFailed, driver_lease, open_store
from raysweep.experiment import trial
from raysweep.experiment.spec import SpecError, validate
from raysweep.runner import cluster, preflight, sweep
from raysweep.runner.searcher import CellSearcher, open_studies, reconcile


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_server")())


@pytest.fixture
def spec(tiny_spec_dict):
    return validate(tiny_spec_dict, "tiny")


class _Refusing(ArrowFSWrapper):
    """A filesystem whose writes to paths containing `part` fail once `after` of them passed."""

    def __init__(self, fs: pafs.FileSystem, part: str, after: int):
        super().__init__(fs)
        self.part, self.left = part, after

    def _open(self, path, mode="rb", **kwargs):
        if "r" not in mode and self.part in path:
            if self.left <= 0:
                raise PermissionError(13, "Permission denied", path)
            self.left -= 1
        if "r" not in mode and isinstance(self.fs, pafs.LocalFileSystem):  # no folders in S3
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return super()._open(path, mode, **kwargs)


def refusing(store: Store, part: str, after: int = 0) -> Store:
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(_Refusing(store.fs, part, after)))
    return Store(store.uri, fs, store.root)


def drive(spec, store: Store) -> None:
    """sweep.run's driver without Ray: lease, preflight, studies, then every run's rows written
    by sweep.execute; its trials load and make checkpoints and poisons in `store` too."""
    with mock.patch.object(trial, "open_store", lambda *_, **__: store):
        trial.prepare.cache_clear()
        with driver_lease(store, spec.name):
            df = results.read(store, spec.name)  # as sweep.run: once, passed along
            preflight.check_storage(spec, store, df)
            cluster.check_resume(spec, store, None, df)
            cluster.record_spec(spec, store)
            journal, sync = cluster.open_journal(spec, store)
            studies = open_studies(spec, store, journal)
            searcher = CellSearcher(spec, studies, reconcile(studies, df), sync)
            sync()
            i = 0
            while (config := searcher.suggest(f"t{i}")) != Searcher.FINISHED:
                rows = sweep.execute(spec, store, config)
                searcher.on_trial_complete(f"t{i}", sweep.reported(rows))
                i += 1
        trial.prepare.cache_clear()


def files(store: Store, under: str) -> dict[str, bytes]:
    """Every visible file under `under` (recursively) with its bytes."""
    selector = pafs.FileSelector(store.path(under), recursive=True, allow_not_found=True)
    infos = store.fs.get_file_info(selector)
    return {
        i.path: store.fs.open_input_stream(i.path).read()
        for i in infos
        if i.type == pafs.FileType.File and not i.base_name.startswith(".")
    }


def assert_complete(spec, store: Store) -> None:
    """Every cell holds exactly trials_per_cell tuning rows, and the journal agrees."""
    df = results.read(store, spec.name)
    tuned = df[df["phase"] == "tune"]
    assert not tuned.duplicated(["cell", "trial_number"]).any()
    counts = tuned.groupby("cell").size().to_dict()
    assert counts == {c: spec.trials_per_cell for c in counts} and len(counts) == len(spec.cells())
    preflight.check_agreement(store, spec.name, df)


WRITE_POINTS = {  # what a refused write is named by, and how many writes of it pass first
    "row": ("/results/", 2),
    "journal": ("optuna.journal", 3),
    "checkpoint": ("weights.safetensors", 0),
    "poisons": ("poisons.safetensors", 0),
    "lease": (".leases/", 0),
}


@pytest.mark.parametrize("point", WRITE_POINTS)
def test_a_refused_write_stops_the_sweep_and_resume_completes_it(store, spec, point):
    part, after = WRITE_POINTS[point]
    with pytest.raises(WriteFailed) as stopped:
        drive(spec, refusing(store, part, after))
    line = str(stopped.value)
    assert "\n" not in line and part in line.split(": cannot be written")[0]
    assert "PermissionError" in line and "raysweep run SPEC --resume" in line
    before = files(store, f"{spec.name}/results")
    drive(spec, store)  # the fault removed
    assert_complete(spec, store)
    after_resume = files(store, f"{spec.name}/results")
    assert {p: after_resume[p] for p in before} == before  # no row lost or replaced


def test_a_run_whose_rows_cannot_all_be_written_leaves_none(store, spec):
    """A prefix method's run writes a row per budget: the second refused, the first is removed,
    so the re-run does not give the smaller cell one row more than its study plans."""
    with pytest.raises(WriteFailed):
        drive(spec, refusing(store, "/results/", after=1))
    assert results.read(store, spec.name).empty


def test_a_refused_local_journal_append_is_one_line(tmp_path, spec, monkeypatch):
    def refuse(self, logs):
        raise PermissionError(13, "Permission denied", self._file_path)

    monkeypatch.setattr(cluster.JournalFileBackend, "append_logs", refuse)
    store = open_store(str(tmp_path))
    journal, _ = cluster.open_journal(spec, store)
    with pytest.raises(WriteFailed, match=r"optuna.journal: cannot be written \(PermissionError"):
        open_studies(spec, store, journal)


def test_fit_names_the_storage_error_a_tune_error_wraps():
    try:
        try:
            raise WriteFailed("x/optuna.journal: cannot be written")
        except WriteFailed as e:
            raise RuntimeError("Tune's own error") from e
    except RuntimeError as wrapped:
        assert str(sweep._storage_cause(wrapped)) == "x/optuna.journal: cannot be written"
    assert sweep._storage_cause(RuntimeError("no storage")) is None


def test_a_lost_journal_is_refused_and_repair_continues(store, spec, tiny_spec_dict):
    drive(spec, store)
    rows = files(store, f"{spec.name}/results")
    store.delete(f"{spec.name}/optuna.journal")
    with pytest.raises(CorruptStorage) as refused:
        preflight.check_storage(spec, store, results.read(store, spec.name))
    assert str(refused.value).startswith(f"{store.path('tiny/optuna.journal')}: missing or empty")
    assert "8 of 8 tuning rows" in str(refused.value) and "raysweep repair SPEC" in str(
        refused.value
    )
    assert files(store, f"{spec.name}/results") == rows  # refused before anything was written

    said = sweep.repair(spec, store.uri)
    assert "4 studies rebuilt from 8 tuning rows (there was no journal)" in said
    more = validate(tiny_spec_dict | {"trials_per_cell": 3}, "tiny")
    drive(more, store)
    assert_complete(more, store)
    after = files(store, f"{spec.name}/results")
    assert {p: after[p] for p in rows} == rows  # every finished row kept, none re-run
    numbers = results.read(store, spec.name).groupby("cell")["trial_number"].apply(sorted)
    assert all(n == [0, 1, 2] for n in numbers)


def test_rows_and_journal_that_disagree_are_refused(store, spec):
    drive(spec, store)
    name = results.row_name(spec.name, "tune", "gd-b0.1", 1)
    kept = store.read(name)
    store.delete(name)
    with pytest.raises(
        CorruptStorage, match="1 trials the journal records as finished have no row"
    ):
        preflight.check_storage(spec, store, results.read(store, spec.name))
    store.write(name, kept)
    other = store.read(f"{spec.name}/optuna.journal").split(b"\n")
    store.write(f"{spec.name}/optuna.journal", b"\n".join(other[:6]) + b"\n")  # an earlier journal
    with pytest.raises(CorruptStorage, match="does not record every row"):
        preflight.check_storage(spec, store, results.read(store, spec.name))
    sweep.repair(spec, store.uri)
    kept_as = [n for n in store.list(spec.name) if n.startswith("optuna.journal.replaced-")]
    assert len(kept_as) == 1  # the replaced journal is kept beside the new one
    preflight.check_storage(spec, store, results.read(store, spec.name))


def test_a_start_with_nothing_to_do_writes_nothing(store, spec):
    drive(spec, store)
    before = files(store, spec.name)
    sweep.run(spec, store.uri, resume=True)
    sweep.run(spec, store.uri, resume=None)
    assert files(store, spec.name) == before


@pytest.mark.parametrize("content", [b"not json", b"{}", b'{"spec": [1]}', b"\xff"])
def test_a_damaged_spec_json_is_one_line(tmp_path, spec, tiny_spec_dict, capsys, content):
    store = open_store(str(tmp_path))
    store.write("tiny/spec.json", content)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_spec_dict))
    assert cli.main(["run", str(path), "--storage", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/tiny/spec.json: not a recorded spec (")
    assert err.count("\n") == 1 and "raysweep repair SPEC" in err
    store.delete("tiny/spec.json")
    assert cli.main(["repair", str(path), "--storage", str(tmp_path)]) == 0
    assert cluster.recorded_spec(spec, store) == spec.raw


def test_a_damaged_poison_set_is_named_before_the_run(store, spec):
    drive(spec, store)
    [key] = store.list("poisons")
    rel = f"poisons/{key}/poisons.safetensors"
    data = bytearray(store.read(rel))
    data[-1] ^= 1
    store.write(rel, bytes(data))
    with pytest.raises(CorruptStorage) as damaged:
        preflight.check_storage(spec, store, results.read(store, spec.name))
    assert str(damaged.value).startswith(f"{store.path(rel)}: does not match the sha256")


def test_sizes_that_would_hang_are_refused_in_seconds(tiny_spec_dict):
    """A spec alone decides these: 10^4 budgets (10^4 studies) and a 10^9-layer MLP."""
    many = tiny_spec_dict | {"budgets": [round(0.01 + i * 1e-5, 6) for i in range(10_000)]}
    with pytest.raises(SpecError, match="20000 cells; allowed: at most 1000 cells"):
        validate(many, "tiny")
    deep = tiny_spec_dict | {"model": {"name": "mlp", "width": 64, "depth": 10**9}}
    started = time.monotonic()
    with pytest.raises(SpecError, match="has more than 20000 modules"):
        validate(deep, "tiny")
    assert time.monotonic() - started < 30  # building [width] * 1e9 first took over a minute


def test_the_record_holds_what_the_trials_reported_and_finds_a_lost_row(store, spec):
    """sweep.Record: the rows the trials reported writing (what the summary counts), which
    must all read back; a row the storage lost, or one another trial replaced, is one line."""
    reports, real = [], sweep.reported
    with mock.patch.object(
        sweep, "reported", lambda rows: reports.append(real(rows)) or reports[-1]
    ):
        drive(spec, store)  # what each trial tells Tune
    record = sweep.Record()
    record.add(reports)
    df = results.read(store, spec.name)
    assert len(record.written) == len(df) == 8 and record.failed == 0
    record.check(store, df)
    name = results.row_name(spec.name, "tune", "gd-b0.1", 1)
    table = pq.read_table(io.BytesIO(store.read(name)))
    store.delete(name)
    with pytest.raises(CorruptStorage) as lost:
        record.check(store, results.read(store, spec.name))
    line = str(lost.value)
    assert line.startswith(f"{store.path(name)}: written by this run, but 1 of the 8 rows")
    assert "\n" not in line
    status = table.schema.get_field_index("status")
    changed = table.set_column(status, "status", pa.array(["failed"]))  # the same file, changed
    buf = io.BytesIO()
    pq.write_table(changed, buf)
    store.write(name, buf.getvalue())
    with pytest.raises(CorruptStorage, match="1 of the 8 rows it wrote are missing or changed"):
        record.check(store, results.read(store, spec.name))


@pytest.mark.parametrize(
    "change, key",
    [
        ({"train": {"epochs": 10**10}}, "train.epochs: 10000000000"),
        ({}, None),
    ],
)
def test_a_plan_past_the_time_limit_is_refused_before_ray(tmp_path, tiny_spec_dict, change, key):
    """`raysweep run` refuses a spec whose serial part (one seed's trainings and one run,
    calibrated here) takes more than MAX_SERIAL_DAYS, in one line naming file, key and value, in
    seconds, before Ray starts or a byte is written. 10^10 epochs take about 4,000 days on this
    machine's CPUs (a machine 100x faster is still refused); the tiny spec, seconds, passes."""
    path = tmp_path / "big.json"
    path.write_text(json.dumps(tiny_spec_dict | change))
    spec = cli.load(str(path))
    started = time.monotonic()
    if key is None:
        cli._check_time(spec)
        return
    with pytest.raises(SpecError) as refused:
        cli._check_time(spec)
    line = str(refused.value)
    assert line.startswith(f"{path}: {key}: one seed's trainings and one run take ")
    assert "\n" not in line
    days = float(line.split(" take ")[1].split(" days")[0].replace(",", ""))
    assert days > cli.MAX_SERIAL_DAYS
    assert time.monotonic() - started < 30
    with mock.patch.object(sweep, "run_recorded", side_effect=AssertionError("it started")):
        assert cli.main(["run", str(path), "--storage", str(tmp_path / "store")]) == 2
    assert not (tmp_path / "store").exists()


def test_a_refused_rename_is_one_line_and_leaves_no_temporary(tmp_path):
    """A directory where a row is renamed refuses even root: one line, and the hidden
    temporary written first is removed (readers skip it, but it would stay for good)."""
    store = open_store(str(tmp_path))
    (tmp_path / "x" / "row.parquet").mkdir(parents=True)
    with pytest.raises(WriteFailed, match=r"x/row.parquet: cannot be written \(IsADirectoryError"):
        store.write("x/row.parquet", b"row")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["row.parquet"]
