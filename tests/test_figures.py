"""The report's figures: one look for every method, and what each figure draws recomputed from
the Parquet rows with pandas."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from raysweep import figures, plotstyle, report, results, tuning_figures
from raysweep.unlearners import UNLEARNERS


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


def test_convergence_is_the_running_minimum_of_feasible_r_on_val(rows):
    _, df = rows
    tuned = df[df["phase"] == "tune"]
    for _, cell in tuned.groupby("cell"):
        got = tuning_figures.best_so_far(cell)
        cell = cell.sort_values("trial_number")
        want, best = [], np.nan
        for r, ok, feasible in zip(cell["residual_val"], cell["status"], cell["feasible"]):
            if ok == "ok" and feasible:
                best = abs(r) if np.isnan(best) else min(best, abs(r))
            want.append(best)
        np.testing.assert_allclose(got["best"].to_numpy(float), want)


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
