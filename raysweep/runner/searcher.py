"""The sweep's searchers: one Optuna study per (method, budget) cell, and who samples for whom.

Anytime budgets: a method whose shorter runs are prefixes of longer ones (every method outside
`unlearners.PER_BUDGET`) runs once, at its largest budget, and is measured at each smaller budget
on the way (`trial.run_trial(stops=...)`). Only the largest cell's study samples (the run's
*lead*); each smaller cell's study receives the same setting as a trial of its own, so every
study holds one row per setting it observed and is told that row's value. (Letting the cells take
turns at sampling, each study steering towards its own budget's optimum, was tried with a
variant of bench/anytime.py and not kept: it did no better than the largest cell alone on that
benchmark's measures, `cells_no_worse` and `worse_mean` of the `anytime` entry in
bench/results.md, which measures this design against one run per cell.) A PER_BUDGET method's
cells each lead their own runs. Every cell thus observes as many settings as its lead runs; a
prefix method spends them at its largest budget, a PER_BUDGET method at each budget.

How many: `trials_per_cell` n runs n per lead. A range {min, max} runs `min` per lead, then more
only for a lead one of whose cells may not stop yet by convergence.STOP_RULE ("flat", on the rows
so far: a cell whose every trial read r within noise of its best stops once converged by the
table's rule, any other once also its best was set in the first third of its trials;
convergence.py) or has no feasible row yet, until all its cells may stop or it ran `max`.
Either way a stopped cell is `converged`, so the table's `stopped` reads converged / at max.
A prefix method's lead thus runs on while any of its smaller cells may not stop: each run is
that cell's next setting too. Past `min`, a lead has at most as many runs in flight as the rule
needs at least (convergence.STOP_RULES), so parallel trials never run past an answer already
known. (The rules, against each other and against `optuna.terminator` on the same cells:
bench/adaptive.py.)
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

from raysweep.analysis.convergence import STOP_RULE, STOP_RULES, needed, still_needed
from raysweep.base.storage import Store
from raysweep.experiment.spec import Spec, distributions
from raysweep.experiment.trial import derive_seed
from raysweep.unlearning.unlearners import PER_BUDGET

from .cluster import open_journal
from .rows import params_of

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
    """The spec's sampler for one cell's study (bench/tpe_vs_random.py compares the two).
    `trials_per_cell`: the most the cell may observe (a range's max), so an adaptive cell's
    settings are the first ones a fixed sweep at that max would try: it only stops earlier."""
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
        sampler = make_sampler(spec.sampler, seed, spec.trials_range()[1])
        if name in existing:  # create_study(load_if_exists) would append a line to find out
            studies[name] = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
            continue
        studies[name] = optuna.create_study(study_name=name, storage=storage, sampler=sampler)
        if name in leads:  # smaller cells get their lead's settings
            enqueue_first(spec, method, studies[name])
    return studies


def enqueue_first(spec: Spec, method: str, study: optuna.Study) -> None:
    """Queue the spec's `tried_first` settings as a new study's first trials, in listed order.

    At most `trials_per_cell` (a range's max) of them (the list is in priority order), so a short
    sweep tries the first ones. Only a new study gets them: a resumed one already ran (or queued)
    its own.
    """
    for params in spec.tried_first.get(method, [])[: spec.trials_range()[1]]:
        study.enqueue_trial(params)


def observe(study: optuna.Study, trial: optuna.Trial) -> int:
    """Add `trial`'s setting to `study` as a running trial; return its number there."""
    study.add_trial(
        create_trial(
            state=TrialState.RUNNING, params=trial.params, distributions=trial.distributions
        )
    )
    return study.get_trials(deepcopy=False)[-1].number  # the driver is the only writer


# What convergence.py reads of a row.
RULE_COLUMNS = ("phase", "status", "attack", "method", "budget", "cell", "trial_number",
                "objective", "objective_noise", "residual_val", "resolution", "tuned_trial",
                "feasible")  # fmt: skip


def objective_key(cell: str) -> str:
    """The key under which a trial reports the objective of its row for `cell`."""
    return f"objective@{cell}"


class CellSearcher(Searcher):
    """Hands out runs lead by lead (fewest started first) and tells each result to its study.

    `rows`: the experiment's rows so far (results.read; None for a new one), which the
    convergence rule of a `trials_per_cell` range reads, tuning and confirm rows alike.
    """

    def __init__(
        self,
        spec: Spec,
        studies: dict[str, optuna.Study],
        done: dict[str, set[int]],
        sync: Callable[[], None] = lambda: None,
        rows: pd.DataFrame | None = None,
        rule: str = STOP_RULE,
    ):
        super().__init__(metric="objective", mode="min")
        if rule not in STOP_RULES:
            raise ValueError(f"stopping rule {rule!r}: one of {', '.join(STOP_RULES)}")
        self.rule = rule  # what a cell's trials must satisfy before it stops (convergence.py)
        self.spec = spec
        self.studies = studies
        self.sync = sync  # makes the journal durable (object stores): after every ask and tell
        self.runs = runs(spec)
        self.cells = {cell_name(m, b): (m, b) for m, b in spec.cells()}
        self.spaces = {m: distributions(m, s) for m, s in spec.methods.items()}
        self.low, self.high = spec.trials_range()
        self.started = {lead: len(done.get(lead, ())) for lead in self.runs}
        self.told = dict(self.started)
        self.live: dict[str, list[tuple[str, int]]] = {}
        self.rows = (
            []
            if rows is None or not len(rows)
            else rows.reindex(columns=list(RULE_COLUMNS)).to_dict("records")
        )
        self.need = dict.fromkeys(self.runs, 0)
        self._update_needs(set(spec.methods))

    def _update_needs(self, methods: set[str]) -> None:
        """`need` per lead of `methods`: runs its cells need at least before all may stop (0:
        all may). A cell's rule reads only its own method's rows (convergence.py), so after a
        told run only that method's leads are recomputed, from its rows alone (the whole table
        after every run grew with the square of a long sweep's rows)."""
        if self.low == self.high:  # a fixed budget: the rule decides nothing
            return
        rows = pd.DataFrame(
            [r for r in self.rows if r["method"] in methods], columns=list(RULE_COLUMNS)
        )
        by_cell = {cell_name(m, b): n for (m, b), n in still_needed(rows, self.rule).items()}
        for lead, cells in self.runs.items():
            if self.cells[lead][0] in methods:
                self.need[lead] = max(by_cell.get(name, needed([], math.nan)) for name, _ in cells)

    def _wanted(self, lead: str) -> bool:
        n = self.started[lead]
        if n < self.low:
            return True
        return n < self.high and n - self.told[lead] < self.need[lead]

    @property
    def remaining(self) -> int:
        """Runs (Tune trials) that may still start: at most each open lead's max."""
        open_ = [c for c in self.runs if self._wanted(c) or self.started[c] > self.told[c]]
        return sum(self.high - self.started[c] for c in open_)

    def suggest(self, trial_id: str):
        wanted = [c for c in self.runs if self._wanted(c)]
        if not wanted:  # a run in flight may still un-converge its cells: wait for it
            return None if self.live else Searcher.FINISHED
        lead = min(wanted, key=lambda c: self.started[c])
        method, budget = self.cells[lead]
        dists, fixed = self.spaces[method]
        trial = self.studies[lead].ask(dists)
        # The smaller cells observe the same setting: a running trial in each one's study.
        smaller = self.runs[lead][:-1]
        stops = [[name, b, observe(self.studies[name], trial)] for name, b in smaller]
        self.sync()  # before the trial can start, so a resumed driver knows it was asked
        self.started[lead] += 1
        self.live[trial_id] = [(c, n) for c, _, n in stops] + [(lead, trial.number)]
        return {
            "phase": "tune",
            "cell": lead,
            "method": method,
            "budget": budget,
            "number": trial.number,
            "seed": self.spec.seed,
            "tuned_trial": None,
            "params": {**fixed, **trial.params},
            "stops": stops,  # [cell, budget, trial number in its study]
        }

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        cells = self.live.pop(trial_id)
        for name, number in cells:
            value = (result or {}).get(objective_key(name))
            ok = not error and value is not None and math.isfinite(value)
            if ok:
                self.studies[name].tell(number, value)
            else:
                self.studies[name].tell(number, state=TrialState.FAIL)
            method, budget = self.cells[name]
            got = {k: (result or {}).get(f"{k}@{name}", math.nan)
                   for k in ("resolution", "objective_noise", "r_val")}  # fmt: skip
            self.rows.append({"phase": "tune", "status": "ok" if ok else "failed",
                              "attack": self.spec.attack["name"], "method": method,
                              "budget": budget, "cell": name, "trial_number": number,
                              "objective": value if ok else math.nan,
                              "objective_noise": got["objective_noise"],
                              "residual_val": got["r_val"] if ok else math.nan,
                              "resolution": got["resolution"], "tuned_trial": None,
                              "feasible": ok and bool((result or {}).get(f"feasible@{name}"))})  # fmt: skip
        self.told[cells[-1][0]] += 1  # the run's own cell (its lead) is last
        self._update_needs({self.cells[cells[-1][0]][0]})
        self.sync()

    # The state lives in the journal, not in Tune's searcher checkpoint.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            f.write("state is in optuna.journal\n")

    def restore(self, checkpoint_path: str) -> None:
        pass


def reconcile(studies: dict[str, optuna.Study], df: pd.DataFrame) -> dict[str, set[int]]:
    """Match the studies with the Parquet rows `df` (`results.read`) before (re)starting; return
    each cell's done trials.

    A trial still RUNNING in a study belongs to a driver that died. If its row reached storage,
    the study learns the row's result; otherwise it is marked FAIL (interrupted) and re-planned
    (a lead's run; its smaller cells' trials, rowless too, are marked FAIL with it).
    """
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


def rebuild(spec: Spec, store: Store, df: pd.DataFrame) -> str | None:
    """Rebuild every cell's study from its tuning rows (`df`, `results.read`), in a new journal;
    return where the old journal was kept (None if there was none).

    Each row becomes the trial of its number in its cell's study, with its parameters and
    objective (failed if its row failed); a number without a row (an interrupted trial) becomes
    a failed trial, so new trials are numbered after every row and never take a row's file name.
    A study without rows starts as a new one (`open_studies`: its `tried_first` queued).
    """
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
    params = {k: v for k, v in params_of(spec, row).items() if k in dists}
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
