"""The sweep: one Ray Tune run whose searcher holds one Optuna study per (method, budget) cell.

Why one Tuner with a multiplexing searcher instead of one Tuner per cell: all cells share the
cluster at once (no idle CPUs while the last trials of one cell finish), and each cell still has
its own study, so a sampler never trades one method's trials for another's (DESIGN section 5).
Studies live in an Optuna journal under the run's storage, which is also what makes a
resumed run continue each study instead of restarting it.

Starting, resuming and cluster use: `run` reconciles the studies with the Parquet rows on every
start, so continuing an interrupted run is the same code path as starting one; `check_resume`
adds the CLI's rule on top (a new run must not exist yet, `--resume` needs one with this spec).
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import math
import os
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from unittest import mock

import optuna
import ray
import ray._private.ray_constants as ray_constants
from optuna.storages.journal import JournalFileBackend, JournalStorage
from ray import tune
from ray.tune.search import Searcher

from . import results
from .spec import Spec, distributions
from .storage import Store, open_store
from .trial import derive_seed, run_trial

# Ray's gRPC servers (GCS, raylet, workers) listen on loopback only when the node IP is exactly
# 127.0.0.1; any other address, 127.0.0.2 included, makes them listen on every interface.
LOCAL_IP = "127.0.0.1"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def cell_name(method: str, budget: float) -> str:
    return f"{method}-b{budget:g}"


def open_journal(spec: Spec, store: Store) -> tuple[JournalStorage, Callable[[], None]]:
    """The run's Optuna journal and a `sync()` that makes its latest state durable.

    On local (or NFS) storage the journal is <storage>/<experiment>/optuna.journal itself and
    sync() does nothing. An object store cannot append, so the driver keeps a local copy,
    restored from the store on start, and sync() uploads it whole (it is small: a few hundred
    bytes per trial). The searcher syncs after every ask and tell.
    """
    rel = f"{spec.name}/optuna.journal"
    if store.local:
        path = store.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return JournalStorage(JournalFileBackend(path)), lambda: None
    local = tempfile.mkdtemp(prefix="raysweep-journal-")
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    path = os.path.join(local, "optuna.journal")
    with open(path, "wb") as f:
        f.write(store.read(rel) if store.exists(rel) else b"")

    def sync() -> None:
        with open(path, "rb") as f:
            store.write(rel, f.read())

    return JournalStorage(JournalFileBackend(path)), sync


def open_studies(
    spec: Spec, store: Store, storage: JournalStorage | None = None
) -> dict[str, optuna.Study]:
    """One study per cell, all in the run's journal (see `open_journal`)."""
    if storage is None:
        storage, _ = open_journal(spec, store)
    studies = {}
    for method, budget in spec.cells():
        name = cell_name(method, budget)
        seed = derive_seed(spec.seed, name) % 2**32
        if spec.sampler == "random":
            sampler = optuna.samplers.RandomSampler(seed=seed)
        else:
            # constant_liar: parallel trials of a cell see each other as pending, not absent.
            startup = max(2, spec.trials_per_cell // 3)
            sampler = optuna.samplers.TPESampler(
                seed=seed, constant_liar=True, n_startup_trials=startup
            )
        studies[name] = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, load_if_exists=True
        )
    return studies


class CellSearcher(Searcher):
    """Hands out trials cell by cell (fewest started first) and tells each result to its study."""

    def __init__(
        self,
        spec: Spec,
        studies: dict[str, optuna.Study],
        done: dict[str, set[int]],
        sync: Callable[[], None] = lambda: None,
    ):
        super().__init__(metric="objective", mode="min")
        self.spec = spec
        self.studies = studies
        self.sync = sync
        self.cells = {cell_name(m, b): (m, b) for m, b in spec.cells()}
        self.spaces = {m: distributions(m, s) for m, s in spec.methods.items()}
        self.started = {name: len(done.get(name, ())) for name in self.cells}
        self.live: dict[str, tuple[str, int]] = {}

    def suggest(self, trial_id: str):
        open_cells = [c for c in self.cells if self.started[c] < self.spec.trials_per_cell]
        if not open_cells:
            return Searcher.FINISHED
        name = min(open_cells, key=lambda c: self.started[c])
        method, budget = self.cells[name]
        dists, fixed = self.spaces[method]
        trial = self.studies[name].ask(dists)
        self.sync()  # before the trial can start, so a resumed driver knows it was asked
        self.started[name] += 1
        self.live[trial_id] = (name, trial.number)
        return {
            "cell": name,
            "method": method,
            "budget": budget,
            "number": trial.number,
            "params": {**fixed, **trial.params},
        }

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        name, number = self.live.pop(trial_id)
        value = (result or {}).get("objective")
        if error or value is None or not math.isfinite(value):
            self.studies[name].tell(number, state=optuna.trial.TrialState.FAIL)
        else:
            self.studies[name].tell(number, value)
        self.sync()

    # The state lives in the journal, not in Tune's searcher checkpoint.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            f.write("state is in optuna.journal\n")

    def restore(self, checkpoint_path: str) -> None:
        pass


def reconcile(spec: Spec, store: Store, studies: dict[str, optuna.Study]) -> dict[str, set[int]]:
    """Match the studies with the Parquet rows before (re)starting; return each cell's done trials.

    A trial still RUNNING in a study belongs to a driver that died. If its row reached storage,
    the study learns the row's result; otherwise it is marked FAIL (interrupted) and re-planned.
    """
    df = results.read(store, spec.name)
    rows = {}
    if len(df):
        tuned = df[df["phase"] == "tune"]
        rows = {(r.cell, r.trial_number): r for r in tuned.itertuples()}
    done: dict[str, set[int]] = {}
    for name, study in studies.items():
        for t in study.get_trials(deepcopy=False):
            row = rows.get((name, t.number))
            if t.state == optuna.trial.TrialState.RUNNING:
                if row is not None and row.status == "ok":
                    study.tell(t.number, row.objective)
                else:
                    study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            if row is not None:
                done.setdefault(name, set()).add(t.number)
    return done


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_trainable(spec: Spec, store_uri: str, threads: int):
    """The Tune function trainable: run one trial, write its row (ok or failed), report it."""
    raw, source = spec.raw, spec.source
    hp_columns = results.hyperparameter_types(spec)

    def trainable(config: dict) -> None:
        import torch

        torch.set_num_threads(threads)
        spec, store = Spec(source, raw), open_store(store_uri)
        row = {
            "experiment": spec.name,
            "spec_name": spec.name,
            "spec_hash": spec.hash,
            "phase": "tune",
            "cell": config["cell"],
            "trial_number": config["number"],
            "attack": spec.attack["name"],
            "method": config["method"],
            "budget": config["budget"],
            "seed": spec.seed,
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "versions": results.versions(),
            "started_at": _now(),
            **{c: None for c in hp_columns},
            **{f"hp_{k}": v for k, v in config["params"].items()},
        }
        try:
            args = (config["method"], config["budget"], config["params"], config["number"])
            row |= run_trial(spec, store, *args, report=lambda r: None)
            row |= {"status": "ok", "error": None}
        except Exception as e:  # a failing trial is a row, not a crashed sweep
            row |= {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            row |= {"objective": float("nan"), "wall_s": None}
            traceback.print_exc()
        row["finished_at"] = _now()
        results.write_row(store, spec, row)
        tune.report({"objective": row["objective"], "ok": row["status"] == "ok"})

    return trainable


class Progress(tune.Callback):
    """One compact line per finished trial: cell, done/planned, best r so far, failures."""

    def __init__(self, spec: Spec, searcher: CellSearcher):
        self.spec, self.searcher = spec, searcher
        self.best: dict[str, float] = {}
        self.finished = dict(searcher.started)  # a resumed run counts on from its rows
        self.failed: dict[str, int] = {}
        self.t0 = time.time()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._count(trial, trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._count(trial, {})

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Its worker or node died (spot preemption): Tune runs the same trial again.
        print(
            f"[{time.time() - self.t0:6.1f}s] {trial.config['cell']} trial "
            f"{trial.config['number']}: its worker failed; retrying "
            f"({trial.num_failures}/{MAX_FAILURES} failures)",
            flush=True,
        )

    def _count(self, trial, result):
        cell = trial.config["cell"]
        self.finished[cell] = self.finished.get(cell, 0) + 1
        if result.get("ok"):
            self.best[cell] = min(self.best.get(cell, math.inf), result["objective"])
        else:
            self.failed[cell] = self.failed.get(cell, 0) + 1
        done = sum(self.finished.values())
        total = len(self.searcher.cells) * self.spec.trials_per_cell
        print(
            f"[{time.time() - self.t0:6.1f}s] {done}/{total} trials | {cell}: "
            f"{self.finished[cell]}/{self.spec.trials_per_cell} done, "
            f"best objective {self.best.get(cell, math.nan):.3f}, "
            f"failed {self.failed.get(cell, 0)}",
            flush=True,
        )


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`address`, else $RAY_ADDRESS), or start a local Ray on loopback.

    `ray job submit` sets RAY_ADDRESS for the driver it runs, so a submitted `raysweep run`
    joins its cluster. A local Ray is started even if `ray start` left a cluster running here
    (address="local"); it listens on 127.0.0.1 only, which needs Ray's cluster mode off while
    it starts, or ray.init swaps 127.0.0.1 for the machine's network address.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    with mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False):
        ray.init(
            address="local",
            _node_ip_address=LOCAL_IP,
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
        )


class RunStateError(RuntimeError):
    """The storage's state does not allow what was asked (start, resume), said in one line."""


def check_resume(spec: Spec, store: Store, resume: bool | None) -> None:
    """Refuse to start over an existing experiment, to resume a missing one, or to change spec.

    `resume=None` (library use) starts or continues, whichever applies; it still refuses a
    changed spec, whose rows would not be comparable with the recorded ones.
    """
    where, recorded = store.path(spec.name), _recorded_spec(spec, store)
    if recorded is None:
        if resume:
            raise RunStateError(
                f"{where}: nothing to resume: no experiment '{spec.name}' there; "
                "run without --resume to start it"
            )
        return
    current = json.loads(json.dumps(spec.raw))
    if recorded != current:
        changed = sorted(k for k in {*recorded, *current} if recorded.get(k) != current.get(k))
        raise RunStateError(
            f"{where}: the spec changed since experiment '{spec.name}' started "
            f"(differs in: {', '.join(changed)}); resume needs the same spec, "
            "or give the new spec another name"
        )
    if resume is False:
        n, total = len(results.read(store, spec.name)), len(spec.cells()) * spec.trials_per_cell
        raise RunStateError(
            f"{where}: experiment '{spec.name}' already exists ({n}/{total} trials recorded); "
            "pass --resume to continue it, or choose another name or --storage"
        )


def _recorded_spec(spec: Spec, store: Store) -> dict | None:
    """The spec the experiment was started with, or None if it was never started."""
    rel = f"{spec.name}/spec.json"
    return json.loads(store.read(rel))["spec"] if store.exists(rel) else None


def _slots(spec: Spec, max_concurrent: int | None) -> int:
    """How many trials may run at once: `max_concurrent`, else what the cluster fits now."""
    if max_concurrent:
        return max_concurrent
    cpu, gpu = spec.resources.get("cpu", 1), spec.resources.get("gpu", 0)
    cluster = ray.cluster_resources()
    slots = cluster.get("CPU", 1) / cpu
    if gpu:
        slots = min(slots, cluster.get("GPU", 0) / gpu)
    return max(1, int(slots))


MAX_FAILURES = 3  # per trial: retries after its node died (spot preemption), then a failed row


def run(
    spec: Spec,
    storage: str,
    address: str | None = None,
    num_cpus: int | None = None,
    resume: bool | None = None,
    max_concurrent: int | None = None,
):
    """Run (or continue) every cell's study to `trials_per_cell` trials; return the rows.

    `max_concurrent` caps parallel trials; the default fits the cluster's current resources,
    so an autoscaling cluster whose workers are not up yet needs it set to grow.
    """
    store = open_store(storage)
    check_resume(spec, store, resume)
    if not store.exists(f"{spec.name}/spec.json"):
        record = {"spec": spec.raw, "spec_hash": spec.hash, "started_at": _now().isoformat()}
        store.write(f"{spec.name}/spec.json", json.dumps(record, indent=1).encode())
    journal, sync = open_journal(spec, store)
    studies = open_studies(spec, store, journal)
    done = reconcile(spec, store, studies)
    sync()
    searcher = CellSearcher(spec, studies, done, sync)
    remaining = sum(spec.trials_per_cell - searcher.started[c] for c in searcher.cells)
    total = len(searcher.cells) * spec.trials_per_cell
    print(
        f"{spec.name}: {total - remaining}/{total} trials recorded, {remaining} to run", flush=True
    )
    if remaining > 0:
        start_ray(address, num_cpus)
        cpu, gpu = spec.resources.get("cpu", 1), spec.resources.get("gpu", 0)
        trainable = make_trainable(spec, storage, threads=max(1, int(cpu)))
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpu, "gpu": gpu}),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=remaining,
                max_concurrent_trials=_slots(spec, max_concurrent),
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{_now():%Y%m%d-%H%M%S}",
                storage_path=store.path(f"{spec.name}/tune"),
                storage_filesystem=store.fs,
                callbacks=[Progress(spec, searcher)],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            ),
        )
        tuner.fit()
    return results.read(store, spec.name)
