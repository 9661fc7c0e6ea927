"""The report's tuning figures, from a run's Parquet rows only: every trial's (r, accuracy)
with each method's Pareto front, and how each cell's best converged over its trials (the curve
and the not-converged mark both by the table's rule, `convergence.py`)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from raysweep.analysis.convergence import CELL, best_so_far

from .plotstyle import LINES, POISONED, RETRAIN, finish, grid, handle, ordered, pct, style

R_MAX = 1.5  # the Pareto panels' |r| axis: past it a method did worse than doing nothing


def pareto_front(r: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both (lower r, higher accuracy), by r."""
    order = np.lexsort((-acc, r))
    front, best = [], -math.inf
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return np.array(front, dtype=int)


def _trials(ax, g: pd.DataFrame, method: str, floor: float) -> None:
    """One method's trials at one budget (hollow: infeasible on test) and the front of those
    within the axes (|r| <= R_MAX, accuracy >= floor)."""
    st = style(method)
    r = g["residual"].abs().to_numpy(float)
    acc = 100 * g["after_clean_acc_test"].to_numpy(float)
    ok = g["feasible_test"].fillna(False).to_numpy(bool)
    dot = {"s": 16, "alpha": 0.6, "marker": st["marker"]}
    ax.scatter(r[ok], acc[ok], color=st["color"], lw=0, **dot)
    ax.scatter(r[~ok], acc[~ok], facecolors="none", edgecolors=st["color"], lw=0.8, **dot)
    keep = (r <= R_MAX) & (acc >= floor)  # a front through points off the axes misleads
    front = np.flatnonzero(keep)[pareto_front(r[keep], acc[keep])]
    ax.step(r[front], acc[front], where="post", color=st["color"], ls=st["linestyle"], lw=1.2)


def pareto(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """Every ok tuning trial as (|r|, clean accuracy) on test with each method's Pareto front,
    one panel per budget; the axes keep to the region near the references."""
    tuned = df[(df["phase"] == "tune") & (df["status"] == "ok")]
    budgets = sorted(tuned["budget"].unique())
    fig, axes = grid(len(budgets), height=3.0, sharex=True, sharey=True)
    refs = tuned.drop_duplicates("seed")
    before, retrain = 100 * refs["before_clean_acc_test"], 100 * refs["retrain_clean_acc_test"]
    # down to the lowest trial, or 20 points under the references if trials go lower
    lowest = np.nanmin(100 * tuned["after_clean_acc_test"].to_numpy(float), initial=100)
    floor = max(lowest, min(before.min(), retrain.min()) - 20) - 1
    for ax, budget in zip(axes, budgets):
        at = tuned[tuned["budget"] == budget]
        for method in ordered(at["method"]):
            _trials(ax, at[at["method"] == method], method, floor)
        ax.scatter(np.ones(len(refs)), before, marker="X", s=60, color=POISONED, zorder=3)
        ax.scatter(np.zeros(len(refs)), retrain, marker="*", s=90, color=RETRAIN, zorder=3)
        outside = (at["residual"].abs() > R_MAX) | (100 * at["after_clean_acc_test"] < floor)
        off = int((outside & at["residual"].notna()).sum())
        undefined = int(at["residual"].isna().sum())  # e.g. no attack effect, a diverged run
        note = f"budget {pct(budget)}" + (f"\n{off} trials off the axes" if off else "")
        note += f"\n{undefined} without r (undefined)" if undefined else ""
        ax.set_title(note, fontsize=8.5)
        ax.set(xlim=(-0.05, R_MAX), ylim=(floor, min(100, max(before.max(), retrain.max()) + 2)))
        ax.tick_params(labelsize=7)
    fig.supxlabel("|r| on test (0 = as retrained, 1 = nothing removed)", fontsize=9)
    fig.supylabel("clean accuracy on test (%)", fontsize=9)
    # r is undefined (NaN) where the attack left no effect to remove: no best to name then.
    ok = tuned[tuned["feasible_test"].fillna(False).astype(bool) & tuned["residual"].notna()]
    title = f"Removal against utility: all {len(tuned)} tuning trials and each method's front; top left is best"
    if len(ok):
        best = ok.loc[ok["residual"].abs().idxmin()]
        title += (
            f"\nlowest |r| of a trial that keeps accuracy (feasible on test): "
            f"{abs(best['residual']):.2f}, {best['method']} at {pct(best['budget'])}"
        )
    handles = [*map(handle, ordered(tuned["method"]))]
    handles += [
        Line2D([], [], color=POISONED, marker="X", ls="", ms=8, label="poisoned"),
        Line2D([], [], color=RETRAIN, marker="*", ls="", ms=9, label="retrained"),
        Line2D([], [], color="black", marker="o", mfc="none", ls="", label="infeasible trial"),
    ]
    return finish(fig, title, handles, ncols=5)


def convergence(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """Per cell, its best objective on val so far against its trials, exactly as the table's
    `converged` rule reads it (`convergence.best_so_far`: a cell's trials are its own and its
    smaller budgets', since its best may come from those): one panel per method, one line per
    budget, drawn from the first trial that brought a feasible one; crosses on top are the cell's
    own infeasible trials, and a hollow circle ends the line of a cell the table marks not
    converged."""
    tuned = df[df["phase"] == "tune"]
    ok = tuned[tuned["status"] == "ok"].sort_values("trial_number")
    curves = best_so_far(df).groupby(CELL)
    cells = table[table["source"] != "reference"]
    flags = cells.set_index(CELL)["converged"].astype(bool)
    methods, budgets = ordered(tuned["method"]), sorted(tuned["budget"].unique(), reverse=True)
    dash = {b: LINES[i % len(LINES)] for i, b in enumerate(budgets)}  # solid: largest budget
    fig, axes = grid(len(methods), sharex=True, sharey=True)
    top = 1.25
    for ax, method in zip(axes, methods):
        colour = style(method)["color"]
        for key, s in curves:
            if key[1] != method:
                continue
            # steps: each trial's best holds until the next; the last one for half a trial.
            # Before a feasible trial the best is a penalty (10 + shortfall): not drawn.
            best = s["best_so_far"].where(s["feasible"]).clip(upper=top).to_numpy(float)
            x, y = np.append(s["n"], len(s) + 0.5), np.append(best, best[-1])
            ax.plot(x, y, color=colour, ls=dash[key[2]], drawstyle="steps-post")
            own = ok[(ok["attack"] == key[0]) & (ok["method"] == method) & (ok["budget"] == key[2])]
            bad = np.flatnonzero(~own["feasible"].eq(True).to_numpy()) + 1  # its i-th ok trial
            ax.plot(bad, np.full(len(bad), top), ls="", marker="x", ms=4, color=colour)
            if not flags.get(key, False):
                end = top if np.isnan(y[-1]) else y[-1]  # no feasible trial: drawn on top
                ax.plot(x[-1], end, ls="", marker="o", mfc="white", ms=6, color=colour)
        failed = int(((tuned["method"] == method) & (tuned["status"] != "ok")).sum())
        ax.set_title(method + (f" ({failed} failed, not counted)" if failed else ""), fontsize=8,
                     color=colour)  # fmt: skip
        ax.set_ylim(0, top * 1.06)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    fig.supxlabel("trials i: the cell's i-th ok trial and its smaller budgets' i-th", fontsize=9)
    fig.supylabel("best objective on val so far (|r| by default)", fontsize=9)
    not_converged = int((~flags).sum())
    title = (
        f"Tuning convergence: {not_converged} of {len(flags)} cells not converged (their best "
        "improved in the last third of\ntheir trials by more than the noise between runs): more "
        "trials might help there"
    )
    handles = [Line2D([], [], color="black", ls=dash[b], label=f"budget {pct(b)}") for b in budgets]
    handles.append(Line2D([], [], color="black", ls="", marker="x", label="infeasible trial"))
    handles.append(
        Line2D([], [], color="black", ls="", marker="o", mfc="white", label="not converged")
    )
    return finish(fig, title, handles, ncols=len(handles))
