"""`raysweep report RUN_DIR`: the paper-style table (Markdown + CSV) and figures of one run.

Everything comes from the run's Parquet rows, so a report needs neither torch nor checkpoints
and works on any storage the run used. Settings were chosen on val while tuning
(`results.best_per_cell`); what the report shows is read from test columns only (clean
accuracy, r, loss MIA with test rows as non-members) and from the per-poison Gaussian scores,
which are computed on the poisons themselves and belong to no evaluation split.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import norm

from . import results
from .metrics import FPR, Z_AT_FPR
from .storage import CorruptStorage, RunStateError, Store, open_store

HEADERS = {
    "residual": "r",
    "clean_acc": "clean acc",
    "gus": "GUS",
    "tpr_at_1fpr": "Gaussian MIA TPR@1%FPR",
    "loss_mia_tpr": "loss MIA TPR@1%FPR",
}


class ReportError(ValueError):
    """A run directory the report cannot read, as one line naming the path."""


def open_run(run_dir: str) -> tuple[Store, str, pd.DataFrame]:
    """The store holding RUN_DIR = <storage>/<experiment>, the experiment name and its rows."""
    parent, _, experiment = run_dir.rstrip("/").rpartition("/")
    try:  # reading never creates: a mistyped RUN_DIR leaves no directories behind
        store = open_store(parent or ".", create=False)
    except RunStateError as e:
        expected = "expected RUN_DIR = <storage>/<experiment> of a `raysweep run`"
        raise ReportError(f"{e}; {expected}") from None
    try:
        df = results.read(store, experiment)
    except CorruptStorage as e:  # a damaged row file: its path and the fix
        raise ReportError(str(e)) from None
    if not len(df):
        raise ReportError(
            f"{run_dir}/results: no Parquet rows; expected RUN_DIR = <storage>/<experiment> "
            "of a `raysweep run`"
        )
    return store, experiment, df


def _pm(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"


def markdown(table: pd.DataFrame, experiment: str, df: pd.DataFrame) -> str:
    """The table as Markdown, with a header saying how the numbers were chosen and measured."""
    tuned = df[df["phase"] == "tune"]
    seeds = sorted(df.loc[df["phase"] == "confirm", "seed"].unique())
    lines = [
        f"# {experiment}: every unlearner's best shot",
        "",
        f"Spec hash {', '.join(f'`{h}`' for h in df['spec_hash'].unique())}; "
        f"{tuned['cell'].nunique()} cells, "
        f"{len(tuned)} tuning trials ({int((tuned['status'] != 'ok').sum())} failed).",
        "Each cell's setting was chosen on **val** (minimise r subject to clean accuracy >= "
        "retrain's - delta); every number below is on **test** (or the poisons' own Gaussian "
        "scores), as mean ± std over "
        + (f"the confirmation seeds {', '.join(map(str, seeds))}" if seeds else "one run")
        + " where the unlearned model was feasible (`feasible`: how many of the n were).",
        "r = 1: nothing removed (poisoned); r = 0: as good as retraining. `r 95% CI` spans every "
        "feasible run's paired-bootstrap interval over the poisons (or rows): methods whose "
        "spans overlap are not told apart.",
        "",
        markdown_table(table),
    ]
    lines += ["", *(f"![{name}]({name}.png)" for name in FIGURES), ""]
    return "\n".join(lines)


def _interval(row: dict) -> str:
    if row["source"] == "reference" or pd.isna(row["residual_lo"]):
        return ""
    return f"[{row['residual_lo']:.2f}, {row['residual_hi']:.2f}]"


def _count(k: int, n: int) -> str:
    return "yes" if k == n else ("**no**" if k == 0 else f"{k}/{n}")


def markdown_table(table: pd.DataFrame) -> str:
    """Just the table: one line per reference and per cell; a cell's numbers are mean ± std over
    its feasible runs, and its `feasible` column says how many of the n runs those are."""
    cols = ["attack", "method", "budget", "n", "attack worked", "feasible", "r", "r 95% CI"]
    cols += [HEADERS[k] for k in HEADERS if k != "residual"] + ["setting"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table.to_dict("records"):
        budget = "" if pd.isna(row["budget"]) else f"{row['budget']:g}"
        ref = row["source"] == "reference"
        feasible = "" if ref else _count(int(row["feasible"]), row["n"])
        stats = [_pm(row[k], row[f"{k}_std"]) for k in HEADERS]
        setting = "" if pd.isna(row["setting"]) else row["setting"]
        cells = [row["attack"], row["method"], budget, str(row["n"])]
        cells += [_count(row["attack_ok"], row["n"]), feasible, stats[0], _interval(row)]
        lines.append("| " + " | ".join([*cells, *stats[1:], setting]) + " |")
    warnings = results.attack_warnings(table) + results.feasibility_warnings(table)
    return "\n".join(lines + ([""] + warnings if warnings else []))


def pareto_front(r: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both (lower r, higher accuracy), by r."""
    order = np.lexsort((-acc, r))
    front, best = [], -math.inf
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return np.array(front, dtype=int)


def _err(std: pd.Series) -> np.ndarray:
    return std.fillna(0.0).to_numpy(dtype=float)


def _methods(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["source"] != "reference"]


def _panels(n: int, width: float = 4.5, height: float = 3.6):
    fig = Figure(figsize=(width * n, height), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])


def residual_vs_budget(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """r (test) against the compute budget, per method, with the two references."""
    attacks = sorted(table["attack"].unique())
    fig, axes = _panels(len(attacks))
    for ax, attack in zip(axes, attacks):
        rows = _methods(table[table["attack"] == attack])
        for method, g in rows.groupby("method"):
            g = g.sort_values("budget")
            ax.errorbar(
                g["budget"],
                g["residual"],
                yerr=_err(g["residual_std"]),
                marker="o",
                capsize=3,
                label=method,
            )
        ax.axhline(1.0, color="tab:red", ls="--", lw=1, label="poisoned (no unlearning)")
        ax.axhline(0.0, color="gray", ls="--", lw=1, label="retrain")
        ax.set(xlabel="budget (fraction of training compute)", ylabel="residual r (test)")
        ax.set_title(f"{attack}: residual poison effect")
        ax.legend(fontsize=7)
    return fig


def _largest_budget(table: pd.DataFrame) -> pd.DataFrame:
    rows = _methods(table)
    return rows[rows["budget"] == rows.groupby(["attack", "method"])["budget"].transform("max")]


def _scores(rows: pd.DataFrame, column: str) -> np.ndarray:
    kept = [np.asarray(s, dtype=float) for s in rows[column] if s is not None]
    scores = np.concatenate(kept) if kept else np.array([])
    return scores[~np.isnan(scores)]  # degenerate poisons (zero gradient) carry no score


def gaussian_scores(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """The paper's Figure 6: histograms of I for the poisoned, retrained and best unlearned
    models (each method at its largest budget, pooled over the runs it is reported by)."""
    runs = {(b["attack"], b["method"], b["budget"]): r for b, r, _ in results.chosen(df)}
    shown = _largest_budget(table)
    fig, axes = _panels(max(1, len(shown)), width=3.6)
    grid, bins = np.linspace(-5, 5, 201), np.linspace(-5, 5, 41)
    for ax, row in zip(axes, shown.to_dict("records")):
        rows = runs[(row["attack"], row["method"], row["budget"])]
        refs = results.reference_rows(df, row["attack"], rows["seed"])
        for label, scores, color in (
            ("poisoned", _scores(refs, "before_scores"), "tab:red"),
            ("retrain", _scores(refs, "retrain_scores"), "gray"),
            (f"{row['method']} (unlearned)", _scores(rows, "after_scores"), "tab:blue"),
        ):
            if len(scores):
                ax.hist(
                    scores, bins, density=True, histtype="step", lw=1.5, color=color, label=label
                )
        ax.plot(grid, norm.pdf(grid), color="black", lw=1.2, label="N(0, 1)")
        ax.axvline(Z_AT_FPR, color="black", ls=":", lw=1, label="1% FPR threshold")
        ax.set(xlabel="I (per-poison Gaussian score)", ylabel="density")
        ax.set_title(f"{row['attack']} / {row['method']} at budget {row['budget']:g}", fontsize=9)
        ax.legend(fontsize=6)
    return fig


def mia_tpr(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """The paper's Figure 2: loss-MIA vs Gaussian-MIA TPR at 1% FPR, per method (largest budget),
    between the poisoned and retrain references."""
    attacks = sorted(table["attack"].unique())
    fig, axes = _panels(len(attacks), width=max(4.5, 1.1 * len(_largest_budget(table)) + 2.5))
    for ax, attack in zip(axes, attacks):
        t = table[table["attack"] == attack]
        refs = t[t["source"] == "reference"].set_index("method")
        rows = pd.concat(
            [
                refs.loc[["poisoned"]].reset_index(),
                _largest_budget(t),
                refs.loc[["retrain"]].reset_index(),
            ]
        )
        x = np.arange(len(rows))
        for dx, key, label in (
            (-0.2, "loss_mia_tpr", "loss MIA"),
            (0.2, "tpr_at_1fpr", "Gaussian MIA"),
        ):
            ax.bar(
                x + dx, rows[key], width=0.4, yerr=_err(rows[f"{key}_std"]), capsize=3, label=label
            )
        ax.axhline(FPR, color="black", ls=":", lw=1, label="FPR = 1% (chance)")
        names = [
            m if pd.isna(b) else f"{m}\nb={b:g}" for m, b in zip(rows["method"], rows["budget"])
        ]
        ax.set_xticks(x, names, fontsize=8)
        ax.set(ylabel="TPR at 1% FPR", ylim=(0, 1.05))
        ax.set_title(f"{attack}: does the MIA still detect the poisons?")
        ax.legend(fontsize=7)
    return fig


def pareto(table: pd.DataFrame, df: pd.DataFrame) -> Figure:
    """Every ok tuning trial as (r, clean accuracy) on test, with each method's Pareto front."""
    tuned = df[(df["phase"] == "tune") & (df["status"] == "ok")]
    budgets = sorted(tuned["budget"].unique())
    fig, axes = _panels(len(budgets))
    for ax, budget in zip(axes, budgets):
        at = tuned[tuned["budget"] == budget]
        for i, (method, g) in enumerate(at.groupby("method")):
            color = f"C{i}"
            r, acc = g["residual"].to_numpy(float), g["after_clean_acc_test"].to_numpy(float)
            ax.scatter(r, acc, s=14, alpha=0.35, color=color)
            front = pareto_front(r, acc)
            ax.step(r[front], acc[front], where="post", color=color, marker="o", ms=4, label=method)
        refs = at.drop_duplicates("seed")
        ax.scatter(
            np.ones(len(refs)),
            refs["before_clean_acc_test"],
            marker="X",
            s=60,
            color="tab:red",
            label="poisoned",
        )
        ax.scatter(
            np.zeros(len(refs)),
            refs["retrain_clean_acc_test"],
            marker="*",
            s=90,
            color="black",
            label="retrain",
        )
        ax.set(xlabel="residual r (test; lower is better)", ylabel="clean accuracy (test)")
        ax.set_title(f"budget {budget:g}: all tuning trials")
        ax.legend(fontsize=7)
    return fig


FIGURES = {
    "residual_vs_budget": residual_vs_budget,
    "gaussian_scores": gaussian_scores,
    "mia_tpr": mia_tpr,
    "pareto": pareto,
}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def write(run_dir: str, out: str | None = None) -> tuple[str, list[str]]:
    """Write report.md, report.csv and the figures to `out` (default RUN_DIR/report).

    Returns the Markdown table and the paths written.
    """
    _, experiment, df = open_run(run_dir)
    table = results.table(df)
    md = markdown(table, experiment, df)
    dest = open_store(out or f"{run_dir.rstrip('/')}/report")
    files = {
        "report.md": md.encode(),
        "report.csv": table.to_csv(index=False).encode(),
        **{f"{name}.png": _png(fn(table, df)) for name, fn in FIGURES.items()},
    }
    for name, data in files.items():
        dest.write(name, data)
    return md, [dest.path(name) for name in files]
