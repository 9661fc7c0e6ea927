"""Adaptive trials per cell against a fixed budget, on the quickstart's grid: the unlearning units
each spends and the best each finds per cell, for each rule that can stop a cell
(`convergence.STOP_RULES`: the table's `converged`; `patience`, converged with its best set in
the first half of its trials; `flat`, the sweep's: converged where every trial read r within
noise of the best, else converged with its best in the first third) and for Optuna's own
terminator (`optuna.terminator`). Kept fixed rows carry r on val (`residual_val`), which
`flat` reads; rows kept by an older bench without it are run again.

- fixed: `trials_per_cell: MAX`, the sweep's searcher (`searcher.CellSearcher`) in this process;
- adaptive: `trials_per_cell: {min: MIN, max: MAX}` for MIN in --min and --also, the same
  searcher under each rule. Its samplers are the fixed sweep's (same seeds, TPE start-up from
  max: `searcher.make_sampler`), so each lead's settings are the fixed sweep's first ones: each
  run it asks for is looked up among the fixed sweep's (its setting checked equal, else run),
  and only where it stops differs;
- terminator (at --min): the fixed sweep's rows read in order, a lead stopped at the first
  n >= MIN where `optuna.terminator.Terminator` (regret bound of a GP, against a static error =
  the run's resolution of r, the noise the project's rule uses) says stop for all its cells;
- hindsight (at --min): each lead's stop chosen knowing all the fixed runs, at the target's
  units: the least loss on val any stopping rule could reach (`hindsight`). Printed last: the
  runs the sweep's rule and hindsight give each lead (`stops_against_hindsight`).
Units: each run's own row's `budget_units` (a prefix method's run serves its smaller cells).
Best, read two ways, each over sampler seeds as bench/anytime.py reads it (the mean over cells
x seeds of the difference to the fixed sweep, a 95 % t-interval from the seeds' own means, next
to the noise floor: the fixed sweep against the next sampler seed's):
- val: `results.best_per_cell`'s objective (feasible first, lowest |r| on val, 10 + shortfall
  if infeasible), what the rule sees while tuning. Biased toward more trials: the best of 32
  noisy trials reads lower than the best of 8 even where both chose equally good settings;
- judged (`Judge`): each cell's chosen setting re-run on fresh seeds (default: the quickstart's
  confirm seeds), as the confirm phase re-runs it and the report publishes it: |r| on test
  where both ways' choices are feasible, and how often each is infeasible there.
Target, in the judged reading: >= 2x fewer units, a mean no larger than the noise floor's
upper bound, and infeasible no more often than the fixed sweep's choices. `--keep DIR` keeps
the fixed sweeps' rows, checkpoints and judged runs, so that another run compares rules on the
same runs without re-running them (`make bench`: BENCH_ADAPTIVE_KEEP=DIR).

    .venv/bin/python -m bench adaptive    (or: PYTHONPATH=. python -m bench.adaptive --repeats 5)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch
import yaml
from optuna.terminator import RegretBoundEvaluator, StaticErrorEvaluator, Terminator
from ray.tune.search import Searcher

from raysweep.analysis import convergence
from raysweep.analysis.results import best_per_cell
from raysweep.base.storage import open_store
from raysweep.experiment.spec import Spec, distributions, validate
from raysweep.experiment.trial import derive_seed, run_trial
from raysweep.runner.searcher import (
    STOP_RULE,
    STOP_RULES,
    CellSearcher,
    cell_name,
    enqueue_first,
    make_sampler,
    objective_key,
    runs,
)

# The same reading as bench/anytime.py: mean over cells x seeds, t-interval over the seeds.
from .anytime import mean_ci

QUICKSTART = "search_spaces/quickstart.yaml"
TARGET = 2.0  # the target: this many times fewer units, best no worse on average
KEEP = ["budget", "objective", "feasible", "residual", "residual_val", "resolution",
        "budget_units", "wall_s"]  # fmt: skip


def studies(spec: Spec, repeat: int) -> dict[str, optuna.Study]:
    """In-memory studies as `searcher.open_studies` makes them, the sampler seeded per repeat."""
    out, leads = {}, runs(spec)
    for method, budget in spec.cells():
        name = cell_name(method, budget)
        seed = derive_seed(spec.seed, name, repeat) % 2**32
        sampler = make_sampler(spec.sampler, seed, spec.trials_range()[1])
        out[name] = optuna.create_study(study_name=name, sampler=sampler)
        if name in leads:
            enqueue_first(spec, method, out[name])
    return out


def sweep(spec: Spec, repeat: int, execute, rule: str = STOP_RULE) -> pd.DataFrame:
    """The sweep's searcher, one run at a time; `execute(config)` -> the run's rows."""
    searcher = CellSearcher(spec, studies(spec, repeat), {}, rule=rule)
    out, i = [], 0
    while (config := searcher.suggest(f"t{i}")) != Searcher.FINISHED:
        rows = execute(config)
        result = {objective_key(r["cell"]): r["objective"] for r in rows}
        result |= {f"resolution@{r['cell']}": r["resolution"] for r in rows}
        result |= {f"r_val@{r['cell']}": r["residual_val"] for r in rows}
        result |= {f"feasible@{r['cell']}": r["feasible"] for r in rows}  # as sweep.reported
        searcher.on_trial_complete(f"t{i}", result)
        out += rows
        i += 1
    return pd.DataFrame(out)


def run(spec: Spec, store, config: dict) -> list[dict]:
    """One run as sweep.execute makes it, its rows kept in memory (no Parquet)."""
    at = {b: (c, n) for c, b, n in config["stops"]}
    at[config["budget"]] = (config["cell"], config["number"])
    measured = {}
    args = (config["method"], config["budget"], config["params"], config["number"])
    smaller = tuple(b for b in at if b < config["budget"])
    try:
        run_trial(spec, store, *args, report=lambda r: measured.update({r["budget"]: r}), stops=smaller)  # fmt: skip
    except Exception:  # a diverged setting: failed rows, as sweep.execute writes them
        pass
    failed = dict.fromkeys(KEEP, math.nan) | {"feasible": False}
    return [
        ({k: measured[b][k] for k in KEEP} | {"status": "ok"} if b in measured else failed | {"budget": b, "status": "failed"})
        | {"cell": cell, "trial_number": number}
        | {"method": config["method"], "lead": config["cell"], "run": config["number"]}
        | {"params": config["params"], "setting": repr(sorted(config["params"].items()))}
        for b, (cell, number) in sorted(at.items())
    ]  # fmt: skip


def replay(spec: Spec, store, fixed: pd.DataFrame, missed: list):
    """An `execute` that returns the fixed sweep's rows of the same run (same setting)."""
    by_run = {k: g.to_dict("records") for k, g in fixed.groupby(["lead", "run"])}

    def execute(config: dict) -> list[dict]:
        rows = by_run.get((config["cell"], config["number"]), [])
        if rows and rows[0]["setting"] == repr(sorted(config["params"].items())):
            return rows
        missed.append((config["cell"], config["number"]))  # not a prefix: run it
        return run(spec, store, config)

    return execute


def terminator_stops(spec: Spec, fixed: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """The fixed sweep's rows a terminator-stopped sweep would hold, and seconds it took."""
    low, high = spec.trials_range()
    t0, keep = time.perf_counter(), []
    for lead, cells in runs(spec).items():
        mine = fixed[fixed["lead"] == lead]
        method = mine["method"].iloc[0]
        stop = high
        for n in range(low, high):
            if all(_terminate(spec, method, mine[(mine["cell"] == c)], n) for c, _ in cells):
                stop = n
                break
        keep.append(mine[mine["run"] < stop])
    return pd.concat(keep), time.perf_counter() - t0


def _terminate(spec: Spec, method: str, rows: pd.DataFrame, n: int) -> bool:
    """`optuna.terminator.Terminator` on a cell's first n trials (objective by trial order)."""
    dists, _ = distributions(method, spec.methods[method])
    rows = rows.sort_values("trial_number").iloc[:n]
    rows = rows[rows["status"] == "ok"]  # a failed run is no evidence either way
    if rows.empty:
        return False
    study = optuna.create_study()
    for r in rows.itertuples():
        params = {k: v for k, v in r.params.items() if k in dists}
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=dists, value=r.objective)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental, and deprecated since Optuna 4.9
        terminator = Terminator(
            improvement_evaluator=RegretBoundEvaluator(seed=0),
            error_evaluator=StaticErrorEvaluator(float(rows["resolution"].iloc[0])),
            min_n_trials=1,
        )
        return terminator.should_terminate(study)


def _chosen(df: pd.DataFrame) -> pd.DataFrame:
    """Each cell's best row as the sweep picks it (`results.best_per_cell`)."""
    return best_per_cell(df.assign(phase="tune", attack="gaussian")).set_index(["method", "budget"])


def _bests(df: pd.DataFrame) -> pd.Series:
    return _chosen(df)["objective"]


class Judge:
    """Each cell's chosen setting re-run on fresh seeds (the quickstart's `confirm.seeds`), as
    the sweep's confirm phase re-runs it and the report publishes it. Unlike the best on val it
    carries no winner's curse: the best of 32 noisy trials reads lower than the best of 8 even
    where both chose equally good settings. -> one row per cell and seed: `abs_r` (|r| on test)
    and `feasible` (a run that fails is not). Runs are memoised by (method, budget, setting,
    seed), in `cache` (a JSON file) if given, so that ways choosing the same setting share its
    runs and a re-run reads them back."""

    def __init__(self, spec: Spec, store, seeds: list[int], cache: Path | None):
        self.spec, self.store, self.seeds, self.cache = spec, store, seeds, cache
        self.runs = json.loads(cache.read_text()) if cache and cache.is_file() else {}
        self.ran = 0

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        chosen = _chosen(rows).reset_index()
        out = []  # seed-major: `prepare` keeps a few seeds' checkpoints per process
        for seed in self.seeds:
            for r in chosen.itertuples():
                got = self._run(r.method, r.from_budget, r.params, seed)
                out.append({"method": r.method, "budget": r.budget, "seed": seed} | got)
        return pd.DataFrame(out).set_index(["method", "budget", "seed"])

    def _run(self, method: str, budget: float, params: dict, seed: int) -> dict:
        key = json.dumps([method, budget, sorted(params.items()), seed])
        if key not in self.runs:
            got = []
            try:
                run_trial(self.spec, self.store, method, budget, params, seed, got.append, seed)
                row = got[-1]
                self.runs[key] = {"abs_r": abs(row["residual"]), "feasible": bool(row["feasible"])}
            except Exception:  # a diverged setting: as a failed confirm row
                self.runs[key] = {"abs_r": math.nan, "feasible": False}
            self.ran += 1
            if self.cache and self.ran % 20 == 0:
                self.save()
        return self.runs[key]

    def save(self) -> None:
        if self.cache:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            self.cache.write_text(json.dumps(self.runs))


def judged_worse(a: pd.DataFrame, b: pd.DataFrame) -> pd.Series:
    """Per cell, a's |r| - b's on the fresh seeds where both chosen settings are feasible (a
    setting's |r| where it costs too much accuracy is not a result; those are counted apart)."""
    both = a["feasible"] & b["feasible"]
    return (a["abs_r"] - b["abs_r"])[both].groupby(["method", "budget"]).mean()


def _units(df: pd.DataFrame) -> float:
    return df.groupby(["lead", "run"])["budget_units"].max().sum()


def hindsight(fixed: pd.DataFrame, best: pd.Series, low: int) -> pd.DataFrame:
    """What no stopping rule can beat on val: each lead's stop n in [low, max] chosen knowing
    every fixed run, minimising the summed best - fixed's best over cells within 1/TARGET of the
    fixed units. A multiple-choice knapsack, solved over a sweep of Lagrange weights on units
    (exact enough: the curves are few and short). -> the fixed rows those stops keep."""
    curves = []  # per lead: (units, summed loss, its rows) at each stop
    for _, mine in fixed.groupby("lead"):
        curve = []
        for n in range(low, mine["run"].max() + 2):
            prefix = mine[mine["run"] < n]
            curve.append((_units(prefix), float((_bests(prefix) - best).sum()), prefix))
        curves.append(curve)
    total, chosen = _units(fixed), [c[0] for c in curves]  # all at `low` if nothing else fits
    for weight in np.logspace(-9, 1, 400):
        pick = [min(c, key=lambda point: point[1] + weight * point[0]) for c in curves]
        fits = sum(u for u, _, _ in pick) <= total / TARGET
        if fits and sum(w for _, w, _ in pick) < sum(w for _, w, _ in chosen):
            chosen = pick
    return pd.concat([rows for _, _, rows in chosen])


def stops_against_hindsight(reps: list[dict], way: tuple[str, int]) -> str:
    """Per lead, the runs `way` and hindsight give it, mean over seeds, and on how many seeds
    `way` stopped it before hindsight did: whether a rule's loss is in how much it gives each
    method (the means differ) or in when, seed by seed (they agree, the early stops do not)."""
    runs = lambda rows: rows.groupby("lead")["run"].max() + 1
    per = pd.DataFrame(
        [{"rule": runs(r["variants"][way]), "hindsight": runs(r["variants"]["hindsight", way[1]])}
         for r in reps]
    )  # fmt: skip
    rule, hind = pd.DataFrame(list(per["rule"])), pd.DataFrame(list(per["hindsight"]))
    table = pd.DataFrame({f"{way[0]} runs": rule.mean(), "hindsight runs": hind.mean(),
                          "seeds stopped earlier": (rule < hind).sum()})  # fmt: skip
    return f"runs per lead, mean over {len(reps)} seeds:\n{table.round(1).to_string()}"


def fixed_sweep(spec: Spec, store, repeat: int, keep: str | None) -> pd.DataFrame:
    """The fixed sweep's rows; with `keep` (a folder), read from or written to a file there, so
    that rules compared on the same runs do not re-run them (a run is deterministic given the
    spec and the sampler seed; the file is named by both)."""
    path = Path(keep or ".") / f"fixed-{spec.hash[:12]}-{repeat}.parquet"
    if keep and path.is_file():
        rows = pd.read_parquet(path)
        if set(KEEP) <= set(rows.columns):  # else kept by an older bench: run again
            return rows.assign(params=rows["params"].map(json.loads))
    rows = sweep(spec, repeat, lambda c: run(spec, store, c))
    if keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.assign(params=rows["params"].map(json.dumps)).to_parquet(path)
    return rows


def one_repeat(base: dict, store, low: int, high: int, repeat: int, also: list[int],
               keep: str | None = None) -> dict:  # fmt: skip
    """The fixed sweep's rows and, read off the same runs, the rows each way of stopping keeps:
    {(rule, min): rows} for each searcher rule at each min, the terminator's and hindsight's."""
    fixed_spec = validate(copy.deepcopy(base) | {"trials_per_cell": high}, "bench/adaptive.py")
    t0 = time.perf_counter()
    fixed = fixed_sweep(fixed_spec, store, repeat, keep)
    fixed_s = time.perf_counter() - t0
    missed = []
    # Each rule at each min, read off the same fixed runs (the samplers' start-up is from max:
    # a prefix, so a replayed run is the fixed sweep's own unless `missed` says otherwise).
    variants, specs = {}, {}
    for m in (low, *also):
        spec = specs[m] = validate(
            copy.deepcopy(base) | {"trials_per_cell": {"min": m, "max": high}}
        )
        for rule in STOP_RULES:
            variants[rule, m] = sweep(spec, repeat, replay(spec, store, fixed, missed), rule)
    variants["terminator", low], term_s = terminator_stops(specs[low], fixed)
    variants["hindsight", low] = hindsight(fixed, _bests(fixed), low)
    return {
        "fixed": fixed,
        "variants": variants,
        "missed": len(missed),
        "fixed_s": fixed_s,
        "terminator_s": term_s,
        "resolution": float(fixed["resolution"].dropna().iloc[0]),
        "failed_runs": int((fixed["status"] != "ok").sum()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min", type=int, default=8, help="trials_per_cell min (adaptive)")
    p.add_argument("--max", type=int, default=32, help="its max, and the fixed sweep's count")
    p.add_argument(
        "--repeats", type=int, default=10, help="sampler seeds (5 gave opposite verdicts)"
    )
    p.add_argument("--also", default="", help="other mins (comma-separated), on the same runs")
    p.add_argument("--methods", default=None, help="comma-separated (default: the quickstart's)")
    p.add_argument("--first-seed", type=int, default=0, help="sampler seeds from this one")
    kept = "folder keeping the fixed sweeps' rows and checkpoints between runs"
    kept += " (default: $BENCH_ADAPTIVE_KEEP, else none: everything re-run)"
    p.add_argument("--keep", default=os.environ.get("BENCH_ADAPTIVE_KEEP"), help=kept)
    judged = "seeds each cell's chosen setting is re-run on (default: the quickstart's confirm"
    judged += " seeds; empty: judge on val only)"
    p.add_argument("--judge-seeds", default=None, help=judged)
    patience = "flat's p: a cell that is not flat stops once its best lies in the first 1/p"
    p.add_argument("--flat-patience", type=int, default=convergence.FLAT_PATIENCE, help=patience)
    args = p.parse_args(argv or [])  # `make bench` calls main() with its own sys.argv
    convergence.FLAT_PATIENCE = args.flat_patience  # the rule reads it per call (this process)
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with open(QUICKSTART) as f:
        base = yaml.safe_load(f)
    if args.judge_seeds is None:
        args.judge_seeds = ",".join(map(str, base["confirm"]["seeds"]))
    base |= {"name": "bench-adaptive", "confirm": {"seeds": []}}
    if args.methods:
        keep = args.methods.split(",")
        base["methods"] = {m: base["methods"][m] for m in keep}
        base["tried_first"] = {m: v for m, v in base.get("tried_first", {}).items() if m in keep}
    judge_seeds = [int(x) for x in args.judge_seeds.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"{args.keep}/store" if args.keep else tmp)
        also = [int(m) for m in args.also.split(",") if m]
        seeds = range(args.first_seed, args.first_seed + args.repeats)
        reps = [one_repeat(base, store, args.min, args.max, r, also, args.keep) for r in seeds]
        spec = validate(copy.deepcopy(base) | {"trials_per_cell": args.max}, "bench/adaptive.py")
        cache = Path(args.keep) / f"judged-r-{spec.hash[:12]}.json" if args.keep else None
        judge = Judge(spec, store, judge_seeds, cache)
        t0 = time.perf_counter()
        for r in reps:  # each way's choices on the fresh seeds, and the fixed sweep's
            r["judged"] = (
                {k: judge(rows) for k, rows in r["variants"].items()} if judge_seeds else {}
            )
            r["fixed_judged"] = judge(r["fixed"]) if judge_seeds else None
        judge.save()
        judge_s = time.perf_counter() - t0
    return summary(args, reps, judge_seeds) | {"judge_runs": judge.ran, "judge_s": judge_s}


def summary(args, reps: list[dict], judge_seeds: list[int]) -> dict:
    """Print and return each way's units ratio and its bests against the fixed sweep's."""
    n = len(_bests(reps[0]["fixed"]))
    out = {
        "min": args.min,
        "max": args.max,
        "seeds": f"{args.first_seed}-{args.first_seed + len(reps) - 1}",
    }
    out |= {"cells": n, "rule": STOP_RULE, "resolution": reps[0]["resolution"]}
    out["flat_patience"] = convergence.FLAT_PATIENCE
    out |= {"judged_on": ",".join(map(str, judge_seeds)) or "-"}
    out["not_prefix_runs"] = sum(r["missed"] for r in reps)  # 0: adaptive = fixed, stopped
    out["failed_rows_fixed"] = sum(r["failed_runs"] for r in reps)
    print(f"quickstart grid, {n} cells, trials_per_cell {{min, max: {args.max}}} vs {args.max}, "
          f"sampler seeds {out['seeds']}; resolution of r {out['resolution']:.3f}")  # fmt: skip
    # Two readings of "best - fixed's best": on val while tuning (what the rule sees; biased
    # toward more trials), and judged on the fresh seeds (what the report publishes).
    pick = {"val": lambda r, k: r["variants"][k] if k else r["fixed"]}
    worse = {"val": lambda a, b: _bests(a) - _bests(b)}
    if judge_seeds:
        print(f"judged: each cell's chosen setting re-run on seeds {out['judged_on']}: |r| where "
              "both are feasible, and how often each is infeasible there")  # fmt: skip
        pick["judged"] = lambda r, k: r["judged"][k] if k else r["fixed_judged"]
        worse["judged"] = judged_worse
    floor = {}
    for name in pick:
        # The noise floor: the fixed sweep against the next sampler seed's fixed sweep.
        nxt = [reps[(i + 1) % len(reps)] for i in range(len(reps))]
        floor[name] = f = mean_ci([worse[name](pick[name](b, None), pick[name](a, None)) for a, b in zip(reps, nxt)])  # fmt: skip
        print(f"noise floor, {name} (fixed vs the next seed's fixed): {f[0]:+.4f} [{f[1]:+.4f}, {f[2]:+.4f}]")  # fmt: skip
        out |= dict(zip([f"noise_floor_{name}_{x}" for x in ("mean", "lo", "hi")], f))
    if judge_seeds:
        bad = sum(int((~r["fixed_judged"]["feasible"]).sum()) for r in reps)
        out["fixed_infeasible_judged"] = bad
        print(f"fixed: infeasible in {bad} of {n * len(reps) * len(judge_seeds)} judged runs")
    for rule, m in reps[0]["variants"]:
        key = f"{rule}_min{m}"
        ratios = pd.Series([_units(r["fixed"]) / _units(r["variants"][rule, m]) for r in reps])
        obs = pd.concat([r["variants"][rule, m].groupby("cell").size() for r in reps])
        line = (f"{rule} min {m}: {obs.mean():.1f} settings per cell ({(obs >= args.max).mean():.0%} "
                f"at max), units fixed / this {ratios.mean():.2f}x ± {ratios.std(ddof=1):.2f}")  # fmt: skip
        out |= {f"{key}_units_ratio": ratios.mean(), f"{key}_observed_mean": obs.mean()}
        for name in pick:
            diffs = [worse[name](pick[name](r, (rule, m)), pick[name](r, None)) for r in reps]
            mean, lo, hi = mean_ci(diffs)
            no_worse = sum(int((d <= 1e-12).sum()) for d in diffs)
            line += (f"; best - fixed's, {name}: {mean:+.4f} [{lo:+.4f}, {hi:+.4f}], "
                     f"no worse in {no_worse} of {sum(len(d) for d in diffs)}")  # fmt: skip
            out |= {f"{key}_{name}_worse_mean": mean, f"{key}_{name}_worse_lo": lo}
            out |= {f"{key}_{name}_worse_hi": hi}
        # Met: 2x fewer units, and the mean difference no larger than the noise floor's upper
        # bound, in the reading the report publishes (judged, and infeasible on the fresh seeds
        # no more often than the fixed sweep's choices; val where nothing is judged).
        name = "judged" if judge_seeds else "val"
        met = ratios.mean() >= TARGET and out[f"{key}_{name}_worse_mean"] <= floor[name][2]
        if judge_seeds:
            bad = sum(int((~r["judged"][rule, m]["feasible"]).sum()) for r in reps)
            out[f"{key}_infeasible_judged"] = bad
            line += f"; infeasible in {bad} judged runs"
            met = met and bad <= out["fixed_infeasible_judged"]
        out[f"{key}_target_met"] = bool(met)
        print(line + f"; target ({name}) {'met' if met else 'not met'}")
    out["target_met"] = out[f"{STOP_RULE}_min{args.min}_target_met"]  # the searcher's own rule
    print(stops_against_hindsight(reps, (STOP_RULE, args.min)))
    out["fixed_s_per_seed"] = sum(r["fixed_s"] for r in reps) / len(reps)
    out["fixed_rows_kept"] = bool(args.keep)  # then fixed_s is reading them, not running
    out["terminator_s_per_seed"] = sum(r["terminator_s"] for r in reps) / len(reps)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
