"""The report's result figures, from a run's Parquet rows only: r against the budget, the
paper's Figures 6 (Gaussian scores) and 2 (loss vs Gaussian MIA), and the attack check.

Each figure's title states what it shows for this run, computed from the rows. Which setting a
cell reports was chosen on val while tuning (`results.best_per_cell`), as in the table; every
number drawn is a test-split number or a poison score, which belongs to no split.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy.stats import beta, norm

from raysweep.analysis import results
from raysweep.poisoning.records import RECORDS
from raysweep.science.stats import FPR, MAX_RESOLUTION, Z_AT_FPR, Z_DETECTED

from .plotstyle import CONTROL, POISONED, RETRAIN, finish, grid, handle, ordered, pct, style


def _cells(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["source"] != "reference"]


def anytime(table: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """Each method's table row at each budget, with the val objective it was chosen by. A cell's
    best is its method's best at or below its budget (`results.best_per_cell`: a method given
    more compute may stop early), so its reported r never gets worse with the budget;
    `from_budget` is where the chosen run stopped."""
    best = results.best_per_cell(df)[["attack", "method", "budget", "feasible", "objective"]]
    best = best.rename(columns={"feasible": "val_feasible"})
    cells = _cells(table).merge(best, on=["attack", "method", "budget"])
    return cells.sort_values("method", key=lambda m: m.map(ordered(m).index), kind="stable")


def _largest(table: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    rows = anytime(table, df)
    return rows[rows["budget"] == rows.groupby(["attack", "method"])["budget"].transform("max")]


def _err(std: pd.Series) -> np.ndarray:
    return std.fillna(0.0).to_numpy(dtype=float)


def residual_vs_budget(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """r on test against the budget per method, best so far over the budgets at or below each
    (hollow: kept from a smaller budget), with the confirm seeds' std as error bars."""
    rows = anytime(table, df)
    methods = ordered(rows["method"])
    budgets = sorted(rows["budget"].unique())
    fig, axes = grid(1, height=4.2)
    ax = axes[0]
    for j, method in enumerate(methods):
        g = rows[rows["method"] == method].sort_values("budget")
        x = 100 * g["budget"] * 1.025 ** (j - (len(methods) - 1) / 2)  # dodge the error bars
        st = style(method)
        ax.errorbar(x, g["residual"], yerr=_err(g["residual_std"]), capsize=2, ms=5, **st)
        kept = (g["from_budget"] < g["budget"]).to_numpy()
        hollow = st | {"linestyle": "", "mfc": "white", "ms": 8}
        ax.plot(x[kept], g["residual"][kept], **hollow)
    ax.axhline(1.0, color=POISONED, ls="--", lw=1)
    ax.axhline(0.0, color=RETRAIN, ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xticks([100 * b for b in budgets], [pct(b) for b in budgets])
    ax.minorticks_off()
    ax.set(xlabel="budget (% of the poisoned model's training compute, log scale)")
    ax.set(ylabel="residual poison effect r on test\n(1 = nothing removed, 0 = as retrained)")
    last = rows[rows["budget"] == max(budgets)].dropna(subset=["residual"])
    title = (
        f"At {pct(max(budgets))} of the training compute, {int((last['residual'] >= 0.5).sum())} "
        f"of {len(methods)} methods leave at least half the poison's effect (r ≥ 0.5)"
    )
    if len(last):
        best = last.loc[last["residual"].abs().idxmin()]
        title += f"\nclosest to retraining: {best['method']}, r = {best['residual']:.2f}"
    missing = sorted(set(methods) - set(last["method"]))
    if missing:
        title += f"; no feasible run: {', '.join(missing)}"
    refs = [
        Line2D([], [], color=POISONED, ls="--", label="r = 1: poisoned, no unlearning"),
        Line2D([], [], color=RETRAIN, ls="--", label="r = 0: retrained without the poisons"),
        Line2D(
            [],
            [],
            color="black",
            ls="",
            marker="o",
            mfc="white",
            label="kept from a smaller budget",
        ),
    ]
    return finish(fig, title, [*map(handle, methods), *refs], ncols=5)


def _scores(rows: pd.DataFrame, column: str) -> np.ndarray:
    kept = [np.asarray(s, dtype=float) for s in rows[column] if s is not None]
    scores = np.concatenate(kept) if kept else np.array([])
    return scores[~np.isnan(scores)]  # degenerate poisons (zero gradient) carry no score


def _z(scores: np.ndarray) -> float:
    return float(scores.mean() * math.sqrt(len(scores))) if len(scores) else math.nan


def _histograms(ax, refs: pd.DataFrame, after: np.ndarray, colour: str) -> None:
    bins, grid_ = np.linspace(-5, 5, 31), np.linspace(-5, 5, 201)
    for scores, kw in (
        (_scores(refs, "before_scores"), {"color": POISONED, "histtype": "step", "lw": 1.2}),
        (_scores(refs, "retrain_scores"), {"color": RETRAIN, "histtype": "step", "lw": 1.2}),
        (after, {"color": colour, "alpha": 0.45}),
    ):
        if len(scores):  # +-5 and beyond: the edge bins
            ax.hist(np.clip(scores, -4.99, 4.99), bins, density=True, **kw)
    ax.plot(grid_, norm.pdf(grid_), color="black", lw=1)
    ax.axvline(Z_AT_FPR, color="black", ls=":", lw=1)
    ax.tick_params(labelsize=7)


def _no_scores(attack: str, what: str = "the paper's Fig. 6") -> Figure:
    fig, (ax,) = grid(1, height=0.6)
    ax.set_axis_off()
    text = f"No per-poison Gaussian scores: the {attack} attack adds no Gaussian noise, so {what}"
    ax.text(0.5, 0.5, text + "\ndoes not apply (see attack_check.png).", ha="center")
    return fig


def gaussian_scores(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """The paper's Figure 6 as a grid: per method (its best at the largest budget), histograms
    of the per-poison scores I of the poisoned, retrained and unlearned models against N(0, 1),
    pooled over the runs the table averages (feasible on test); each panel with its z and n."""
    if df["before_scores"].isna().all():
        return _no_scores(df["attack"].iloc[0])
    runs = {(b["attack"], b["method"], b["budget"]): r for b, r, _ in results.chosen(df)}
    shown = _largest(table, df)
    fig, axes = grid(len(shown), sharex=True, sharey=True)
    seeds, zs = set(), []
    for ax, row in zip(axes, shown.to_dict("records")):
        rows = runs[(row["attack"], row["method"], row["budget"])]
        rows = rows[rows["feasible_test"].astype(bool)]
        after = _scores(rows, "after_scores")
        seeds.update(rows["seed"])
        colour = style(row["method"])["color"]
        _histograms(ax, results.reference_rows(df, row["attack"], rows["seed"]), after, colour)
        at = f" (at {pct(row['from_budget'])})" if row["from_budget"] < row["budget"] else ""
        ax.set_title(f"{row['method']}, ≤ {pct(row['budget'])}{at}", fontsize=8, color=colour)
        z = _z(after)
        zs += [z] if len(after) else []
        text = f"z = {z:.1f}\nn = {len(after)}" if len(after) else "no feasible run"
        ax.text(0.03, 0.96, text, transform=ax.transAxes, va="top", fontsize=7.5)
    fig.supxlabel("per-poison Gaussian score I (standard-normal units)", fontsize=9)
    fig.supylabel("density", fontsize=9)
    ref = results.reference_rows(df, df["attack"].iloc[0], sorted(seeds))
    still = sum(z < Z_DETECTED for z in zs)
    title = (
        f"Gaussian test (paper's Fig. 6): after unlearning, {still} of {len(zs)} methods still "
        f"show the poisons\n(unlearned z < {Z_DETECTED:.2f}, p < 0.01; n = poisons pooled over "
        "seeds)"
    )
    handles = [
        Line2D(
            [], [], color=POISONED, label=f"poisoned (z = {_z(_scores(ref, 'before_scores')):.1f})"
        ),
        Line2D(
            [], [], color=RETRAIN, label=f"retrained (z = {_z(_scores(ref, 'retrain_scores')):.1f})"
        ),
        Patch(color="grey", alpha=0.45, label="unlearned (the method's colour)"),
        Line2D([], [], color="black", label="N(0, 1): never trained on"),
        Line2D([], [], color="black", ls=":", label="1 % FPR threshold"),
    ]
    return finish(fig, title, handles, ncols=3)


def _qq(ax, scores: np.ndarray, **kw) -> None:
    """Sorted scores against N(0, 1)'s quantiles at the plotting positions (i - 0.5) / n."""
    s = np.sort(scores[~np.isnan(scores)])
    if len(s):
        ax.plot(norm.ppf((np.arange(1, len(s) + 1) - 0.5) / len(s)), np.clip(s, -5, 5), **kw)


def _band(ax, n: int) -> None:
    """Where 95 % of each order statistic of n N(0, 1) draws falls (pointwise): the i-th of n
    uniforms is Beta(i, n + 1 - i), mapped through the normal quantile function."""
    i = np.arange(1, n + 1)
    x = norm.ppf((i - 0.5) / n)
    lo, hi = (norm.ppf(beta.ppf(q, i, n + 1 - i)) for q in (0.025, 0.975))
    ax.fill_between(x, lo, hi, color="black", alpha=0.1, lw=0)
    ax.plot([-3.5, 3.5], [-3.5, 3.5], color="black", lw=0.8)


def null_qq(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """Issue 24's QQ grid: per method (its best at the largest budget), each run's per-poison
    scores I against N(0, 1) (one line per seed: the confirm runs the table reports), with the
    poisoned and retrained models' on the same seeds, the band where 95 % of a never-trained
    model's order statistics fall, and the table's verdict (`indistinguishable`)."""
    if df["before_scores"].isna().all():
        return _no_scores(df["attack"].iloc[0], "the QQ grid against N(0, 1)")
    runs = {(b["attack"], b["method"], b["budget"]): r for b, r, _ in results.chosen(df)}
    shown = _largest(table, df)
    fig, axes = grid(len(shown), sharex=True, sharey=True)
    clean, alpha = 0, math.nan
    for ax, row in zip(axes, shown.to_dict("records")):
        rows = runs[(row["attack"], row["method"], row["budget"])].sort_values("seed")
        refs = results.reference_rows(df, row["attack"], rows["seed"])
        colour = style(row["method"])["color"]
        n = max((len(s) for s in rows["after_scores"] if s is not None), default=0)
        if n:
            _band(ax, n)
        for _, ref in refs.iterrows():
            _qq(ax, np.asarray(ref["before_scores"], float), color=POISONED, lw=0.8)
            _qq(ax, np.asarray(ref["retrain_scores"], float), color=RETRAIN, lw=0.8)
        for _, run in rows.iterrows():
            _qq(ax, np.asarray(run["after_scores"], float), color=colour, lw=1.6)
        ax.axhline(Z_AT_FPR, color="black", ls=":", lw=0.8)
        ax.axhline(-Z_AT_FPR, color="black", ls=":", lw=0.8)
        at = f" (at {pct(row['from_budget'])})" if row["from_budget"] < row["budget"] else ""
        ax.set_title(f"{row['method']}, ≤ {pct(row['budget'])}{at}", fontsize=8, color=colour)
        passed, alpha = row["indistinguishable"], row["null_alpha"]
        clean += passed == row["n"]
        low = ", ".join(
            str(int((np.asarray(s, float) <= Z_AT_FPR).sum())) for s in rows["after_scores"]
        )
        text = f"passes on {passed:.0f} of {row['n']:.0f}\n≤ Φ⁻¹(0.01): {low} ({FPR * n:g} exp.)"
        ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", fontsize=7)
        ax.tick_params(labelsize=7)
    ax.set_xlim(-3.2, 3.2)
    ax.set_ylim(-5.2, 5.2)
    fig.supxlabel("N(0, 1) quantile", fontsize=9)
    fig.supylabel("per-poison Gaussian score I (clipped to ±5)", fontsize=9)
    title = (
        f"Per-poison scores against N(0, 1): {clean} of {len(shown)} methods' unlearned models "
        f"pass on every seed\n(metrics.null_tests at α = {alpha:.2g} per run: 0.01 over the "
        "table's Gaussian cells)"
    )
    handles = [
        Line2D([], [], color="grey", lw=1.6, label="unlearned, one line per seed"),
        Line2D([], [], color=POISONED, lw=0.8, label="poisoned"),
        Line2D([], [], color=RETRAIN, lw=0.8, label="retrained"),
        Line2D([], [], color="black", lw=0.8, label="diagonal: never trained on the noise"),
        Patch(color="black", alpha=0.1, label="95 % of N(0, 1) (pointwise)"),
        Line2D([], [], color="black", ls=":", lw=0.8, label="Φ⁻¹(0.01), Φ⁻¹(0.99)"),
    ]
    return finish(fig, title, handles, ncols=3)


def mia_tpr(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """The paper's Figure 2: loss-MIA vs Gaussian-MIA TPR at 1 % FPR per method (its best at
    the largest budget), between the poisoned and retrain references."""
    rows = _largest(table, df)
    refs = table[table["source"] == "reference"].set_index("method")
    shown = pd.concat(
        [refs.loc[["poisoned"]].reset_index(), rows, refs.loc[["retrain"]].reset_index()]
    )
    fig, (ax,) = grid(1, height=0.26 * len(shown) + 0.8)
    y = np.arange(len(shown))[::-1]
    keys = {
        "loss_mia_tpr": ("#a6a6a6", "loss-threshold MIA"),
        "tpr_at_1fpr": ("#08306b", "Gaussian MIA"),
    }
    for dy, (key, (colour, label)) in zip((0.2, -0.2), keys.items()):
        ax.barh(
            y + dy,
            100 * shown[key],
            height=0.4,
            color=colour,
            label=label,
            xerr=100 * _err(shown[f"{key}_std"]),
            error_kw={"capsize": 2, "lw": 0.8},
        )
    ax.axvline(100 * FPR, color="black", ls=":", lw=1, label="1 %: chance (the FPR)")
    names = [
        m if pd.isna(b) else f"{m} (≤ {pct(b)})" for m, b in zip(shown["method"], shown["budget"])
    ]
    ax.set_yticks(y, names, fontsize=8)
    for tick, method in zip(ax.get_yticklabels(), shown["method"]):
        tick.set_color(
            {"poisoned": POISONED, "retrain": RETRAIN}.get(method) or style(method)["color"]
        )
    for yi, tpr in zip(y, shown["tpr_at_1fpr"]):
        if pd.isna(tpr):
            ax.text(0.2, yi, "no feasible run", va="center", fontsize=7.5)
    top = np.nanmax(
        100
        * (
            shown[list(keys)].to_numpy(float)
            + shown[[f"{k}_std" for k in keys]].fillna(0).to_numpy(float)
        ),
        initial=0,
    )
    ax.set_xlim(0, max(5.0, 1.05 * top))
    ax.set(xlabel="true-positive rate at 1 % false-positive rate (% of the poisons detected)")
    more = int((rows["tpr_at_1fpr"] > rows["loss_mia_tpr"]).sum())
    poisoned = refs.loc["poisoned"]
    title = (
        f"Membership inference at 1 % FPR (paper's Fig. 2). On the poisoned model the Gaussian MIA "
        f"finds {100 * poisoned['tpr_at_1fpr']:.0f} %\nof the poisons, the loss MIA "
        f"{100 * poisoned['loss_mia_tpr']:.0f} %; after unlearning the Gaussian MIA finds more for "
        f"{more} of {len(rows)} methods"
    )
    return finish(fig, title, ax.get_legend_handles_labels()[0], ncols=3)


def _retrain(ref: dict) -> dict:
    """The retrain reference's metrics of one seed's row (the retrain_ columns, unprefixed)."""
    return {k.removeprefix("retrain_"): v for k, v in ref.items() if k.startswith("retrain_")}


def _verdict(ref: dict) -> str:
    if ref["attack_ok"]:
        return "worked"
    if ref["resolution"] > MAX_RESOLUTION:
        return f"unresolved\n(±{ref['resolution']:.2f} > ±{MAX_RESOLUTION:g})"
    return "did not work"


def attack_check(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """Per seed, the attack's effect on the poisoned model, on the retrain reference and (for
    Gaussian noise) on fresh noise never trained on, against the success criterion (the line:
    its record's check, records.Check)."""
    attack = df["attack"].iloc[0]  # a run has one attack (the spec's)
    record = RECORDS[attack]
    column, ylabel, scale = record.check.column, record.check.label, record.check.scale
    refs = results.reference_rows(df, attack, df["seed"].unique())
    tuned = set(df.loc[df["phase"] == "tune", "seed"])
    fig, (ax,) = grid(1, height=3.4)
    x = np.arange(len(refs))
    ax.scatter(
        x - 0.15, scale * refs[f"before_{column}"], color=POISONED, marker="X", s=60, zorder=3
    )
    ax.scatter(x, scale * refs[f"retrain_{column}"], color=RETRAIN, marker="*", s=80, zorder=3)
    handles = [
        Line2D([], [], color=POISONED, marker="X", ls="", ms=8, label="poisoned model"),
        Line2D(
            [], [], color=RETRAIN, marker="*", ls="", ms=9, label="retrained without the poisons"
        ),
    ]
    if record.scores:  # Gaussian noise: the control, fresh noise never trained on
        ax.scatter(
            x + 0.15, refs["before_control_gus_z"], color=CONTROL, marker="o", s=36, zorder=3
        )
        ax.axhspan(Z_DETECTED, -Z_DETECTED, color=CONTROL, alpha=0.1, lw=0)
        handles += [
            Line2D(
                [],
                [],
                color=CONTROL,
                marker="o",
                ls="",
                label="control: fresh noise, poisoned model",
            ),
            Patch(color=CONTROL, alpha=0.1, label=f"|z| < {-Z_DETECTED:.2f}: nothing detected"),
        ]
    lines = [scale * record.check.line(_retrain(ref)) for ref in refs.to_dict("records")]
    ax.hlines(lines, x - 0.35, x + 0.35, color="black", lw=1.5)  # one per seed
    for xi, ref in zip(x, refs.to_dict("records")):
        colour = "black" if ref["attack_ok"] else POISONED
        ax.annotate(
            _verdict(ref),
            (xi, 1.01),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="bottom",
            fontsize=7.5,
            color=colour,
        )
    labels = [f"seed {s}\n({'tuning' if s in tuned else 'confirm'})" for s in refs["seed"]]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlim(-0.6, len(refs) - 0.4)
    ax.set(ylabel=ylabel)
    side = "below" if record.check.below else "above"
    handles.append(
        Line2D([], [], color="black", lw=1.5, label=f"success: poisoned {side} this line")
    )
    title = (
        f"Attack check ({attack}): the poisoning worked on {int(refs['attack_ok'].sum())} of "
        f"{len(refs)} seeds\n(past the line and resolving r to ±{MAX_RESOLUTION:g}); r is "
        "meaningless on the others"
    )
    return finish(fig, title, handles, ncols=2)
