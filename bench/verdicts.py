"""Are the four methods that come close to retraining by r on the quickstart (random_label, salun,
bad_teacher, euk) indistinguishable from never trained, and does the poison relearn faster than
after retraining? Over 5 fresh seeds x 2 torch thread counts (bench/science.py style), with the
settings the README's quickstart run chose (issue 24's acceptance).

For each seed and thread count (torch.set_num_threads in this process, 1 then 2) a fresh store:
the poisoned model and its retrain reference are trained from scratch under that thread count,
then every cell's tuned setting (sweep.tuned_settings: the journal's parameters, bit for bit) is
run with `run_trial(..., relearn=True)`, as a confirm row is. Per method x budget: runs feasible
and indistinguishable (stats.null_tests at the run's table alpha), the tails (poisons below
Phi^-1(0.01) and above Phi^-1(0.99), 1.5 expected each of 150), r, each relearning probe's gap
(mean over runs, a 95 % t-interval over runs, and runs whose own interval is above 0), and
whether the two thread counts give the same verdicts seed by seed.

    PYTHONPATH=. python -m bench verdicts        # reads runs/quickstart (make quickstart)
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import t as student

from raysweep.analysis import results
from raysweep.base.storage import open_store
from raysweep.experiment.spec import validate
from raysweep.experiment.trial import run_trial
from raysweep.runner.sweep import tuned_settings
from raysweep.science.stats import Z_AT_FPR, Z_HIGH

RUN = Path(__file__).parent.parent / "runs"  # <storage> of the README's quickstart run
METHODS = ("random_label", "salun", "bad_teacher", "euk")
SEEDS = (3, 4, 5, 6, 7)  # fresh: the run tuned on 0 and confirmed on 1, 2
THREADS = (1, 2)
FLAGS = ("indist", "faster_retain", "faster_poisons")  # a run's verdicts


def settings(store, name: str) -> tuple:
    """The spec, the table's alpha, and per (method, budget) cell the tuned config it reports
    (a cell whose best is a smaller budget's row shares that row's config)."""
    df = results.read(store, name)
    stored = json.loads(Path(store.path(f"{name}/spec.json")).read_text())["spec"]
    spec = validate(stored, f"{name}/spec.json")
    alpha = float(results.table(df)["null_alpha"].dropna().iloc[0])
    best = results.best_per_cell(df)
    best = best[best["method"].isin(METHODS)]
    configs = [
        {"cell": b["cell"], "method": b["method"], "budget": b["from_budget"]}
        | {"tuned_trial": b["trial_number"], "reported_at": b["budget"]}
        for b in best.to_dict("records")
    ]
    return spec, alpha, tuned_settings(spec, store, configs)


def one_run(spec, config: dict, seed: int, store) -> dict:
    row = run_trial(
        spec, store, config["method"], config["budget"], config["params"], seed,
        report=lambda r: None, seed=seed, relearn=True,
    )  # fmt: skip
    scores = np.asarray(row["after_scores"], float)
    return {
        "residual": row["residual"],
        "feasible": bool(row["feasible_test"]),
        "null_log10p": row["null_log10p"],
        "low": int((scores <= Z_AT_FPR).sum()),
        "high": int((scores >= Z_HIGH).sum()),
        **{k: row[k] for k in row if k.startswith("relearn_gap_")},
        "wall_s": row["wall_s"],
        "relearn_wall_s": row["relearn_wall_s"],
    }


def interval(xs: pd.Series) -> tuple[float, float]:
    """A 95 % t-interval of the mean over runs."""
    half = student.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs))
    return float(xs.mean() - half), float(xs.mean() + half)


def summary(runs: pd.DataFrame, alpha: float) -> dict:
    runs = runs.assign(
        indist=runs["null_log10p"] > math.log10(alpha),  # NaN (degenerate) counts as not passing
        faster_retain=runs["relearn_gap_retain_lo"] > 0,
        faster_poisons=runs["relearn_gap_poisons_lo"] > 0,
    )
    by_threads = runs.pivot(index="seed", columns="threads", values=[*FLAGS, "residual"])
    one, two = THREADS
    differ = {f: int((by_threads[f][one] != by_threads[f][two]).sum()) for f in FLAGS}
    out = {"n": len(runs), "feasible": int(runs["feasible"].sum())}
    out |= {"indistinguishable": int(runs["indist"].sum())}
    out |= {"r_mean": float(runs["residual"].mean()), "r_min": float(runs["residual"].min())}
    out |= {"r_max": float(runs["residual"].max())}
    out |= {"low_tail_mean": float(runs["low"].mean()), "low_tail_max": int(runs["low"].max())}
    out |= {"high_tail_mean": float(runs["high"].mean()), "high_tail_max": int(runs["high"].max())}
    for probe in ("retain", "poisons"):
        gap = runs[f"relearn_gap_{probe}"]
        lo, hi = interval(gap)
        out |= {f"relearn_gap_{probe}": float(gap.mean()), f"relearn_gap_{probe}_ci": [lo, hi]}
        out |= {f"relearn_faster_{probe}": int(runs[f"faster_{probe}"].sum())}
    # seeds whose verdict differs between the thread counts, per verdict; and r's largest gap
    out |= {f"seeds_{f}_differs_across_threads": n for f, n in differ.items()}
    out |= {"r_max_diff_across_threads": float(
        (by_threads["residual"][one] - by_threads["residual"][two]).abs().max()
    )}  # fmt: skip
    return out


def line(s: dict) -> str:
    """One cell's summary as one line of bench/results.md."""
    gaps = ", ".join(
        f"({tag}) {s[f'relearn_gap_{p}']:.2f} [{s[f'relearn_gap_{p}_ci'][0]:.2f}, "
        f"{s[f'relearn_gap_{p}_ci'][1]:.2f}] faster on {s[f'relearn_faster_{p}']}/{s['n']}"
        for tag, p in (("a", "retain"), ("b", "poisons"))
    )
    differ = "/".join(str(s[f"seeds_{f}_differs_across_threads"]) for f in FLAGS)
    return (
        f"indistinguishable {s['indistinguishable']}/{s['n']} (feasible {s['feasible']}), "
        f"r {s['r_mean']:.2f} [{s['r_min']:.2f}, {s['r_max']:.2f}], poisons below/above the 1 % "
        f"points {s['low_tail_mean']:.1f}/{s['high_tail_mean']:.1f} (max {s['low_tail_max']}/"
        f"{s['high_tail_max']}; 1.5 expected), relearn_gap {gaps}; seeds whose verdicts "
        f"(indistinguishable/a/b) differ between 1 and 2 threads {differ}, r by <= "
        f"{s['r_max_diff_across_threads']:.3f}"
    )


def main() -> dict:
    store = open_store(str(RUN))
    spec, alpha, configs = settings(store, "quickstart")
    rows, started = [], time.time()
    for seed in SEEDS:
        for threads in THREADS:
            torch.set_num_threads(threads)
            with tempfile.TemporaryDirectory() as tmp:
                fresh = open_store(tmp)
                done = {}  # a cell that reports a smaller budget's row: that row, run once
                for c in configs:
                    key = (c["cell"], c["tuned_trial"])
                    done[key] = done.get(key) or one_run(spec, c, seed, fresh)
                    rows.append({"method": c["method"], "budget": c["reported_at"]} | done[key]
                                | {"seed": seed, "threads": threads})  # fmt: skip
            print(f"seed {seed} threads {threads}: {time.time() - started:.0f}s", flush=True)
    torch.set_num_threads(1)
    df = pd.DataFrame(rows)
    per_cell = {f"{m}@{b:g}": summary(g, alpha) for (m, b), g in df.groupby(["method", "budget"])}
    for name, s in per_cell.items():
        print(name, json.dumps(s), flush=True)
    ran = df.drop_duplicates(["method", "seed", "threads", "wall_s"])  # each run once
    return {
        "null_alpha": alpha,
        "seeds": list(SEEDS),
        "threads": list(THREADS),
        "probe_wall_share": float(
            ran["relearn_wall_s"].sum() / (ran["relearn_wall_s"] + ran["wall_s"]).sum()
        ),
        **{cell: line(s) for cell, s in per_cell.items()},
        "per_cell": per_cell,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1, default=str))
