"""Anytime budgets against one run per cell, side by side on the paper's 5-budget grid: the
unlearning compute (meter units) and wall time each design spends, and the best each finds per
cell.

Both designs run in this process on one prepared setup (no Ray), with the sweep's sampler:
- per cell (the design before anytime budgets): each (method, budget) cell's own study samples
  `trials` settings, each run at its budget; a cell's best is its own best row;
- anytime (the sweep's design, `searcher.CellSearcher`): the largest cell's study (the same
  sampler and seed as its per-cell twin) samples settings; each run goes to the largest budget
  and is measured at every smaller one on the way (`run_trial(stops=...)`), and every
  smaller cell's study observes it; a cell's best is the best row at or below its budget
  (`results.best_per_cell`). It runs 3 x `trials` settings (the per-cell design's compute on
  this grid), read three ways: its first `trials` runs (equal settings, the sweep's fairness
  rule), the runs that fit in the per-cell design's units / TARGET (the issue's target), and how
  many units it needs until each cell's best is at least the per-cell design's ("to match", a
  race to every cell's luckiest draw).
Objectives are the sweep's (|r| on val; infeasible = 10 + shortfall); lower is better.

"Best r no worse" is a statement about two random searches, so it is read over cells x sampler
seeds: the mean of (anytime's best - per cell's) with a 95 % t-interval over the sampler seeds
(each seed's mean over its cells is one draw: cells of one seed share runs). Counting the cells
where one search is no worse than another is reported too, next to its noise floor: the per-cell
design against itself with the next sampler seed.

    PYTHONPATH=. python -m bench.anytime [--trials 8] [--repeats 5] [--methods gd,ngd,ga]

About 3-4 minutes on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile

import optuna
import pandas as pd
import torch
from scipy import stats

from raysweep.analysis.results import best_per_cell
from raysweep.base.storage import open_store
from raysweep.experiment.spec import Spec, distributions, validate
from raysweep.experiment.trial import derive_seed, prepare, run_trial
from raysweep.runner.searcher import cell_name, make_sampler, observe

BUDGETS = [0.02, 0.04, 0.06, 0.08, 0.10]  # the paper's grid (docs/design.md §3)
# tpe_vs_random's setting: a small digits MLP whose spaces have a feasible boundary to find.
SPEC = {
    "name": "bench-anytime",
    "dataset": {"name": "digits", "size": 16},
    "model": {"name": "mlp", "width": 256, "depth": 2},
    "attack": {"name": "gaussian", "n": 60, "eps": 2.0},
    "train": {"epochs": 20, "lr": 0.05, "batch_size": 64},
    "budgets": BUDGETS,
    "delta": 0.03,
    "methods": {
        "gd": {"lr": {"low": 1e-5, "high": 0.3, "log": True}},
        "ngd": {
            "lr": {"low": 1e-5, "high": 0.3, "log": True},
            "sigma2": {"low": 1e-9, "high": 1e-3, "log": True},
        },
        "ga": {
            "lr": {"low": 1e-7, "high": 1e-2, "log": True},
            "steps": {"low": 1, "high": 200, "log": True},
        },
    },
}
TARGET = 2.5  # the target: this many times less unlearning compute, best r no worse
KEEP = ["budget", "objective", "feasible", "residual", "budget_units", "wall_s"]


def study(spec: Spec, method: str, budget: float, trials: int, repeat: int):
    """One cell's study with the sweep's sampler (`searcher.make_sampler`), seeded per repeat."""
    seed = derive_seed(spec.seed, cell_name(method, budget), repeat) % 2**32
    return optuna.create_study(sampler=make_sampler(spec.sampler, seed, trials))


def search(
    spec: Spec, store, method: str, budgets: list, trials: int, repeat: int, runs: int
) -> list[dict]:
    """`runs` runs of one method's studies, one per budget in `budgets` (one: a per-cell search).
    As `searcher.CellSearcher` does: the largest budget's study samples, each run goes to that
    budget and is measured at every smaller one, whose studies observe it. Every row, with its run.
    """
    *smaller, lead = [cell_name(method, b) for b in budgets]
    # trials: TPE's start-up, as in the sweep
    studies = {cell_name(method, b): study(spec, method, b, trials, repeat) for b in budgets}
    dists, fixed = distributions(method, spec.methods[method])
    rows = []
    for run in range(runs):
        trial = studies[lead].ask(dists)
        number = {lead: trial.number} | {n: observe(studies[n], trial) for n in smaller}
        reported = []
        args = (method, budgets[-1], {**fixed, **trial.params}, number[lead], reported.append)
        run_trial(spec, store, *args, stops=tuple(budgets[:-1]))
        for r in reported:
            name = cell_name(method, r["budget"])
            studies[name].tell(number[name], r["objective"])
        rows += [{k: r[k] for k in KEEP} | {"method": method, "run": run} for r in reported]
    return rows


def _frame(rows: list) -> pd.DataFrame:
    """Rows as `results.best_per_cell` reads them."""
    df = pd.DataFrame(rows).assign(phase="tune", status="ok", attack="gaussian")
    cells = [cell_name(m, b) for m, b in zip(df["method"], df["budget"])]
    return df.assign(trial_number=df["run"], cell=cells)


def _spent(rows: pd.DataFrame, upto: int) -> pd.Series:
    """Units and wall s of runs 0..upto (a run's cost is its last row's)."""
    return rows[rows["run"] <= upto].groupby("run")[["budget_units", "wall_s"]].max().sum()


def compare(per_cell: pd.DataFrame, anytime: pd.DataFrame, trials: int) -> pd.DataFrame:
    """Per cell: each design's best with `trials` settings; anytime's best within the per-cell
    design's units / TARGET (its method's runs in order); and the units and wall s spent to reach
    the per-cell design's best (NaN: anytime did not match it in its runs)."""
    out, best = [], best_per_cell(anytime[anytime["run"] < trials])
    for method, budget in sorted(set(zip(per_cell["method"], per_cell["budget"]))):
        own = per_cell[(per_cell["method"] == method) & (per_cell["budget"] == budget)]
        target = own.loc[own["objective"].idxmin()]  # objective ranks infeasible last
        pick = best[(best["method"] == method) & (best["budget"] == budget)].iloc[0]
        runs = anytime[anytime["method"] == method]  # each run goes to the largest budget
        so_far = runs[runs["budget"] <= budget].groupby("run")["objective"].min().cummin()
        matched = so_far.index[so_far <= target["objective"] + 1e-12]
        nothing = pd.Series(math.nan, ["budget_units", "wall_s"])
        spent = _spent(runs, matched[0]) if len(matched) else nothing
        cost = runs.groupby("run")["budget_units"].max().cumsum()
        allowed = per_cell.loc[per_cell["method"] == method, "budget_units"].sum() / TARGET
        out.append(
            {"method": method, "budget": budget, "per_cell_best": target["objective"],
             "anytime_best": pick["objective"], "from_budget": pick["from_budget"],
             "anytime_best_at_target": so_far[cost <= allowed].iloc[-1],
             "per_cell_units": _spent(own, target["run"])["budget_units"],
             "anytime_units": spent["budget_units"],
             "per_cell_wall_s": _spent(own, target["run"])["wall_s"],
             "anytime_wall_s": spent["wall_s"]}
        )  # fmt: skip
    return pd.DataFrame(out)


def one_repeat(spec: Spec, store, trials: int, repeat: int, tol: float) -> dict:
    """Both designs with the same sampler seeds; per cell and in total, what each spent and found.
    `tol`: the smallest difference in r the setup resolves (`Setup.resolution`)."""
    per_cell, anytime = [], []
    for method in spec.methods:  # interleaved by method, so machine load hits both alike
        for budget in BUDGETS:
            per_cell += search(spec, store, method, [budget], trials, repeat, trials)
        runs = round(trials * sum(BUDGETS) / BUDGETS[-1])  # the per-cell design's compute
        anytime += search(spec, store, method, BUDGETS, trials, repeat, runs)
    per_cell, anytime = _frame(per_cell), _frame(anytime)
    cells = compare(per_cell, anytime, trials)
    equal = anytime[anytime["run"] < trials].groupby(["method", "run"])[["budget_units", "wall_s"]]
    equal = equal.max().sum()
    # To match every cell's best: the per-cell design searched each cell on its own (a sum);
    # an anytime method's runs serve all its cells at once (up to the cell that needed most).
    full = anytime.groupby(["method", "run"])[["budget_units", "wall_s"]].max().groupby("method")
    to_match = cells.set_index("method")[["anytime_units", "anytime_wall_s"]]
    to_match = to_match.fillna(full.sum().set_axis(["anytime_units", "anytime_wall_s"], axis=1))
    to_match = to_match.groupby("method").max().sum()
    worse = cells["anytime_best"] - cells["per_cell_best"]  # > 0: anytime's best is worse
    worse_at_target = cells["anytime_best_at_target"] - cells["per_cell_best"]
    return {
        "cells": cells,
        "units": per_cell["budget_units"].sum() / equal["budget_units"],
        "wall": per_cell["wall_s"].sum() / equal["wall_s"],
        "units_to_match": cells["per_cell_units"].sum() / to_match["anytime_units"],
        "wall_to_match": cells["per_cell_wall_s"].sum() / to_match["anytime_wall_s"],
        "no_worse": int((worse <= 1e-12).sum()),
        "within_resolution": int((worse <= tol).sum()),
        "no_worse_at_target": int((worse_at_target <= 1e-12).sum()),
        "worse": list(worse),
        "worse_at_target": list(worse_at_target),
        "matched": int(cells["anytime_units"].notna().sum()),
        "per_cell": per_cell.groupby(["method", "budget"])["objective"].min(),
    }


def mean_ci(per_seed: list[pd.Series]) -> tuple[float, float, float]:
    """Mean over cells x seeds, and a 95 % t-interval from the seeds' own means."""
    means = pd.Series([x.mean() for x in per_seed])
    half = stats.t.ppf(0.975, len(means) - 1) * means.std() / math.sqrt(len(means))
    return pd.concat(per_seed).mean(), means.mean() - half, means.mean() + half


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8, help="settings each cell observes")
    p.add_argument("--repeats", type=int, default=5, help="sampler seeds (both designs alike)")
    p.add_argument("--methods", default="gd,ngd,ga", help="comma-separated, from the spec")
    p.add_argument("--storage", default=None, help="checkpoint store (default: a temp dir)")
    args = p.parse_args(argv or [])  # `make bench` calls main() with its own sys.argv
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raw = {**SPEC, "methods": {m: SPEC["methods"][m] for m in args.methods.split(",")}}
    spec = validate(raw, "bench/anytime.py")
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(args.storage or tmp)
        setup = prepare(json.dumps(spec.raw, sort_keys=True), store.uri, spec.seed)  # untimed
        tol = setup.resolution
        reps = [one_repeat(spec, store, args.trials, r, tol) for r in range(args.repeats)]
    pd.set_option("display.width", 180)
    n, seeds = len(reps[0]["cells"]), len(reps)
    print(f"{args.trials} settings per cell, {len(spec.methods)} methods x {len(BUDGETS)} budgets")
    print("sampler seed 0, per cell (objective: |r| on val, lower is better):")
    print(reps[0]["cells"].round(4).to_string(index=False))
    out = {"trials": args.trials, "repeats": seeds, "methods": ",".join(spec.methods)}
    for key, what in (
        ("units", "unlearning units, equal settings"),
        ("wall", "wall s, equal settings"),
        ("units_to_match", "unlearning units to match each cell's per-cell best"),
        ("wall_to_match", "wall s to match each cell's per-cell best"),
    ):
        values = pd.Series([r[key] for r in reps])
        std = values.std(ddof=1) if seeds > 1 else math.nan
        print(f"per cell / anytime, {what}: {values.mean():.2f}x ± {std:.2f} (sampler seeds)")
        out |= {f"{key}_ratio": values.mean(), f"{key}_ratio_std": std}
    # The noise floor: the per-cell design against itself, each seed against the next one.
    null = [reps[(i + 1) % seeds]["per_cell"] - r["per_cell"] for i, r in enumerate(reps)]
    for key, what in (
        ("no_worse", "anytime's best (equal settings) no worse than per cell's"),
        ("no_worse_at_target", f"anytime's best with {TARGET:g}x less units no worse"),
        ("within_resolution", f"equal settings, worse by less than r's resolution ({tol:.3f})"),
        ("matched", "anytime matched per cell's best within the same total compute"),
    ):
        total = sum(r[key] for r in reps)
        per_seed = ", ".join(str(r[key]) for r in reps)
        print(f"{what}: {total} of {n * seeds} cells ({per_seed} of {n} per seed)")
        out[f"cells_{key}"] = total
    if seeds > 1:
        same = sum(int((x <= 1e-12).sum()) for x in null)
        print(
            f"noise floor: per cell no worse than itself with another sampler seed: {same} of {n * seeds} cells"
        )
        out["cells_no_worse_noise_floor"] = same
        for key, what in (
            ("worse", "equal settings"),
            ("worse_at_target", f"{TARGET:g}x less units"),
            ("noise_floor", "noise floor, per cell's other seed"),
        ):
            diffs = null if key == "noise_floor" else [pd.Series(r[key]) for r in reps]
            mean, lo, hi = mean_ci(diffs)
            print(
                f"best - per cell's best, {what}: {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] (mean, 95 % CI)"
            )
            out |= {f"{key}_mean": mean, f"{key}_hi": hi}
    return out | {"cells": n * seeds}


if __name__ == "__main__":
    main(sys.argv[1:])
