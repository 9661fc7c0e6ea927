"""The sweep: one Ray Tune run whose searcher holds one Optuna study per (method, budget) cell.

Why one Tuner with a multiplexing searcher instead of one Tuner per cell: all cells share the
cluster at once (no idle CPUs while the last trials of one cell finish), and each cell still has
its own study, so a sampler never trades one method's trials for another's (docs/design.md §5).
Studies live in an Optuna journal under the run's storage, which is also what makes a
resumed run continue each study instead of restarting it (cluster.py: Ray, journal, resume).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field

import pandas as pd
import ray
from ray import tune
from ray.tune.search import Searcher

from raysweep.analysis import results
from raysweep.base.storage import CorruptStorage, Store, driver_lease, open_store
from raysweep.experiment.spec import Spec, distributions
from raysweep.experiment.trial import run_trial

from .cluster import (
    check_resume,
    open_journal,
    record_spec,
    recorded_spec,
    slots,
    start_ray,
)
from .preflight import check_cluster, check_data, check_fits, check_machine, check_storage
from .progress import Progress, cell_key
from .rows import hyperparameter_types, write_row
from .searcher import CellSearcher, ListSearcher, open_studies, rebuild, reconcile


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def execute(spec: Spec, store: Store, config: dict) -> list[dict]:
    """Run one trial of either phase from its config and write its rows (ok or failed): one per
    budget its run is measured at (`stops`, smaller budgets' cells), its own budget last.

    A run that fails still has ok rows for the stops it passed: a run stopped there is
    exactly that row (anytime budgets); the budgets it did not reach get failed rows.
    """
    at = {b: (cell, number) for cell, b, number in config.get("stops", [])}
    at[config["budget"]] = (config["cell"], config["number"])
    base = {
        "experiment": spec.name,
        "spec_name": spec.name,
        "spec_hash": spec.hash,
        "phase": config["phase"],
        "run_of": f"{config['cell']}:{config['number']}",
        "tuned_trial": config["tuned_trial"],
        "attack": spec.attack["name"],
        "method": config["method"],
        "seed": config["seed"],
        "host": socket.gethostname(),
        # Nodes of one machine or one image share a hostname; None outside Ray.
        "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        "versions": results.versions(),
        "started_at": _now(),
        **{c: None for c in hyperparameter_types(spec)},
        **{f"hp_{k}": v for k, v in config["params"].items()},
    }
    measured, error = {}, None
    try:
        args = (config["method"], config["budget"], config["params"], config["number"])
        smaller = tuple(b for b in at if b < config["budget"])
        run_trial(
            spec,
            store,
            *args,
            report=lambda row: measured.update({row["budget"]: row}),
            seed=config["seed"],
            stops=smaller,
            relearn=config["phase"] == "confirm",  # the relearning probe: confirm rows only
        )
    except CorruptStorage:
        raise  # damaged storage is not this trial's failure: the sweep stops (make_trainable)
    except Exception as e:  # a failing trial is a row, not a crashed sweep
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    rows = []
    for budget, (cell, number) in sorted(at.items()):  # the run's own row last
        row = base | {"cell": cell, "trial_number": number, "budget": budget}
        if budget in measured:
            row |= measured[budget] | {"status": "ok", "error": None}
        else:
            row |= {"status": "failed", "error": error, "objective": math.nan, "wall_s": None}
        row["finished_at"] = _now()
        rows.append(row)
    write_rows(store, spec, rows)
    return rows


def write_rows(store: Store, spec: Spec, rows: list[dict]) -> None:
    """Write a run's rows, all or none: WriteFailed (storage.Store.write) stops the sweep, and
    the rows already written are removed, so the resumed run re-runs the whole run instead of
    leaving its smaller cells one row more than their studies plan."""
    written = []
    try:
        for row in rows:
            written.append(write_row(store, spec, row))
    except CorruptStorage:
        for name in written:
            with contextlib.suppress(OSError):  # the storage is failing: the first error is the one
                store.delete(name)
        raise


def reported(rows: list[dict]) -> dict:
    """What a trial tells Tune: its own row's objective (the searcher's metric), and per row
    what the searcher tells that row's study and Progress shows, keyed `<name>@<cell>`."""
    out = {
        "objective": rows[-1]["objective"],
        # The sweep's own record of what it wrote (`Record`): the summary counts these.
        "rows": [[results.row_name(*_identity(row)), row["status"]] for row in rows],
    }
    for row in rows:
        ok = row["status"] == "ok"
        values = {
            "objective": row["objective"],
            "ok": ok,
            "feasible": ok and bool(row["feasible"]),
            "r_val": row["residual_val"] if ok else math.nan,
            "r": row["residual"] if ok else math.nan,
            # the convergence rule's noise (convergence.py), for a trials_per_cell range
            "resolution": row.get("resolution", math.nan) if ok else math.nan,
            "objective_noise": row.get("objective_noise", math.nan) if ok else math.nan,
        }
        out |= {cell_key(k, row["cell"]): v for k, v in values.items()}
    return out


def _identity(row: dict) -> tuple[str, str, str, int]:
    return row["experiment"], row["phase"], row["cell"], int(row["trial_number"])


@dataclass
class Record:
    """What this run's trials reported writing, row file -> status (`reported`, gathered from
    Tune's results): the summary line counts these, never the files on disk, and every one of
    them must be on disk when the run ends (`check`), or a lost row would pass unseen."""

    written: dict[str, str] = field(default_factory=dict)

    def add(self, reports: list[dict]) -> None:
        for metrics in reports:
            self.written.update((name, status) for name, status in metrics.get("rows", ()))

    @property
    def failed(self) -> int:
        return sum(status != "ok" for status in self.written.values())

    def check(self, store: Store, df: pd.DataFrame) -> None:
        """CorruptStorage (one line) unless `df` (the rows read back) holds every row written."""
        found = {results.row_name(*_identity(r)): r["status"] for r in df.to_dict("records")}
        lost = sorted(n for n, status in self.written.items() if found.get(n) != status)
        if lost:
            raise CorruptStorage(
                f"{store.path(lost[0])}: written by this run, but {len(lost)} of the "
                f"{len(self.written)} rows it wrote are missing or changed now in "
                f"{store.path(lost[0].rsplit('/', 1)[0])}; the storage did not keep what it "
                "accepted: `raysweep run SPEC --resume` checks the experiment and says how to go on"
            )


def make_trainable(spec: Spec, store_uri: str, threads: int):
    """The Tune function trainable: run one trial, write its rows, report what Progress shows."""

    def trainable(config: dict) -> None:
        import torch

        torch.set_num_threads(threads)
        try:
            rows = execute(spec, open_store(store_uri), config)
        except CorruptStorage as e:  # no row: StopOnCorrupt ends the sweep, `run_tuner` says why
            tune.report({"corrupt": str(e), "objective": math.nan})
            return
        tune.report(reported(rows))

    return trainable


def confirm_plan(spec: Spec, df: pd.DataFrame) -> list[dict]:
    """The confirm trials still to run: each cell's best tuned setting on each fresh seed.

    A cell's best may be a row at a smaller budget (`from_budget`): it is re-run as that row ran,
    in its own cell at its own budget, without stops, once for every cell that chose it.
    A (cell, seed) is done when its ok row re-ran the current best; if more tuning changed the
    best, the row (same file name: phase, cell, seed) is re-run and replaced, never duplicated.
    """
    if not spec.confirm.seeds or not len(df):
        return []
    confirmed = df[(df["phase"] == "confirm") & (df["status"] == "ok")]
    done = set(zip(confirmed["cell"], confirmed["seed"], confirmed["tuned_trial"]))
    configs = {}
    for best in results.best_per_cell(df).to_dict("records"):
        for seed in spec.confirm.seeds:
            if (best["cell"], seed, best["trial_number"]) in done:
                continue
            configs[best["cell"], seed] = {
                "phase": "confirm",
                "cell": best["cell"],
                "method": best["method"],
                "budget": best["from_budget"],
                "number": seed,
                "seed": seed,
                "tuned_trial": best["trial_number"],
            }
    # Seed-major: a seed's checkpoints (and its retrain oracles) are trained by its first
    # trials, shared out among them (checkpoints.ensure_each), then loaded by the rest.
    return sorted(configs.values(), key=lambda c: (c["seed"], c["cell"]))


def tuned_settings(spec: Spec, store: Store, configs: list[dict]) -> list[dict]:
    """`confirm_plan`'s configs, each with the setting its tuned trial ran, bit for bit: that
    trial's parameters in its cell's study (the journal) and the method's constants, as the
    searcher handed them out; not the row's hp_ columns, which hold what a column type holds."""
    if not configs:
        return []
    journal, _ = open_journal(spec, store)
    out = []
    for c in configs:
        try:
            study = journal.get_study_id_from_name(c["cell"])
            trial_id = journal.get_trial_id_from_study_id_trial_number(study, int(c["tuned_trial"]))
        except KeyError:
            raise CorruptStorage(
                f"{store.path(spec.name)}/optuna.journal: study {c['cell']} has no trial "
                f"{c['tuned_trial']}, which its rows name; `raysweep repair SPEC` rebuilds the "
                "studies from the rows"
            ) from None
        _, fixed = distributions(c["method"], spec.methods[c["method"]])
        out.append(c | {"params": {**fixed, **journal.get_trial(trial_id).params}})
    return out


def confirm(spec: Spec, store: Store, plan: list[dict], concurrent: int) -> list[dict]:
    """Re-run each cell's best setting on every `confirm.seeds` seed (`plan`: `confirm_plan`'s
    configs), as Ray trials like tuning, `concurrent` at once; return what each trial reported."""
    configs = tuned_settings(spec, store, plan)
    if not configs:
        return []
    planned: dict[str, int] = {}
    for c in configs:
        planned[c["cell"]] = planned.get(c["cell"], 0) + 1
    progress = Progress("confirm", planned)
    return run_phase(
        spec, store, "confirm", ListSearcher(configs), len(configs), concurrent, progress
    )


# ---------------------------------------------------------------- the Tune run of a phase

MAX_FAILURES = 3  # per trial: retries after its worker or node died (spot preemption)


class Retries(tune.Callback):
    """Says so when a trial is retried because its worker or node died."""

    def __init__(self):
        self.t0 = time.time()

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(
            f"[{time.time() - self.t0:7.1f}s] {trial.config['cell']} trial "
            f"{trial.config['number']}: its worker failed; retrying "
            f"({trial.num_failures}/{MAX_FAILURES} failures)",
            flush=True,
        )


class StopOnCorrupt(tune.Stopper):
    """Stops every trial once one reports damaged storage (a checkpoint failing its sha256):
    the trials after it would fail the same way, one failed row each."""

    def __init__(self):
        self.seen = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seen = self.seen or bool(result.get("corrupt"))
        return self.seen

    def stop_all(self) -> bool:
        return self.seen


def run_tuner(tuner: tune.Tuner) -> list[dict]:
    """Run the tuner; return what each trial reported last. CorruptStorage with the first
    trial's report of damaged storage, if any, or with the driver's own (a journal append the
    storage refused, raised in the searcher)."""
    try:
        grid = tuner.fit()
    except Exception as e:
        cause = _storage_cause(e)
        if cause is None:
            raise
        raise cause from None
    reports = [result.metrics or {} for result in grid]
    for metrics in reports:
        if metrics.get("corrupt"):
            raise CorruptStorage(metrics["corrupt"])
    return reports


def _storage_cause(error: BaseException | None) -> CorruptStorage | None:
    """The CorruptStorage that `error` wraps (Tune re-raises a searcher's errors as its own)."""
    while error is not None and not isinstance(error, CorruptStorage):
        error = error.__cause__ or error.__context__
    return error


def run_phase(
    spec: Spec,
    store: Store,
    phase: str,
    searcher: Searcher,
    samples: int,
    concurrent: int,
    progress: Progress,
) -> list[dict]:
    """One Tune run of `phase` ("tune" or "confirm"): `samples` trials as `searcher` hands them
    out, at most `concurrent` at once, each with the spec's resources; return what each trial
    reported last (`run_tuner`)."""
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    trainable = make_trainable(spec, store.uri, threads=max(1, int(cpu)))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpu, "gpu": gpu}),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=samples,
            max_concurrent_trials=max(1, int(concurrent)),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{phase}-{_now():%Y%m%d-%H%M%S}",
            storage_path=store.path(f"{spec.name}/tune"),
            storage_filesystem=store.fs,
            callbacks=[progress, Retries()],
            stop=StopOnCorrupt(),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    return run_tuner(tuner)


def run(spec: Spec, storage: str, **options) -> pd.DataFrame:
    """`run_recorded` (same options), returning the rows alone."""
    return run_recorded(spec, storage, **options)[0]


def run_recorded(
    spec: Spec,
    storage: str,
    address: str | None = None,
    num_cpus: int | None = None,
    resume: bool | None = None,
    max_concurrent: int | None = None,
) -> tuple[pd.DataFrame, Record]:
    """Run (or continue) every cell's study to `trials_per_cell` trials, confirm; return the rows
    and the run's own record of the rows it wrote (`Record`: what the summary counts).

    `resume`: None starts or continues; False refuses an existing experiment; True needs one
    (`cluster.check_resume`). `max_concurrent` caps parallel trials (`cluster.slots`).
    Before anything is written (`preflight`): the dataset's files, the limits that depend on its
    contents, and that one trial fits this machine (a local run, before Ray starts) or a node of
    the cluster (right after connecting to it). Then the experiment's driver lease is taken (a
    second driver is refused) and its storage is checked to read back whole.
    """
    check_data(spec)
    check_fits(spec)
    cluster = address or os.environ.get("RAY_ADDRESS")  # where start_ray connects
    if cluster:
        start_ray(cluster)
        check_cluster(spec)
    else:
        check_machine(spec, num_cpus)
    store = open_store(storage)
    with driver_lease(store, spec.name):
        # The rows are read once per phase and passed along (on an object store every read
        # is a LIST and a GET per row): here, after each Tune run, and not in between.
        df = results.read(store, spec.name)  # names a damaged row file
        check_storage(spec, store, df)
        check_resume(spec, store, resume, df)
        record = Record()
        df = _run(spec, store, df, address, num_cpus, max_concurrent, record)
        record.check(store, df)
        return df, record


def repair(spec: Spec, storage: str) -> str:
    """Rebuild the experiment's studies from its rows (`searcher.rebuild`), so a resume continues
    without re-running or overwriting a finished trial; return what was done, in one line.

    A spec.json that is missing (deleted because it was damaged) is written from `spec`;
    otherwise `spec` must be one a resume accepts (`check_resume`).
    """
    store = open_store(storage)
    with driver_lease(store, spec.name):
        df = results.read(store, spec.name)  # names a damaged row file
        if recorded_spec(spec, store) is None:
            record_spec(spec, store)
        check_resume(spec, store, True, df)
        kept = rebuild(spec, store, df)
    n = int((df["phase"] == "tune").sum()) if len(df) else 0
    old = f"the old journal is kept as {kept}" if kept else "there was no journal"
    return (
        f"{store.path(spec.name)}: {len(spec.cells())} studies rebuilt from {n} tuning rows "
        f"({old}); `raysweep run SPEC --resume` continues"
    )


# Ray Tune can end a trial whose node died without its row: two failures of one reused actor
# race in its controller, and the second finds the trial already set to retry and stops it for
# good (seen once in three reclaimed workers, tests/test_autoscaling.py). So each phase runs
# again from the rows, as `--resume` would, until every planned trial has its row, at most
# PASSES times (a trial that fails every time has a failed row, not none).
PASSES = 3


def _run(
    spec: Spec,
    store: Store,
    df: pd.DataFrame,
    address: str | None,
    num_cpus: int | None,
    max_concurrent: int | None,
    record: Record,
) -> pd.DataFrame:
    """Tune, then confirm, from the rows `df` read at the start; return the rows at the end."""
    record_spec(spec, store)
    # A trials_per_cell range: confirm rows change a cell's noise (convergence.py: their std),
    # which can re-open it; it is tuned on and, if its best moved, re-confirmed.
    low, high = spec.trials_range()
    for round_ in range(PASSES if low < high else 1):
        tuned = 0
        for attempt in range(PASSES):
            quiet = attempt > 0 or round_ > 0
            n, df = _tune(spec, store, df, address, num_cpus, max_concurrent, record, quiet=quiet)
            tuned += n
            if not n:
                break
        if round_ and not tuned:
            break
        for _ in range(PASSES):
            plan = confirm_plan(spec, df)
            if not plan:
                break
            start_ray(address, num_cpus)
            record.add(confirm(spec, store, plan, slots(spec, max_concurrent)))
            df = results.read(store, spec.name)
    return df


def _tune(
    spec: Spec,
    store: Store,
    df: pd.DataFrame,
    address: str | None,
    num_cpus: int | None,
    max_concurrent: int | None,
    record: Record,
    quiet: bool,
) -> tuple[int, pd.DataFrame]:
    """Run the tuning runs the rows `df` do not hold yet, adding what they wrote to `record`;
    return how many were planned (at most) and the rows after them (`df` if none ran)."""
    journal, sync = open_journal(spec, store)
    studies = open_studies(spec, store, journal)
    done = reconcile(studies, df)
    sync()
    searcher = CellSearcher(spec, studies, done, sync, df)
    # Tune trials are runs: a prefix method's run is a trial in each of its cells (searcher.py).
    # With a range the total is not known up front: `remaining` is each open lead's max, and
    # the searcher ends the Tuner early (Searcher.FINISHED) once every cell is done.
    remaining = searcher.remaining
    low, high = spec.trials_range()
    planned = dict.fromkeys(searcher.cells, high)
    total, recorded = sum(planned.values()), sum(len(done.get(c, ())) for c in planned)
    if (remaining or not quiet) and low == high:
        print(f"{spec.name}: {recorded}/{total} tuning trials recorded, {remaining} to run")
    elif remaining or not quiet:
        print(
            f"{spec.name}: {recorded} of {len(planned) * low}-{total} tuning trials recorded "
            f"(trials_per_cell {low}-{high}), at most {remaining} runs to go"
        )
    if remaining == 0:
        return 0, df
    start_ray(address, num_cpus)
    concurrent, progress = slots(spec, max_concurrent), Progress("tune", planned, df)
    record.add(run_phase(spec, store, "tune", searcher, remaining, concurrent, progress))
    return remaining, results.read(store, spec.name)
