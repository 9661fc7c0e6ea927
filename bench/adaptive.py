"""Adaptive trials per cell against a fixed budget, on the quickstart's grid: the unlearning units
each spends and the best each finds per cell, for each rule that can stop a cell
(`searcher.STOP_RULES`: the table's `converged`, and `patience`, converged with its best set in
the first half of its trials) and for Optuna's own terminator (`optuna.terminator`).

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
  units: the least loss any stopping rule could reach (`hindsight`).
Units: each run's own row's `budget_units` (a prefix method's run serves its smaller cells).
Best: `results.best_per_cell` (feasible first, lowest objective: |r| on val, 10 + shortfall if
infeasible). Over sampler seeds, as bench/anytime.py reads it: the mean over cells x seeds of
(best - fixed's best) with a 95 % t-interval from the seeds' own means, next to the noise floor
(fixed against itself with the next sampler seed). Target: >= 2x fewer units and a mean no
larger than the noise floor's upper bound. No confirm phase: the rule's noise is the
resolution, as while tuning. `--keep DIR` keeps the fixed sweeps' rows (and checkpoints) so
that another run compares rules on the same runs without re-running them (`make bench`:
BENCH_ADAPTIVE_KEEP=DIR).

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
KEEP = ["budget", "objective", "feasible", "residual", "resolution", "budget_units", "wall_s"]


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


def _bests(df: pd.DataFrame) -> pd.Series:
    frame = df.assign(phase="tune", attack="gaussian")
    return best_per_cell(frame).set_index(["method", "budget"])["objective"]


def _units(df: pd.DataFrame) -> float:
    return df.groupby(["lead", "run"])["budget_units"].max().sum()


def hindsight(fixed: pd.DataFrame, best: pd.Series, low: int) -> tuple[float, pd.Series]:
    """What no stopping rule can beat: each lead's stop n in [low, max] chosen knowing every
    fixed run, minimising the summed best - fixed's best over cells within 1/TARGET of the fixed
    units. A multiple-choice knapsack, solved over a sweep of Lagrange weights on units (exact
    enough: the curves are few and short). -> (units ratio, best - fixed's best per cell)."""
    curves = []  # per lead: (units, summed loss, its cells' best - fixed's best) at each stop
    for _, mine in fixed.groupby("lead"):
        curve = []
        for n in range(low, mine["run"].max() + 2):
            prefix = mine[mine["run"] < n]
            worse = _bests(prefix) - best
            curve.append((_units(prefix), float(worse.sum()), worse.dropna()))
        curves.append(curve)
    total, chosen = _units(fixed), [c[0] for c in curves]  # all at `low` if nothing else fits
    for weight in np.logspace(-9, 1, 400):
        pick = [min(c, key=lambda point: point[1] + weight * point[0]) for c in curves]
        fits = sum(u for u, _, _ in pick) <= total / TARGET
        if fits and sum(w for _, w, _ in pick) < sum(w for _, w, _ in chosen):
            chosen = pick
    return total / sum(u for u, _, _ in chosen), pd.concat([w for _, _, w in chosen])


def fixed_sweep(spec: Spec, store, repeat: int, keep: str | None) -> pd.DataFrame:
    """The fixed sweep's rows; with `keep` (a folder), read from or written to a file there, so
    that rules compared on the same runs do not re-run them (a run is deterministic given the
    spec and the sampler seed; the file is named by both)."""
    path = Path(keep or ".") / f"fixed-{spec.hash[:12]}-{repeat}.parquet"
    if keep and path.is_file():
        rows = pd.read_parquet(path)
        return rows.assign(params=rows["params"].map(json.loads))
    rows = sweep(spec, repeat, lambda c: run(spec, store, c))
    if keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.assign(params=rows["params"].map(json.dumps)).to_parquet(path)
    return rows


def one_repeat(base: dict, store, low: int, high: int, repeat: int, also: list[int],
               keep: str | None = None) -> dict:  # fmt: skip
    fixed_spec = validate(copy.deepcopy(base) | {"trials_per_cell": high}, "bench/adaptive.py")
    t0 = time.perf_counter()
    fixed = fixed_sweep(fixed_spec, store, repeat, keep)
    fixed_s = time.perf_counter() - t0
    best, missed = _bests(fixed), []
    # Each rule at each min, read off the same fixed runs (the samplers' start-up is from max:
    # a prefix, so a replayed run is the fixed sweep's own unless `missed` says otherwise).
    variants, specs = {}, {}
    for m in (low, *also):
        spec = specs[m] = validate(
            copy.deepcopy(base) | {"trials_per_cell": {"min": m, "max": high}}
        )
        for rule in STOP_RULES:
            rows = sweep(spec, repeat, replay(spec, store, fixed, missed), rule)
            variants[rule, m] = (_units(rows), _bests(rows) - best, rows.groupby("cell").size())
    hindsight_ratio, hindsight_worse = hindsight(fixed, best, low)
    term, term_s = terminator_stops(specs[low], fixed)
    variants["terminator", low] = (_units(term), _bests(term) - best, term.groupby("cell").size())
    return {
        "fixed_units": _units(fixed),
        "fixed_best": best,
        "variants": variants,
        "missed": len(missed),
        "hindsight": (hindsight_ratio, hindsight_worse),
        "fixed_s": fixed_s,
        "terminator_s": term_s,
        "resolution": float(fixed["resolution"].dropna().iloc[0]),
        "failed_runs": int((fixed["status"] != "ok").sum()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min", type=int, default=8, help="trials_per_cell min (adaptive)")
    p.add_argument("--max", type=int, default=16, help="its max, and the fixed sweep's count")
    p.add_argument("--repeats", type=int, default=5, help="sampler seeds")
    p.add_argument("--also", default="4,6", help="other mins, read off the same fixed runs")
    p.add_argument("--methods", default=None, help="comma-separated (default: the quickstart's)")
    p.add_argument("--first-seed", type=int, default=0, help="sampler seeds from this one")
    kept = "folder keeping the fixed sweeps' rows and checkpoints between runs"
    kept += " (default: $BENCH_ADAPTIVE_KEEP, else none: everything re-run)"
    p.add_argument("--keep", default=os.environ.get("BENCH_ADAPTIVE_KEEP"), help=kept)
    args = p.parse_args(argv or [])  # `make bench` calls main() with its own sys.argv
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with open(QUICKSTART) as f:
        base = yaml.safe_load(f) | {"name": "bench-adaptive", "confirm": {"seeds": []}}
    if args.methods:
        keep = args.methods.split(",")
        base["methods"] = {m: base["methods"][m] for m in keep}
        base["tried_first"] = {m: v for m, v in base.get("tried_first", {}).items() if m in keep}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"{args.keep}/store" if args.keep else tmp)
        also = [int(m) for m in args.also.split(",") if m]
        seeds = range(args.first_seed, args.first_seed + args.repeats)
        reps = [one_repeat(base, store, args.min, args.max, r, also, args.keep) for r in seeds]
    n = len(reps[0]["fixed_best"])
    out = {"min": args.min, "max": args.max, "seeds": f"{seeds[0]}-{seeds[-1]}", "cells": n}
    out |= {"rule": STOP_RULE, "resolution": reps[0]["resolution"]}
    out["not_prefix_runs"] = sum(r["missed"] for r in reps)  # 0: adaptive = fixed, stopped
    out["failed_rows_fixed"] = sum(r["failed_runs"] for r in reps)
    print(f"quickstart grid, {n} cells, trials_per_cell {{min, max: {args.max}}} vs {args.max}, "
          f"sampler seeds {out['seeds']}; resolution of r {out['resolution']:.3f}")  # fmt: skip
    null = [reps[(i + 1) % len(reps)]["fixed_best"] - r["fixed_best"] for i, r in enumerate(reps)]
    floor = mean_ci(null)
    print(f"noise floor (fixed vs the next seed's fixed): {floor[0]:+.4f} "
          f"[{floor[1]:+.4f}, {floor[2]:+.4f}]")  # fmt: skip
    out |= dict(
        zip(("noise_floor_worse_mean", "noise_floor_worse_lo", "noise_floor_worse_hi"), floor)
    )
    for rule, m in reps[0]["variants"]:
        ratios = pd.Series([r["fixed_units"] / r["variants"][rule, m][0] for r in reps])
        mean, lo, hi = mean_ci([r["variants"][rule, m][1] for r in reps])
        obs = pd.concat([r["variants"][rule, m][2] for r in reps])
        no_worse = sum(int((r["variants"][rule, m][1] <= 1e-12).sum()) for r in reps)
        # Met: 2x fewer units, and the mean difference no larger than the noise floor's interval.
        met = bool(ratios.mean() >= TARGET and mean <= floor[2])
        print(f"{rule} min {m}: {obs.mean():.1f} settings per cell ({(obs >= args.max).mean():.0%} "
              f"at max), units fixed / adaptive {ratios.mean():.2f}x ± {ratios.std(ddof=1):.2f}, "
              f"best - fixed's best {mean:+.4f} [{lo:+.4f}, {hi:+.4f}], no worse in {no_worse} "
              f"of {n * len(reps)} cells; target {'met' if met else 'not met'}")  # fmt: skip
        key = f"{rule}_min{m}"
        out |= {f"{key}_units_ratio": ratios.mean(), f"{key}_worse_mean": mean}
        out |= {f"{key}_worse_lo": lo, f"{key}_worse_hi": hi, f"{key}_observed_mean": obs.mean()}
        out |= {f"{key}_target_met": met}
    # The bound: stops chosen in hindsight at the target's units. Near 0 means the target is
    # reachable in principle and a rule is missing foresight, not trials.
    h_ratio = pd.Series([r["hindsight"][0] for r in reps]).mean()
    h_mean, h_lo, h_hi = mean_ci([r["hindsight"][1] for r in reps])
    print(f"hindsight min {args.min}: units fixed / stopped {h_ratio:.2f}x, best - fixed's best "
          f"{h_mean:+.4f} [{h_lo:+.4f}, {h_hi:+.4f}] (each lead's stop chosen knowing all runs)")  # fmt: skip
    out |= {"hindsight_units_ratio": h_ratio, "hindsight_worse_mean": h_mean}
    out |= {"hindsight_worse_lo": h_lo, "hindsight_worse_hi": h_hi}
    out["target_met"] = out[f"{STOP_RULE}_min{args.min}_target_met"]  # the searcher's own rule
    out["fixed_s_per_seed"] = sum(r["fixed_s"] for r in reps) / len(reps)
    out["fixed_rows_kept"] = bool(args.keep)  # then fixed_s is reading them, not running
    out["terminator_s_per_seed"] = sum(r["terminator_s"] for r in reps) / len(reps)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
