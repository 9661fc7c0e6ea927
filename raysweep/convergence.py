"""Has each cell's search converged? Best-so-far objective against trial number, from the rows.

A cell is **not converged** when its best objective improved, over the last third of its tuning
trials, by more than the noise between runs of one setting: the sample std of the objective over
the cell's confirm runs of its best setting (two or more ok runs), else the attack's resolution of
r on the tuning seed (`resolution`: the relative half-width of E_before - E_retrain's 95 %
interval, the smallest change in r the run can tell apart). The last third is the last
ceil(n / 3) of the n ok trials, so a cell with one ok trial has nothing before it and is not
converged.
"""

from __future__ import annotations

import math

import pandas as pd

CELL = ["attack", "method", "budget"]


def best_so_far(df: pd.DataFrame) -> pd.DataFrame:
    """Each ok tuning trial with its cell's running minimum objective, in trial order."""
    ok = df[(df["phase"] == "tune") & (df["status"] == "ok")].sort_values([*CELL, "trial_number"])
    out = ok[[*CELL, "trial_number", "objective"]].copy()
    out["best_so_far"] = out.groupby(CELL)["objective"].cummin()
    return out.reset_index(drop=True)


def _noise(rows: pd.DataFrame, confirm: pd.DataFrame) -> float:
    """The threshold an improvement must pass (see the module docstring)."""
    best = rows.sort_values(["objective", "trial_number"]).iloc[0]
    runs = confirm[
        (confirm["cell"] == best["cell"]) & (confirm["tuned_trial"] == best["trial_number"])
    ]
    if len(runs) >= 2:
        return float(runs["objective"].std(ddof=1))
    return float(best["resolution"])


def convergence(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell: trials, final best, best after the first two thirds, improvement, threshold,
    converged (see the module docstring for the rule)."""
    ok = df[(df["phase"] == "tune") & (df["status"] == "ok")]
    confirm = df[(df["phase"] == "confirm") & (df["status"] == "ok")]
    out = []
    for key, rows in ok.groupby(CELL, sort=True):
        rows = rows.sort_values("trial_number")
        n = len(rows)
        head = rows["objective"].iloc[: n - math.ceil(n / 3)]
        best, before = rows["objective"].min(), head.min() if len(head) else math.inf
        threshold = _noise(rows, confirm)
        improved = before - best
        done = bool(improved <= threshold)
        out.append(dict(zip(CELL, key)) | {"trials": n, "best": best, "best_before": before,
                    "improvement": improved, "threshold": threshold, "converged": done})  # fmt: skip
    return pd.DataFrame(out, columns=[*CELL, "trials", "best", "best_before", "improvement",
                                      "threshold", "converged"])  # fmt: skip
