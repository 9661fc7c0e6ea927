"""The sweep: one Ray Tune run whose searcher holds one Optuna study per (method, budget) cell.

Why one Tuner with a multiplexing searcher instead of one Tuner per cell: all cells share the
cluster at once (no idle CPUs while the last trials of one cell finish), and each cell still has
its own study, so a sampler never trades one method's trials for another's (DESIGN section 5).
Studies live in an Optuna journal under the run's storage, which is also what makes a
resumed run continue each study instead of restarting it (cluster.py: Ray, journal, resume).
"""

from __future__ import annotations

import datetime as dt
import math
import socket
import traceback
from collections.abc import Callable

import optuna
import pandas as pd
import ray
from optuna.storages.journal import JournalStorage
from ray import tune
from ray.tune.search import Searcher

from . import results
from .cluster import (
    MAX_FAILURES,
    Retries,
    StopOnCorrupt,
    check_resume,
    fit,
    open_journal,
    record_spec,
    slots,
    start_ray,
)
from .preflight import check_data, check_storage
from .progress import Progress
from .spec import Spec, distributions
from .storage import CorruptStorage, Store, driver_lease, open_store
from .trial import derive_seed, run_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


def cell_name(method: str, budget: float) -> str:
    return f"{method}-b{budget:g}"


def make_sampler(kind: str, seed: int, trials_per_cell: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler for one cell's study (bench/tpe_vs_random.py compares the two)."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: parallel trials of a cell see each other as pending, not absent.
    startup = max(2, trials_per_cell // 3)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=startup)


def open_studies(
    spec: Spec, store: Store, storage: JournalStorage | None = None
) -> dict[str, optuna.Study]:
    """One study per cell, all in the run's journal (see `cluster.open_journal`)."""
    if storage is None:
        storage, _ = open_journal(spec, store)
    studies = {}
    existing = set(optuna.get_all_study_names(storage))
    for method, budget in spec.cells():
        name = cell_name(method, budget)
        seed = derive_seed(spec.seed, name) % 2**32
        sampler = make_sampler(spec.sampler, seed, spec.trials_per_cell)
        studies[name] = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, load_if_exists=True
        )
        if name not in existing:
            enqueue_first(spec, method, studies[name])
    return studies


def enqueue_first(spec: Spec, method: str, study: optuna.Study) -> None:
    """Queue the spec's `tried_first` settings as a new study's first trials, in listed order.

    At most `trials_per_cell` of them (the list is in priority order), so a short sweep tries the
    first ones. Only a new study gets them: a resumed one already ran (or queued) its own.
    """
    for params in spec.raw.get("tried_first", {}).get(method, [])[: spec.trials_per_cell]:
        study.enqueue_trial(params)


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
        self.sync = sync  # makes the journal durable (object stores): after every ask and tell
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
            "phase": "tune",
            "cell": name,
            "method": method,
            "budget": budget,
            "number": trial.number,
            "seed": self.spec.seed,
            "tuned_trial": None,
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


def execute(spec: Spec, store: Store, config: dict) -> dict:
    """Run one trial of either phase from its config and write its row (ok or failed)."""
    row = {
        "experiment": spec.name,
        "spec_name": spec.name,
        "spec_hash": spec.hash,
        "phase": config["phase"],
        "cell": config["cell"],
        "trial_number": config["number"],
        "tuned_trial": config["tuned_trial"],
        "attack": spec.attack["name"],
        "method": config["method"],
        "budget": config["budget"],
        "seed": config["seed"],
        "host": socket.gethostname(),
        # Nodes of one machine or one image share a hostname; None outside Ray.
        "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        "versions": results.versions(),
        "started_at": _now(),
        **{c: None for c in results.hyperparameter_types(spec)},
        **{f"hp_{k}": v for k, v in config["params"].items()},
    }
    try:
        args = (config["method"], config["budget"], config["params"], config["number"])
        row |= run_trial(spec, store, *args, report=lambda r: None, seed=config["seed"])
        row |= {"status": "ok", "error": None}
    except CorruptStorage:
        raise  # damaged storage is not this trial's failure: the sweep stops (make_trainable)
    except Exception as e:  # a failing trial is a row, not a crashed sweep
        row |= {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        row |= {"objective": float("nan"), "wall_s": None}
        traceback.print_exc()
    row["finished_at"] = _now()
    results.write_row(store, spec, row)
    return row


def make_trainable(spec: Spec, store_uri: str, threads: int):
    """The Tune function trainable: run one trial, write its row, report what Progress shows."""
    raw, source = spec.raw, spec.source

    def trainable(config: dict) -> None:
        import torch

        torch.set_num_threads(threads)
        try:
            row = execute(Spec(source, raw), open_store(store_uri), config)
        except CorruptStorage as e:  # no row: StopOnCorrupt ends the sweep, `fit` says why
            tune.report({"corrupt": str(e), "objective": math.nan, "ok": False})
            return
        ok = row["status"] == "ok"
        tune.report(
            {
                "objective": row["objective"],
                "ok": ok,
                "feasible": ok and bool(row["feasible"]),
                "r_val": row["residual_val"] if ok else math.nan,
                "r": row["residual"] if ok else math.nan,
            }
        )

    return trainable


def confirm_plan(spec: Spec, df: pd.DataFrame) -> list[dict]:
    """The confirm trials still to run: each cell's best tuned setting on each fresh seed.

    A (cell, seed) is done when its ok row re-ran the current best; if more tuning changed the
    best, the row (same file name: phase, cell, seed) is re-run and replaced, never duplicated.
    """
    if not spec.confirm["seeds"] or not len(df):
        return []
    confirmed = df[(df["phase"] == "confirm") & (df["status"] == "ok")]
    done = set(zip(confirmed["cell"], confirmed["seed"], confirmed["tuned_trial"]))
    configs = []
    for best in results.best_per_cell(df).to_dict("records"):
        for seed in spec.confirm["seeds"]:
            if (best["cell"], seed, best["trial_number"]) in done:
                continue
            configs.append(
                {
                    "phase": "confirm",
                    "cell": best["cell"],
                    "method": best["method"],
                    "budget": best["budget"],
                    "number": seed,
                    "seed": seed,
                    "tuned_trial": best["trial_number"],
                    "params": results.params_of(spec, best),
                }
            )
    # Seed-major: a seed's two checkpoints are trained by its first trial, then loaded.
    return sorted(configs, key=lambda c: (c["seed"], c["cell"]))


class ListSearcher(Searcher):
    """Hands out a fixed list of configs in order: the confirm phase has nothing to search."""

    def __init__(self, configs: list[dict]):
        super().__init__(metric="objective", mode="min")
        self.queue = list(configs)

    def suggest(self, trial_id: str):
        return self.queue.pop(0) if self.queue else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        pass

    # What is left to run is recomputed from the Parquet rows on every start.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            f.write("plan is recomputed from results/\n")

    def restore(self, checkpoint_path: str) -> None:
        pass


def confirm(spec: Spec, storage: str, slots: int) -> None:
    """Re-run each cell's best setting on every `confirm.seeds` seed, as Ray trials like tuning."""
    store = open_store(storage)
    configs = confirm_plan(spec, results.read(store, spec.name))
    if not configs:
        return
    planned: dict[str, int] = {}
    for c in configs:
        planned[c["cell"]] = planned.get(c["cell"], 0) + 1
    cpu, gpu = spec.resources.get("cpu", 1), spec.resources.get("gpu", 0)
    trainable = make_trainable(spec, storage, threads=max(1, int(cpu)))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpu, "gpu": gpu}),
        tune_config=tune.TuneConfig(
            search_alg=ListSearcher(configs),
            num_samples=len(configs),
            max_concurrent_trials=max(1, int(slots)),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"confirm-{_now():%Y%m%d-%H%M%S}",
            storage_path=store.path(f"{spec.name}/tune"),
            storage_filesystem=store.fs,
            callbacks=[Progress("confirm", planned), Retries()],
            stop=StopOnCorrupt(),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    fit(tuner)


def run(
    spec: Spec,
    storage: str,
    address: str | None = None,
    num_cpus: int | None = None,
    resume: bool | None = None,
    max_concurrent: int | None = None,
):
    """Run (or continue) every cell's study to `trials_per_cell` trials, confirm; return the rows.

    `resume`: None starts or continues; False refuses an existing experiment; True needs one
    (`cluster.check_resume`). `max_concurrent` caps parallel trials (`cluster.slots`).
    Before anything is written or Ray starts: the dataset's files are checked, the experiment's
    driver lease is taken (a second driver is refused) and its storage is checked to read back
    whole (`preflight`).
    """
    check_data(spec)
    store = open_store(storage)
    with driver_lease(store, spec.name):
        check_storage(spec, store)
        check_resume(spec, store, resume)
        return _run(spec, store, address, num_cpus, max_concurrent)


def _run(
    spec: Spec,
    store: Store,
    address: str | None,
    num_cpus: int | None,
    max_concurrent: int | None,
) -> pd.DataFrame:
    record_spec(spec, store)
    journal, sync = open_journal(spec, store)
    studies = open_studies(spec, store, journal)
    done = reconcile(spec, store, studies)
    sync()
    searcher = CellSearcher(spec, studies, done, sync)
    remaining = sum(spec.trials_per_cell - searcher.started[c] for c in searcher.cells)
    planned = dict.fromkeys(searcher.cells, spec.trials_per_cell)
    total = sum(planned.values())
    print(f"{spec.name}: {total - remaining}/{total} tuning trials recorded, {remaining} to run")
    if remaining > 0:
        start_ray(address, num_cpus)
        cpu, gpu = spec.resources.get("cpu", 1), spec.resources.get("gpu", 0)
        trainable = make_trainable(spec, store.uri, threads=max(1, int(cpu)))
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpu, "gpu": gpu}),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=remaining,
                max_concurrent_trials=slots(spec, max_concurrent),
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{_now():%Y%m%d-%H%M%S}",
                storage_path=store.path(f"{spec.name}/tune"),
                storage_filesystem=store.fs,
                callbacks=[Progress("tune", planned, results.read(store, spec.name)), Retries()],
                stop=StopOnCorrupt(),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            ),
        )
        fit(tuner)
    if confirm_plan(spec, results.read(store, spec.name)):
        start_ray(address, num_cpus)
        confirm(spec, store.uri, slots(spec, max_concurrent))
    return results.read(store, spec.name)
