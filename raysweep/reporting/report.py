"""`raysweep report RUN_DIR`: the paper-style table (Markdown + CSV) and figures of one run.

Everything comes from the run's Parquet rows, so a report needs neither torch nor checkpoints
and works on any storage the run used. Settings were chosen on val while tuning
(`results.best_per_cell`); what the report shows is read from test columns only (clean
accuracy, r, loss MIA with test rows as non-members) and from the per-poison Gaussian scores,
which are computed on the poisons themselves and belong to no evaluation split.
"""

from __future__ import annotations

import json

import pandas as pd

from raysweep.analysis import results
from raysweep.base.storage import CorruptStorage, RunStateError, Store, open_store

from . import figures, tuning_figures
from .plotstyle import mean_std, png


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


def trials_max(store: Store, experiment: str) -> int | None:
    """The max of the experiment's `trials_per_cell` where it is a range (what the table's
    `stopped` column needs), from the spec it was started with; None for a fixed count or where
    spec.json is missing (the table then has no `stopped` column)."""
    rel = f"{experiment}/spec.json"
    if not store.exists(rel):
        return None
    try:
        n = json.loads(store.read(rel))["spec"]["trials_per_cell"]
    except (ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{store.path(rel)}: not a recorded spec ({type(e).__name__})") from None
    return n["max"] if isinstance(n, dict) else None


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
        "A cell's best is its method's best at or below its budget (a method may stop early): "
        "`from budget` is where the chosen run stopped.",
        not_converged_line(table),
        null_line(table),
        "",
        markdown_table(table),
    ]
    lines += ["", *(f"![{name}]({name}.png)" for name in FIGURES), ""]
    return "\n".join(lines)


def _interval(row: dict) -> str:
    """The hull of r's intervals; "unresolved" first where a run's seed could not resolve r
    (`attack_ok` false: its interval is no narrower than the seed's resolution, or infinite)."""
    if row["source"] == "reference":
        return ""
    hull = (
        ""
        if pd.isna(row["residual_lo"])
        else f"[{row['residual_lo']:.2f}, {row['residual_hi']:.2f}]"
    )
    return f"unresolved {hull}".strip() if row["attack_ok"] < row["n"] else hull


def _count(k: int, n: int) -> str:
    return "yes" if k == n else ("**no**" if k == 0 else f"{k}/{n}")


def _indistinguishable(row: dict) -> str:
    k = row["indistinguishable"]
    return "" if pd.isna(k) else _count(int(k), row["n"])


def _relearns(row: dict) -> str:
    """Runs whose relearn_gap interval lies above 0, per probe (results.relearn_stats)."""
    k = [row.get(f"relearn_faster_{p}") for p in results.RELEARN_PROBES]
    if any(pd.isna(x) for x in k):
        return ""
    # "yes" here is the bad outcome: the poison came back faster than after retraining.
    return " / ".join(
        "**yes**" if x == row["n"] else ("no" if x == 0 else f"{x:.0f}/{row['n']}") for x in k
    )


def _oracles(row: dict) -> str:
    """Against the seed's K retrain oracles (results.oracle_stats): runs whose r lies in the
    oracles' band, the mean share of units outside their margins' range (2 / (K + 1) expected
    of one more oracle), and runs more extreme than every oracle (p = 1 / (K + 1))."""
    if pd.isna(row.get("oracles")):
        return ""
    n, k = int(row["oracle_judged"]), int(row["oracles"])
    return (
        f"K = {k}: r in band {_count(int(row['oracle_inside']), n)}; "
        f"{row['oracle_outside']:.0%} of units outside (vs {2 / (k + 1):.0%}); "
        f"most extreme {row['oracle_extreme']:.0f}/{n}"
    )


def null_line(table: pd.DataFrame) -> str:
    """How the `indistinguishable` column reads (results.indistinguishable), with its level."""
    alpha = table["null_alpha"].dropna()
    if not len(alpha):
        return ""
    return (
        "`indistinguishable from never trained`: runs whose unlearned model's per-poison Gaussian "
        "scores pass all four tests against N(0, 1) (KS, an excess in either 1 % tail, KS against "
        f"the retrained model's scores) at α = {alpha.iloc[0]:.2g} (0.01, Bonferroni over the "
        "table's cells; the four tests Bonferroni within a run)."
    )


def not_converged_line(table: pd.DataFrame) -> str:
    """How many cells more trials might still improve (the `converged` column, convergence.py)."""
    cells = table[table["source"] != "reference"]
    n = int((~cells["converged"].astype(bool)).sum())
    return (
        f"{n} of {len(cells)} cells not converged (`converged` **no**: the best at or below the "
        "cell's budget improved in the last third of its trials by more than the noise between "
        "feasible runs)."
    )


def markdown_table(table: pd.DataFrame) -> str:
    """Just the table: one line per reference and per cell; a cell's numbers are mean ± std over
    its feasible runs, and its `feasible` column says how many of the n runs those are."""
    cols = ["attack", "method", "budget", "from budget", "n", "attack worked", "feasible"]
    # `stopped` only where trials_per_cell is a range (results.table got its max): with a fixed
    # count every cell stops at it, and the column would say nothing.
    ranged = bool(table["stopped"].fillna("").astype(str).str.len().any())
    cols += ["converged", *(["stopped"] if ranged else [])]
    cols += ["r", "r 95% CI", "indistinguishable from never trained"]
    cols += ["relearns faster than retrain (retain / poisons)"]
    # Oracles only where the spec asked for them (confirm.oracles): elsewhere an empty column.
    judged = "oracles" in table and bool(table["oracles"].notna().any())
    cols += ["against retrain oracles"] if judged else []
    cols += [reported.header for reported in results.REPORTED.values()] + ["setting"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table.to_dict("records"):
        ref = row["source"] == "reference"
        budget, start = ("", "") if ref else (f"{row['budget']:g}", f"{row['from_budget']:g}")
        feasible = "" if ref else _count(int(row["feasible"]), row["n"])
        converged = "" if ref else ("yes" if row["converged"] else "**no**")
        stats = [mean_std(row["residual"], row["residual_std"])]
        stats += [mean_std(row[k], row[f"{k}_std"], r.digits) for k, r in results.REPORTED.items()]
        setting = "" if pd.isna(row["setting"]) else row["setting"]
        cells = [row["attack"], row["method"], budget, start, str(row["n"])]
        cells += [_count(row["attack_ok"], row["n"]), feasible, converged]
        cells += [("" if ref else row["stopped"])] if ranged else []
        cells += [stats[0]]
        cells += [_interval(row), _indistinguishable(row), _relearns(row)]
        cells += [_oracles(row)] if judged else []
        lines.append("| " + " | ".join([*cells, *stats[1:], setting]) + " |")
    warnings = results.attack_warnings(table) + results.feasibility_warnings(table)
    return "\n".join(lines + ([""] + warnings if warnings else []))


# The figures, in the order report.md shows them (figures.py, tuning_figures.py).
FIGURES = {
    "residual_vs_budget": figures.residual_vs_budget,
    "gaussian_scores": figures.gaussian_scores,
    "null_qq": figures.null_qq,
    "mia_tpr": figures.mia_tpr,
    "attack_check": figures.attack_check,
    "pareto": tuning_figures.pareto,
    "convergence": tuning_figures.convergence,
}


def write(run_dir: str, out: str | None = None) -> tuple[str, list[str]]:
    """Write report.md, report.csv and the figures to `out` (default RUN_DIR/report).

    Returns the Markdown table and the paths written.
    """
    store, experiment, df = open_run(run_dir)
    table = results.table(df, trials_max(store, experiment))
    md = markdown(table, experiment, df)
    dest = open_store(out or f"{run_dir.rstrip('/')}/report")
    files = {
        "report.md": md.encode(),
        "report.csv": table.to_csv(index=False).encode(),
        **{f"{name}.png": png(fn(table, df)) for name, fn in FIGURES.items()},
    }
    for name, data in files.items():
        dest.write(name, data)
    return md, [dest.path(name) for name in files]
