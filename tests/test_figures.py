"""The report's figures: one look for every method, and what each figure draws recomputed from
the Parquet rows with pandas."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from raysweep.analysis import results
from raysweep.analysis.convergence import convergence
from raysweep.reporting import figures, plotstyle, report, tuning_figures
from raysweep.unlearning.unlearners import UNLEARNERS


@pytest.fixture(scope="module")
def rows(finished_run):
    df = pd.read_parquet(f"{finished_run}/results")
    return results.table(df), df


def _looks(methods) -> set:
    return {(s["color"], s["marker"], s["linestyle"]) for s in map(plotstyle.style, methods)}


def test_every_method_has_its_own_look_in_every_figure():
    assert len(_looks(UNLEARNERS)) == len(UNLEARNERS)
    # Room for the table to grow: 64 methods still differ in colour or marker.
    assert len({(s["color"], s["marker"]) for s in map(plotstyle.look, range(64))}) == 64
    colours = [plotstyle.style(m)["color"] for m in list(UNLEARNERS)[:8]]
    assert len(set(colours)) == 8 and plotstyle.POISONED not in colours
    assert plotstyle.style("ssd") == plotstyle.style("ssd")  # fixed, not by order of appearance
    assert plotstyle.ordered(["ssd", "gd", "cfk"]) == ["gd", "cfk", "ssd"]


def test_plotstyle_knows_the_unlearners_without_importing_them():
    # The report orders and colours methods from plotstyle.METHODS, not the UNLEARNERS table
    # (torch): the table's first entries, in its order, so no method's look moves; a method
    # added since gets a look from its name until it is listed, never another method's.
    assert list(UNLEARNERS)[: len(plotstyle.METHODS)] == list(plotstyle.METHODS)
    late = plotstyle.style("an_unlisted_method")
    assert late not in [plotstyle.style(m) for m in plotstyle.METHODS]


def test_figures_fit_a_readme_and_keep_grids_to_four_columns(rows):
    table, df = rows
    for name, fn in report.FIGURES.items():
        fig = fn(table, df)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        height, width = imread(io.BytesIO(buf.getvalue())).shape[:2]
        assert width <= 1080 and height <= 1200, name
        columns = {round(ax.get_position().x0, 3) for ax in fig.axes if ax.get_visible()}
        assert len(columns) <= plotstyle.NCOLS, name
        assert len(fig.legends) == 1 and fig.legends[0].get_title().get_text(), name


def test_residual_vs_budget_shows_the_best_so_far_chosen_on_val(rows):
    table, df = rows
    got = figures.anytime(table, df)
    tune = df[(df["phase"] == "tune") & (df["status"] == "ok")]
    for (method, budget), row in got.set_index(["method", "budget"]).iterrows():
        upto = tune[(tune["method"] == method) & (tune["budget"] <= budget)]
        pick = upto.sort_values(["feasible", "objective"], ascending=[False, True]).iloc[0]
        assert row["from_budget"] == pick["budget"] and row["objective"] == pick["objective"]
        cell = table[(table["method"] == method) & (table["budget"] == budget)].iloc[0]
        assert row["residual"] == pytest.approx(cell["residual"], nan_ok=True)
    # so the chosen objective never rises with the budget
    for _, g in got.sort_values("budget").groupby("method"):
        assert g["objective"].is_monotonic_decreasing


def _panels(fig, table, df):
    """The chosen runs per (method, budget), the methods shown at their largest budget, and
    the figure's visible panel per method (one for each shown method: asserted)."""
    chosen = {(b["method"], b["budget"]): r for b, r, _ in results.chosen(df)}
    shown = figures.anytime(table, df)
    shown = shown[shown["budget"] == shown.groupby("method")["budget"].transform("max")]
    panels = {ax.get_title().split(",")[0]: ax for ax in fig.axes if ax.get_visible()}
    assert sorted(panels) == sorted(shown["method"])
    return chosen, shown, panels


def test_each_gaussian_panel_gives_the_z_and_n_of_its_pooled_scores(rows):
    table, df = rows
    fig = figures.gaussian_scores(table, df)
    chosen, shown, panels = _panels(fig, table, df)
    for row in shown.to_dict("records"):
        runs = chosen[(row["method"], row["budget"])]
        runs = runs[runs["feasible_test"]]
        scores = np.concatenate([np.asarray(s) for s in runs["after_scores"]] or [[]])
        scores = scores[~np.isnan(scores)]
        text = panels[row["method"]].texts[0].get_text()
        if len(scores):
            z = scores.mean() * np.sqrt(len(scores))
            assert text == f"z = {z:.1f}\nn = {len(scores)}"
        else:
            assert text == "no feasible run"


def _drawn_convergence(fig) -> dict:
    """Per panel (method), its budget lines as drawn: [(linestyle, y of the steps, hollow end?)].
    A cell draws its steps, then its crosses, then a hollow circle if any: read in that order."""
    out = {}
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        lines = []
        for ln in ax.lines:
            if ln.get_drawstyle() == "steps-post":
                y = np.asarray(ln.get_ydata(), float)
                lines.append([ln.get_linestyle(), y[:-1], False, np.nan_to_num(y[-1], nan=1.25)])
            elif ln.get_marker() == "o":  # ends the line before it, on top with no feasible trial
                assert ln.get_ydata()[0] == lines[-1][3] and not lines[-1][2]
                lines[-1][2] = True
        out[ax.get_title().split(" (")[0]] = [tuple(line[:3]) for line in lines]
    return out


def _best_so_far_by_pandas(df, method, budget) -> np.ndarray:
    """README's curve in plain pandas: trial i is the i-th ok trial of the cell and of each of its
    method's smaller budgets, the best so far is the lowest objective up to i (not drawn before a
    feasible trial; clipped at the figure's top, 1.25)."""
    tune = df[(df.phase == "tune") & (df.status == "ok")].sort_values("trial_number")
    rows = tune[(tune.method == method) & (tune.budget <= budget)]
    step = rows.groupby("budget").cumcount()
    best = rows.objective.groupby(step).min().sort_index().cummin()
    seen = rows.feasible.eq(True).groupby(step).any().sort_index().cummax()
    return best.where(seen).clip(upper=1.25).to_numpy(float)


def _check_convergence_figure(table, df) -> dict:
    """Every line of the convergence figure is README's best so far, and a hollow circle ends it
    exactly where the table says not converged; returns the lines drawn."""
    fig = tuning_figures.convergence(table, df)
    drawn = _drawn_convergence(fig)
    cells = table[table.source != "reference"]
    budgets = sorted(cells.budget.unique(), reverse=True)
    for method, lines in drawn.items():
        mine = cells[cells.method == method].sort_values("budget")
        assert len(lines) == len(mine)
        for (ls, y, marked), cell in zip(lines, mine.itertuples()):
            assert ls == plotstyle.LINES[budgets.index(cell.budget)]
            np.testing.assert_allclose(y, _best_so_far_by_pandas(df, method, cell.budget))
            assert marked == (not cell.converged), (method, cell.budget)
    return drawn


def test_convergence_draws_the_best_so_far_the_tables_flag_reads(rows):
    table, df = rows
    drawn = _check_convergence_figure(table, df)
    assert sum(len(lines) for lines in drawn.values()) == (table.source != "reference").sum()


def test_convergence_line_of_a_cell_chosen_from_a_smaller_budget_shows_that_budgets_gain():
    """Issue 28's case: the 10 % cell's own trials are flat, its 5 % cell found a better setting
    late. The table reads the 10 % cell's best as that row, so not converged; its line must drop
    there too (drawn from its own trials alone it stayed flat beside a "not converged" mark)."""
    rows = []
    for budget, objectives in [(0.05, [10.3, 0.9, 0.8, 0.85, 0.9, 0.1]), (0.1, [0.7] * 6)]:
        rows += [
            {"phase": "tune", "status": "ok", "attack": "gaussian", "method": "bad_teacher",
             "budget": budget, "cell": f"bad_teacher-b{budget:g}", "trial_number": i,
             "objective": o, "feasible": o < 10, "resolution": 0.05, "tuned_trial": None}
            for i, o in enumerate(objectives)
        ]  # fmt: skip
    df = pd.DataFrame(rows)
    table = convergence(df).assign(source="tuned")
    assert not table.converged.any()
    drawn = _check_convergence_figure(table, df)["bad_teacher"]
    (_, small, _), (_, large, _) = drawn  # by budget, ascending
    np.testing.assert_allclose(small, [np.nan, 0.9, 0.8, 0.8, 0.8, 0.1])
    np.testing.assert_allclose(large, [0.7, 0.7, 0.7, 0.7, 0.7, 0.1])


def test_attack_check_draws_each_seeds_criterion_and_verdict(rows):
    _, df = rows
    fig = figures.attack_check(None, df)
    ax = fig.axes[0]
    seeds = df[df["status"] == "ok"].drop_duplicates("seed").sort_values("seed")
    lines = ax.collections[-1].get_segments()  # one criterion line per seed
    assert [seg[0][1] for seg in lines] == pytest.approx([figures.Z_DETECTED] * len(seeds))
    verdicts = [t.get_text() for t in ax.texts]
    assert verdicts.count("worked") == int(seeds["attack_ok"].sum())
    # an accuracy attack: the line is the retrain reference's effect plus the least gap
    flip = df.assign(attack="label_flip", before_scores=None)
    ax = figures.attack_check(None, flip).axes[0]
    want = 100 * (seeds["retrain_effect_val"] + 0.03)
    assert [seg[0][1] for seg in ax.collections[-1].get_segments()] == pytest.approx(list(want))
    fig = figures.gaussian_scores(results.table(flip), flip)
    assert "label_flip attack adds no Gaussian noise" in fig.axes[0].texts[0].get_text()


def test_each_qq_panel_draws_every_run_sorted_against_normal_quantiles(rows):
    """null_qq: per method, one line per run of the table's chosen rows, its sorted scores
    against N(0, 1)'s quantiles; the panel's verdict is the table's `indistinguishable`."""
    table, df = rows
    fig = figures.null_qq(table, df)
    chosen, shown, panels = _panels(fig, table, df)
    for row in shown.to_dict("records"):
        ax, runs = panels[row["method"]], chosen[(row["method"], row["budget"])]
        colour = plotstyle.style(row["method"])["color"]
        drawn = [line.get_ydata() for line in ax.lines if line.get_color() == colour]
        want = [np.sort(np.asarray(s, float)) for s in runs.sort_values("seed")["after_scores"]]
        assert len(drawn) == len(want)
        for got, scores in zip(drawn, want):
            np.testing.assert_allclose(got, np.clip(scores[~np.isnan(scores)], -5, 5))
        text = ax.texts[0].get_text()
        assert text.startswith(f"passes on {row['indistinguishable']:.0f} of {row['n']:.0f}")
    flip = df.assign(attack="label_flip", before_scores=None)
    fig = figures.null_qq(results.table(flip), flip)
    assert "label_flip attack adds no Gaussian noise" in fig.axes[0].texts[0].get_text()
