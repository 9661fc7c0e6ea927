"""The sweep's searchers: one Optuna study per (method, budget) cell, and who samples for whom.

Anytime budgets: a method whose shorter runs are prefixes of longer ones (every method outside
`unlearners.PER_BUDGET`) runs once, at its largest budget, and is measured at each smaller budget
on the way (`trial.run_trial(checkpoints=...)`). Only the largest cell's study samples (the run's
*lead*); each smaller cell's study receives the same setting as a trial of its own, so every
study holds one row per setting it observed and is told that row's value. (Letting the cells take
turns at sampling, each study steering towards its own budget's optimum, was measured with a
variant of bench/anytime.py on 2026-12-03, not kept: no better, 58 vs 56 of 75 cells no worse than
one run per cell, mean difference -0.043 vs -0.044; so the largest cell alone samples.) A PER_BUDGET method's cells
each lead their own runs. Every cell thus observes exactly `trials_per_cell` settings; a
prefix method spends `trials_per_cell` runs at its largest budget, a PER_BUDGET method
`trials_per_cell` runs at each budget.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable

import optuna
import pandas as pd
from optuna.storages.journal import JournalStorage
from optuna.trial import TrialState, create_trial
from ray.tune.search import Searcher

from . import results
from .cluster import open_journal
from .spec import Spec, distributions
from .storage import Store
from .trial import derive_seed
from .unlearners import PER_BUDGET

optuna.logging.set_verbosity(optuna.logging.WARNING)


def cell_name(method: str, budget: float) -> str:
    return f"{method}-b{budget:g}"


def runs(spec: Spec) -> dict[str, list[tuple[str, float]]]:
    """Each lead cell (its study samples) -> the (cell, budget)s its runs are measured at,
    smallest budget first and the lead's own last."""
    out = {}
    for method in spec.methods:
        cells = [(cell_name(method, b), b) for b in sorted(spec.budgets)]
        if method in PER_BUDGET:
            out |= {name: [(name, b)] for name, b in cells}
        else:
            out[cells[-1][0]] = cells
    return out


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
    leads = runs(spec)
    for method, budget in spec.cells():
        name = cell_name(method, budget)
        seed = derive_seed(spec.seed, name) % 2**32
        sampler = make_sampler(spec.sampler, seed, spec.trials_per_cell)
        if name in existing:  # create_study(load_if_exists) would append a line to find out
            studies[name] = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
            continue
        studies[name] = optuna.create_study(study_name=name, storage=storage, sampler=sampler)
        if name in leads:  # smaller cells get their lead's settings
            enqueue_first(spec, method, studies[name])
    return studies


def enqueue_first(spec: Spec, method: str, study: optuna.Study) -> None:
    """Queue the spec's `tried_first` settings as a new study's first trials, in listed order.

    At most `trials_per_cell` of them (the list is in priority order), so a short sweep tries the
    first ones. Only a new study gets them: a resumed one already ran (or queued) its own.
    """
    for params in spec.raw.get("tried_first", {}).get(method, [])[: spec.trials_per_cell]:
        study.enqueue_trial(params)


def observe(study: optuna.Study, trial: optuna.Trial) -> int:
    """Add `trial`'s setting to `study` as a running trial; return its number there."""
    study.add_trial(
        create_trial(
            state=TrialState.RUNNING, params=trial.params, distributions=trial.distributions
        )
    )
    return study.get_trials(deepcopy=False)[-1].number  # the driver is the only writer


def objective_key(cell: str) -> str:
    """The key under which a trial reports the objective of its row for `cell`."""
    return f"objective@{cell}"


class CellSearcher(Searcher):
    """Hands out runs lead by lead (fewest started first) and tells each result to its study."""

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
        self.runs = runs(spec)
        self.cells = {cell_name(m, b): (m, b) for m, b in spec.cells()}
        self.spaces = {m: distributions(m, s) for m, s in spec.methods.items()}
        self.started = {lead: len(done.get(lead, ())) for lead in self.runs}
        self.live: dict[str, list[tuple[str, int]]] = {}

    @property
    def remaining(self) -> int:
        """Runs (Tune trials) still to start."""
        return sum(self.spec.trials_per_cell - n for n in self.started.values())

    def suggest(self, trial_id: str):
        open_leads = [c for c in self.runs if self.started[c] < self.spec.trials_per_cell]
        if not open_leads:
            return Searcher.FINISHED
        lead = min(open_leads, key=lambda c: self.started[c])
        method, budget = self.cells[lead]
        dists, fixed = self.spaces[method]
        trial = self.studies[lead].ask(dists)
        # The smaller cells observe the same setting: a running trial in each one's study.
        smaller = self.runs[lead][:-1]
        checkpoints = [[name, b, observe(self.studies[name], trial)] for name, b in smaller]
        self.sync()  # before the trial can start, so a resumed driver knows it was asked
        self.started[lead] += 1
        self.live[trial_id] = [(c, n) for c, _, n in checkpoints] + [(lead, trial.number)]
        return {
            "phase": "tune",
            "cell": lead,
            "method": method,
            "budget": budget,
            "number": trial.number,
            "seed": self.spec.seed,
            "tuned_trial": None,
            "params": {**fixed, **trial.params},
            "checkpoints": checkpoints,  # [cell, budget, trial number in its study]
        }

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        for name, number in self.live.pop(trial_id):
            value = (result or {}).get(objective_key(name))
            if error or value is None or not math.isfinite(value):
                self.studies[name].tell(number, state=TrialState.FAIL)
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
    the study learns the row's result; otherwise it is marked FAIL (interrupted) and re-planned
    (a lead's run; its smaller cells' trials, rowless too, are marked FAIL with it).
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
            if t.state == TrialState.RUNNING:
                if row is not None and row.status == "ok":
                    study.tell(t.number, row.objective)
                else:
                    study.tell(t.number, state=TrialState.FAIL)
            if row is not None:
                done.setdefault(name, set()).add(t.number)
    return done


def rebuild(spec: Spec, store: Store) -> str | None:
    """Rebuild every cell's study from its tuning rows, in a new journal; return where the old
    journal was kept (None if there was none).

    Each row becomes the trial of its number in its cell's study, with its parameters and
    objective (failed if its row failed); a number without a row (an interrupted trial) becomes
    a failed trial, so new trials are numbered after every row and never take a row's file name.
    A study without rows starts as a new one (`open_studies`: its `tried_first` queued).
    """
    df = results.read(store, spec.name)
    rel, kept = f"{spec.name}/optuna.journal", None
    if store.exists(rel):  # kept, not deleted: it may hold what the rows do not
        kept = f"{rel}.replaced-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
        store.write(kept, store.read(rel))
        store.delete(rel)
    journal, sync = open_journal(spec, store)
    tuned = df[df["phase"] == "tune"] if len(df) else pd.DataFrame(columns=["cell", "method"])
    for cell, rows in tuned.groupby("cell"):
        method = rows["method"].iloc[0]
        dists, _ = distributions(method, spec.methods[method])
        by_number = {int(r["trial_number"]): r for r in rows.to_dict("records")}
        trials = [_as_trial(spec, by_number.get(n), dists) for n in range(max(by_number) + 1)]
        optuna.create_study(study_name=cell, storage=journal).add_trials(trials)
    open_studies(spec, store, journal)
    sync()
    return kept and store.path(kept)


def _as_trial(spec: Spec, row: dict | None, dists: dict) -> optuna.trial.FrozenTrial:
    """A row as a finished trial of its study: COMPLETE with its objective if it is ok, else FAIL."""
    if row is None:
        return create_trial(state=TrialState.FAIL)
    params = {k: v for k, v in results.params_of(spec, row).items() if k in dists}
    ok = row["status"] == "ok" and math.isfinite(row["objective"])
    return create_trial(
        state=TrialState.COMPLETE if ok else TrialState.FAIL,
        value=row["objective"] if ok else None,
        params=params,
        distributions={k: dists[k] for k in params},
    )


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
