"""The mechanism study's figures (the paper's Fig. 5 and Fig. 14), drawn from its rows only,
and `write`, which puts the rows and both figures in one folder or bucket."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from raysweep.base.storage import open_store
from raysweep.reporting.plotstyle import (
    POISONED,
    RETRAIN,
    finish,
    grid,
    look,
    pct,
    png,
)

from .study import COS_ORTHOGONAL, KINDS, at_budget, over_seeds, to_parquet

LOOKS = {"poisons": look(0) | {"color": POISONED}, "random_clean": look(0)}
LABELS = {"poisons": "poisons removed", "random_clean": "as many random clean rows removed"}


def _band(ax, rows: pd.DataFrame, x: str, y: str, kind: str) -> None:
    """Mean ± std over seeds of `y` against `x` for one kind: a line and a shaded band."""
    stats = rows[rows["kind"] == kind].groupby(x)[y].agg(["mean", "std"]).fillna(0.0)
    st = LOOKS[kind]
    ax.plot(stats.index, stats["mean"], ms=4, **st)
    lo, hi = stats["mean"] - stats["std"], stats["mean"] + stats["std"]
    ax.fill_between(stats.index, lo, hi, color=st["color"], alpha=0.2, lw=0)


def _handles() -> list[Line2D]:
    return [Line2D([], [], label=LABELS[k], ms=5, **LOOKS[k]) for k in KINDS]


def figure_h1(df: pd.DataFrame) -> Figure:
    """Fig. 5: ℓ1 shift of the logistic optimum against the fraction β of poisons removed (and
    as many random clean rows), and their ratio per seed."""
    h1 = df[df["hypothesis"] == "H1"]
    fig, (ax, ax_ratio) = grid(2, height=3.4)
    for kind in KINDS:
        _band(ax, h1, "beta", "shift_l1", kind)
    ax.set(xlabel="fraction β of the poisons removed", ylabel="‖θ(S_corr) − θ_β‖₁ (sum of |Δθ|)")
    shift = h1[h1["beta"] > 0].pivot_table(
        index=["seed", "beta"], columns="kind", values="shift_l1"
    )
    ratio = (shift["poisons"] / shift["random_clean"]).rename("ratio").reset_index()
    stats = ratio.groupby("beta")["ratio"].agg(["mean", "std"]).fillna(0.0)
    ax_ratio.errorbar(stats.index, stats["mean"], yerr=stats["std"], capsize=2, ms=4, **look(3))
    ax_ratio.axhline(1.0, color=RETRAIN, ls="--", lw=1)
    ax_ratio.set_ylim(bottom=0)
    ax_ratio.set(xlabel="fraction β of the poisons removed")
    ax_ratio.set(ylabel="ℓ1 shift ratio, poisons / random\n(1 = no difference)")
    last = ratio[ratio["beta"] == ratio["beta"].max()]["ratio"]
    seeds, n = (
        h1["seed"].nunique(),
        int(h1.loc[h1["beta"] == h1["beta"].max(), "n_removed"].iloc[0]),
    )
    if (last > 1).all():
        lead = f"Removing all {n} poisons moves the logistic head {over_seeds(last)}× as far (ℓ1)"
    elif (last <= 1).all():
        lead = f"Removing all {n} poisons moves the logistic head no further (ℓ1 ratio {over_seeds(last)})"
    else:
        lead = f"Removing all {n} poisons moves the logistic head further on {int((last > 1).sum())} of {len(last)} seeds only (ℓ1 ratio {over_seeds(last)})"
    title = f"{lead}\nas removing as many random clean rows (mean ± std over {seeds} seeds)"
    handles = [*_handles(), Line2D([], [], label="ratio, poisons / random", ms=5, **look(3))]
    return finish(fig, title, handles, ncols=3)


def figure_h2(df: pd.DataFrame, budgets: list[float]) -> Figure:
    """Fig. 14: cosine between the clean-data GD update and the shift Δ* that removing the
    poisons needs (ridge regression), and the part of Δ* still to go, against GD steps."""
    h2 = df[df["hypothesis"] == "H2"]
    fig, (ax, ax_left) = grid(2, height=3.4)
    for kind in KINDS:
        _band(ax, h2, "step", "cosine", kind)
        _band(ax_left, h2, "step", "remaining", kind)
    marks = {f: at_budget(df, f)[0] for f in (*budgets, 1.0)}
    # labels where the curves are not: high on the cosine panel, low on the distance panel
    for a, y, va in ((ax, 0.98, "top"), (ax_left, 0.02, "bottom")):
        a.set_xscale("log")
        a.set(xlabel="full-batch GD steps on the remaining rows (log scale)")
        for fraction, step in marks.items():
            a.axvline(step, color="black", ls=":", lw=0.8)
            a.text(step, y, f" {pct(fraction)} ", fontsize=7, rotation=90, va=va)
    ax.axhline(COS_ORTHOGONAL, color=RETRAIN, ls="--", lw=1)
    ax.set(ylim=(0, 1), ylabel="cosine(GD update, Δ*)\n(0 = orthogonal, 1 = on course)")
    ax_left.set(
        ylim=(0, 1.05),
        ylabel="distance still to go, ‖θ_k − θ_target‖₂ / ‖Δ*‖₂\n(1 = not moved, 0 = arrived)",
    )
    step, cost = at_budget(df, max(budgets))
    cos = h2[h2["step"] == step].pivot_table(index="seed", columns="kind", values="cosine")
    p, r = over_seeds(cos["poisons"], 3), over_seeds(cos["random_clean"], 3)
    at = f"after {step} steps, {pct(round(cost, 3))} of the training compute"
    seeds = f"mean ± std over {h2['seed'].nunique()} seeds"
    if (cos["poisons"] >= COS_ORTHOGONAL).any():
        lead = "Gradient descent on the clean rows is not nearly orthogonal on every seed"
        title = f"{lead}\nto the shift Δ* that removes the poisons: cosine {p} {at}\n(random clean rows: {r}; {seeds})"
    elif (cos["poisons"] < cos["random_clean"]).all():
        lead = "Gradient descent on the clean rows heads almost orthogonally to the shift Δ*"
        title = f"{lead}\nthat removes the poisons, more than for random clean rows: cosine {p} vs {r}\n{at}; {seeds}"
    else:
        lead = "Gradient descent on the clean rows heads almost orthogonally to the shift Δ*"
        title = f"{lead}\nthat removes the poisons (cosine {p} {at}),\nbut no more than for as many random clean rows ({r}); {seeds}"
    handles = [
        *_handles(),
        Line2D([], [], color=RETRAIN, ls="--", label=f"cosine {COS_ORTHOGONAL}: nearly orthogonal"),
        Line2D([], [], color="black", ls=":", label="steps a budget pays for (% of training)"),
    ]
    return finish(fig, title, handles, ncols=2)


def write(df: pd.DataFrame, out: str, budgets: list[float]) -> list[str]:
    """mechanism.parquet, mechanism_h1.png and mechanism_h2.png under `out` (a path or URI)."""
    dest = open_store(out)
    files = {
        "mechanism.parquet": to_parquet(df),
        "mechanism_h1.png": png(figure_h1(df)),
        "mechanism_h2.png": png(figure_h2(df, budgets)),
    }
    for name, data in files.items():
        dest.write(name, data)
    return [dest.path(name) for name in files]
