"""The report: tables and figures from a run's Parquet rows, recomputed independently with pandas."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from raysweep.analysis import results
from raysweep.analysis.convergence import convergence
from raysweep.cli import main
from raysweep.reporting import report, tuning_figures
from raysweep.runner.progress import Progress, cell_key
from raysweep.science.stats import Z_AT_FPR

STATS = {
    "residual": "residual",
    "clean_acc": "after_clean_acc_test",
    "gus": "after_gus",
    "tpr_at_1fpr": "after_tpr_at_1fpr",
    "loss_mia_tpr": "after_loss_mia_tpr",
}


@pytest.fixture(scope="module")
def run_dir(finished_run):
    """The finished tiny run with its report written to RUN_DIR/report."""
    report.write(finished_run)
    return finished_run


def test_report_writes_markdown_csv_and_figures(run_dir):
    names = sorted(os.listdir(f"{run_dir}/report"))
    assert names == sorted(["report.md", "report.csv", *(f"{f}.png" for f in report.FIGURES)])
    for f in report.FIGURES:
        with open(f"{run_dir}/report/{f}.png", "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(f"{run_dir}/report/report.md").read()
    assert "confirmation seeds 1, 2" in md and "| gaussian | gd | 0.05 | " in md
    df = pd.read_parquet(f"{run_dir}/results")
    per_seed = df[df["phase"] == "confirm"].drop_duplicates("seed")
    worked = {2: "yes", 1: "1/2", 0: "**no**"}[int(per_seed["attack_ok"].sum())]
    assert f"| gaussian | poisoned |  |  | 2 | {worked} |  |  | 1.000 ± 0.000 |  |" in md


def test_table_equals_a_pandas_recomputation_from_parquet(run_dir):
    df = pd.read_parquet(f"{run_dir}/results")
    table = pd.read_csv(f"{run_dir}/report/report.csv")
    tune = df[(df["phase"] == "tune") & (df["status"] == "ok")]
    confirm = df[(df["phase"] == "confirm") & (df["status"] == "ok")]
    assert len(df[df["phase"] == "tune"]) == 8
    for (method, budget), _ in tune.groupby(["method", "budget"]):
        # the best of the method's rows at or below the cell's budget: a method may stop early
        upto = tune[(tune["method"] == method) & (tune["budget"] <= budget)]
        feasible = upto[upto["feasible"]]
        best = (feasible if len(feasible) else upto).sort_values(["objective", "budget"]).iloc[0]
        runs = confirm[
            (confirm["cell"] == best["cell"]) & (confirm["tuned_trial"] == best["trial_number"])
        ]
        assert sorted(runs["seed"]) == [1, 2] and (runs["budget"] == best["budget"]).all()
        got = table[(table["method"] == method) & (table["budget"] == budget)].iloc[0]
        assert got["tuned_trial"] == best["trial_number"] and got["n"] == 2
        assert got["from_budget"] == best["budget"]
        # Numbers are over the feasible runs; how many those are is a column of its own.
        kept = runs[runs["feasible_test"]]
        assert got["feasible"] == len(kept)
        for name, col in STATS.items():
            assert got[name] == pytest.approx(kept[col].mean(), abs=1e-12, nan_ok=True)
            assert got[f"{name}_std"] == pytest.approx(kept[col].std(), abs=1e-12, nan_ok=True)
        assert got["residual_lo"] == pytest.approx(kept["residual_lo"].min(), nan_ok=True)
        assert got["residual_hi"] == pytest.approx(kept["residual_hi"].max(), nan_ok=True)
        assert (runs["residual_lo"] <= runs["residual"]).all()
        assert (runs["residual"] <= runs["residual_hi"]).all()
    per_seed = confirm.drop_duplicates("seed")
    for label, prefix in (("poisoned", "before"), ("retrain", "retrain")):
        got = table[table["method"] == label].iloc[0]
        assert got["residual"] == (1.0 if label == "poisoned" else 0.0)
        for name in ("clean_acc", "gus", "tpr_at_1fpr", "loss_mia_tpr"):
            col = f"{prefix}_{STATS[name].removeprefix('after_')}"
            assert got[name] == pytest.approx(per_seed[col].mean(), abs=1e-12)
            assert got[f"{name}_std"] == pytest.approx(per_seed[col].std(), abs=1e-12)


def test_stored_scores_are_the_ones_behind_gus(run_dir):
    df = pd.read_parquet(f"{run_dir}/results")
    for row in df.to_dict("records"):
        for model in ("before", "after", "retrain"):
            scores = np.asarray(row[f"{model}_scores"])
            assert len(scores) == 30  # one per poison
            assert scores.mean() == pytest.approx(row[f"{model}_gus"], abs=1e-9)
            assert (scores <= Z_AT_FPR).mean() == pytest.approx(row[f"{model}_tpr_at_1fpr"])


def test_cli_report_prints_the_table_and_fails_cleanly_on_a_wrong_dir(run_dir, tmp_path, capsys):
    assert main(["report", run_dir, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| gaussian | ga | 0.1 | " in out and str(tmp_path / "out" / "pareto.png") in out
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "no Parquet rows" in capsys.readouterr().err


# Run as `raysweep report` in a fresh interpreter: any attempt to import torch (caught or not)
# is recorded and refused, and none may remain loaded at the end.
NO_TORCH = """
import sys

tried = []


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            tried.append(name)
            raise ImportError(f"{name}: the report imported torch")


sys.meta_path.insert(0, NoTorch())
from raysweep.cli import main

rc = main(["report", *sys.argv[1:]])
loaded = [m for m in sys.modules if m.split(".")[0] == "torch"]
assert not tried and not loaded, (tried, loaded)
sys.exit(rc)
"""


def test_cli_report_never_imports_torch_and_writes_the_same_report(run_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, run_dir, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("report.md", "report.csv"):  # as report.write in this process (with torch)
        assert (out / name).read_bytes() == open(f"{run_dir}/report/{name}", "rb").read()


def test_table_without_confirm_rows_reports_the_tuned_best(run_dir):
    df = pd.read_parquet(f"{run_dir}/results")
    table = results.table(df[df["phase"] == "tune"])
    cells = table[table["source"] == "tune"]
    assert len(cells) == 4 and (cells["n"] == 1).all() and cells["residual_std"].isna().all()
    assert (table.loc[table["source"] == "reference", "seeds"] == "0").all()


def test_a_failed_attack_is_marked_and_warned_about_never_averaged_in_silently(run_dir):
    df = pd.read_parquet(f"{run_dir}/results")
    df["attack_ok"] = True
    df["feasible_test"] = True
    clean = report.markdown_table(results.table(df))
    assert "warning" not in clean and "| gaussian | poisoned |  |  | 2 | yes |" in clean
    df.loc[df["seed"] == 1, "attack_ok"] = False  # one confirmation seed's attack did not work
    marked = report.markdown_table(results.table(df))
    assert "| gaussian | poisoned |  |  | 2 | 1/2 |" in marked
    assert marked.splitlines()[-1].startswith("warning: gaussian: the attack worked on 1 of 2")
    df["attack_ok"] = False
    assert "| gaussian | retrain |  |  | 2 | **no** |" in report.markdown_table(results.table(df))


def test_pareto_front_keeps_only_undominated_points():
    r = np.array([0.5, 0.2, 0.9, 0.2, 0.7, 0.1])
    acc = np.array([0.90, 0.80, 0.95, 0.70, 0.85, 0.60])
    assert tuning_figures.pareto_front(r, acc).tolist() == [5, 1, 0, 2]


def _trial(cell, stops=(), **result):
    """A finished Tune trial as Progress sees it: rows in `stops` cells, then its own."""
    cells = [c for c, _, _ in stops] + [cell]
    result = {cell_key(k, c): v for c in cells for k, v in result.items()}
    return SimpleNamespace(config={"cell": cell, "stops": stops}, last_result=result)


def test_progress_shows_done_planned_best_r_and_failures(capsys):
    p = Progress("tune", {"gd-b0.1": 3, "ga-b0.1": 3}, every_s=math.inf)
    p.on_trial_complete(0, [], _trial("gd-b0.1", ok=True, feasible=True, r_val=0.4))
    p.on_trial_complete(0, [], _trial("gd-b0.1", ok=True, feasible=True, r_val=0.3))
    p.on_trial_complete(0, [], _trial("gd-b0.1", ok=True, feasible=False, r_val=0.1))
    p.on_trial_complete(0, [], _trial("ga-b0.1", ok=False))
    lines = capsys.readouterr().out.splitlines()
    assert "tune 3/6 | gd-b0.1 3/3 best r_val 0.300 failed 0" in lines[2]
    assert "tune 4/6 | ga-b0.1 1/3 best r_val - failed 1" in lines[3]
    table = p.table().splitlines()
    assert table[2].split() == ["gd-b0.1", "3/3", "0.300", "0"]
    assert table[3].split() == ["ga-b0.1", "1/3", "-", "1"]


def test_progress_counts_a_run_in_every_cell_it_has_a_row_in(capsys):
    p = Progress("tune", {"gd-b0.05": 2, "gd-b0.1": 2}, every_s=math.inf)
    run = _trial("gd-b0.1", [["gd-b0.05", 0.05, 0]], ok=True, feasible=True, r_val=0.2)
    p.on_trial_complete(0, [], run)
    p.on_trial_error(0, [], run)
    lines = capsys.readouterr().out.splitlines()
    assert "tune 1/4 | gd-b0.05 1/2 best r_val 0.200" in lines[0]
    assert "tune 4/4 | gd-b0.1 2/2 best r_val 0.200 failed 1" in lines[3]


def test_progress_of_a_resumed_run_starts_from_its_rows():
    rows = pd.DataFrame(
        {
            "phase": ["tune", "tune", "tune", "confirm"],
            "cell": ["gd-b0.1", "gd-b0.1", "ga-b0.1", "gd-b0.1"],
            "status": ["ok", "failed", "ok", "ok"],
            "feasible": [True, None, False, True],
            "residual_val": [0.25, None, 0.1, 0.0],
        }
    )
    table = Progress("tune", {"gd-b0.1": 4, "ga-b0.1": 4}, rows).table().splitlines()
    assert table[2].split() == ["gd-b0.1", "2/4", "0.250", "1"]
    assert table[3].split() == ["ga-b0.1", "1/4", "infeasible", "0"]


def test_report_and_figure_count_the_cells_convergence_py_marks_not_converged(run_dir):
    df = pd.read_parquet(f"{run_dir}/results")
    flags = convergence(df).set_index(["method", "budget"])["converged"]
    n, cells = int((~flags).sum()), len(flags)
    md = open(f"{run_dir}/report/report.md").read()
    assert f"{n} of {cells} cells not converged" in md
    lines = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0]]
    shown = {}
    for line in lines[1:]:
        row = dict(zip(head, (c.strip() for c in line)))
        if row["converged"]:  # references have none
            shown[row["method"], float(row["budget"])] = row["converged"]
    assert shown == {k: "yes" if v else "**no**" for k, v in flags.items()}
    fig = tuning_figures.convergence(results.table(df), df)
    assert f"{n} of {cells} cells not converged" in fig.legends[0].get_title().get_text()


def test_pareto_draws_a_run_whose_attack_left_no_residual(run_dir):
    """An attack that did not work leaves r undefined (NaN) on every row, as a tiny
    gradient_matching run does: the figure still draws the trials' panels, without a best."""
    df = pd.read_parquet(f"{run_dir}/results").assign(residual=math.nan)
    fig = tuning_figures.pareto(results.table(df), df)
    title = fig.legends[0].get_title().get_text()  # plotstyle.finish: the legend's title
    assert fig.axes and title.startswith("Removal against utility") and "lowest |r|" not in title
    tuned = df[(df["phase"] == "tune") & (df["status"] == "ok")]
    for ax, (budget, at) in zip(fig.axes, tuned.groupby("budget")):  # none drawn: each is said
        assert f"{len(at)} without r" in ax.get_title(), (budget, ax.get_title())
        assert "off the axes" not in ax.get_title()  # counted once, as without r
