"""Convergence shown: the table's `converged` flag is the documented rule, recomputed here with
plain pandas from the Parquet rows of a small real run (in-process, no Ray) and of issue 28's two
cases. And what a row may claim: r unresolved where the seed's attack failed, every reason a
row is infeasible."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from conftest import sweep_in_process

from raysweep.analysis import results
from raysweep.analysis.convergence import best_so_far, convergence
from raysweep.experiment.spec import validate
from raysweep.experiment.trial import infeasible_reason
from raysweep.reporting import report


def flag_by_pandas(df: pd.DataFrame) -> dict[tuple, bool]:
    """README's rule in plain pandas: a cell's best is chosen among its method's rows at or below
    its budget, trial i is every such cell's i-th, the noise is the std over feasible confirm
    runs of the chosen setting (two or more), else the chosen row's objective_noise (its
    resolution in rows without one)."""
    tune = df[(df.phase == "tune") & (df.status == "ok")].sort_values("trial_number")
    confirm = df[(df.phase == "confirm") & (df.status == "ok") & df.feasible.astype(bool)]
    out = {}
    for attack, method, budget in tune.groupby(["attack", "method", "budget"]).groups:
        rows = tune[(tune.attack == attack) & (tune.method == method) & (tune.budget <= budget)]
        step = rows.groupby("budget").cumcount()
        by_step = rows.objective.groupby(step).min().sort_index()
        n = len(by_step)
        head = by_step.iloc[: n - math.ceil(n / 3)]
        chosen = rows.sort_values(["objective", "budget", "trial_number"]).iloc[0]
        runs = confirm[(confirm.cell == chosen.cell) & (confirm.tuned_trial == chosen.trial_number)]
        own = chosen.get("objective_noise", math.nan)  # else written before it existed
        noise = (
            runs.objective.std() if len(runs) >= 2 else own if pd.notna(own) else chosen.resolution
        )
        gain = (head.min() if len(head) else math.inf) - by_step.min()
        out[(attack, method, budget)] = bool(gain <= noise)
    return out


def test_table_flag_equals_the_rule_recomputed_from_parquet(tiny_spec_dict, tmp_path):
    spec = validate({**tiny_spec_dict, "trials_per_cell": 4, "confirm": {"seeds": [1, 2]}})
    sweep_in_process(spec, str(tmp_path))
    df = pd.read_parquet(f"{tmp_path}/{spec.name}/results")  # plain pandas, not results.read
    assert (df.status == "ok").all()
    table = results.table(df)
    cells = table[table.source != "reference"]
    got = {(r.attack, r.method, r.budget): bool(r.converged) for r in cells.itertuples()}
    assert got == flag_by_pandas(df) and len(got) == len(spec.cells())
    curves = best_so_far(df)
    assert (curves.groupby(["method", "budget"]).size() == 4).all()
    assert (curves.groupby(["method", "budget"])["best_so_far"].diff().dropna() <= 0).all()


def _cell(objectives, resolution=0.1, confirm=(), method="gd", budget=0.1) -> pd.DataFrame:
    cell = f"{method}-b{budget:g}"
    rows = [
        {"phase": "tune", "status": "ok", "attack": "gaussian", "method": method, "budget": budget,
         "cell": cell, "trial_number": i, "objective": o, "resolution": resolution,
         "tuned_trial": None, "feasible": o < 10}
        for i, o in enumerate(objectives)
    ] + [
        {"phase": "confirm", "status": "ok", "attack": "gaussian", "method": method,
         "budget": budget, "cell": cell, "trial_number": s, "objective": o,
         "resolution": resolution, "tuned_trial": t, "feasible": o < 10}
        for s, (t, o) in enumerate(confirm)
    ]  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    "objectives, confirm, converged",
    [
        ([0.9, 0.5, 0.45, 0.8, 0.7, 0.44], (), True),  # last third gained 0.01 < resolution 0.1
        ([0.9, 0.5, 0.45, 0.8, 0.7, 0.2], (), False),  # gained 0.25 > 0.1
        ([0.9, 0.5, 0.45, 0.8, 0.7, 0.2], [(5, 0.1), (5, 0.6)], True),  # confirm std 0.35
        ([0.9, 0.5, 0.45, 0.8, 0.7, 0.40], [(5, 0.40), (5, 0.41)], False),  # std 0.007
        ([0.3], (), False),  # nothing before the last third
        ([10.2, 10.1, 0.9], (), False),  # first feasible in the last third
    ],
)
def test_rule(objectives, confirm, converged):
    (flag,) = convergence(_cell(objectives, confirm=confirm))["converged"]
    assert flag is converged


def _both_cases(tmp_path) -> pd.DataFrame:
    """Issue 28's two cases, written to Parquet and read back as plain pandas.

    bad_teacher: its 5 % cell improves late (0.5 -> 0.15, resolution 0.1), its 10 % cell alone
    does not (0.5 throughout), but the 10 % cell's best is the 5 % row, so it is not converged.
    euk: the last third gains 0.25; its chosen setting's confirm runs are 0.20, 0.25 and one
    infeasible (10.3): with the infeasible one the std is 5.8 (converged), feasible only 0.035.
    """
    df = pd.concat(
        [
            _cell([0.9, 0.8, 0.7, 0.6, 0.5, 0.15], method="bad_teacher", budget=0.05),
            _cell([0.9, 0.85, 0.5, 0.6, 0.55, 0.52], method="bad_teacher", budget=0.1),
            _cell(
                [0.9, 0.5, 0.45, 0.8, 0.7, 0.2],
                confirm=[(5, 0.2), (5, 0.25), (5, 10.3)],
                method="euk",
            ),
        ],  # fmt: skip
        ignore_index=True,
    )
    df.to_parquet(tmp_path / "rows.parquet")
    return pd.read_parquet(tmp_path / "rows.parquet")


def test_a_cell_chosen_from_a_smaller_budget_and_feasible_noise_only(tmp_path):
    df = _both_cases(tmp_path)
    table = convergence(df).set_index(["method", "budget"])
    flags = {key: bool(v) for key, v in table["converged"].items()}
    expected = {("bad_teacher", 0.05): False, ("bad_teacher", 0.1): False, ("euk", 0.1): False}
    assert flags == expected
    assert flags == {(m, b): v for (_, m, b), v in flag_by_pandas(df).items()}
    assert table.loc[("euk", 0.1), "threshold"] == pytest.approx(0.05 / 2**0.5)
    # Each case turns on the rule's new reading: the 10 % cell alone is converged, and with the
    # infeasible confirm run's objective in the std, euk is too.
    alone = df[(df.method == "bad_teacher") & (df.budget == 0.1)]
    assert convergence(alone)["converged"].item()
    penalised = df.assign(feasible=True)[df.method == "euk"]
    assert convergence(penalised)["converged"].item()


def test_an_attack_that_fails_on_the_tuning_seed_leaves_r_unresolved(tiny_spec_dict, tmp_path):
    """An unseen spec: noise far too faint to be memorised (eps 0.01), so seed 0's attack fails.
    Every row's interval is then no narrower than the seed's resolution, the table says
    "unresolved" in every cell, and a warning names the tuning seed."""
    attack = {**tiny_spec_dict["attack"], "eps": 0.01}
    spec = validate({**tiny_spec_dict, "name": "faint", "attack": attack})
    sweep_in_process(spec, str(tmp_path))
    df = pd.read_parquet(f"{tmp_path}/{spec.name}/results")
    assert (df.status == "ok").all() and not df.attack_ok.any()  # the premise: it failed
    half = (df.residual_hi - df.residual_lo) / 2
    floor = df.resolution * df.residual.abs().clip(lower=1.0)
    assert (half >= floor - 1e-9).all(), df[
        ["residual", "residual_lo", "residual_hi", "resolution"]
    ]
    table = results.table(df)
    lines = report.markdown_table(table).splitlines()
    cells = [line for line in lines if line.startswith(("| gaussian | gd |", "| gaussian | ga |"))]
    assert len(cells) == len(spec.cells()) and all("| unresolved" in c for c in cells), cells
    warned = [w for w in lines if w.startswith("warning: gaussian: the attack failed on tuning")]
    assert len(warned) == 1 and "tuning seed 0 " in warned[0], lines


def test_infeasible_reason_lists_every_reason_that_applies(tiny_spec_dict):
    """A row that lost accuracy and whose poison scores are mostly degenerate names both."""
    spec = validate(tiny_spec_dict)  # delta 0.05; MAX_DEGENERATE of 30 poisons
    retrain = {"clean_acc_val": 0.95}
    both = {"clean_acc_val": 0.80, "gus_degenerate": 29.0}
    reason = infeasible_reason(spec, retrain, both, 30, "val")
    assert "clean_acc_val 0.800 < retrain's 0.950" in reason and "29 of 30 poison" in reason
    assert reason.count("; ") == 1
    only_degenerate = infeasible_reason(spec, retrain, both | {"clean_acc_val": 0.95}, 30, "val")
    assert only_degenerate.startswith("29 of 30") and "; " not in only_degenerate
    assert infeasible_reason(spec, retrain, {"clean_acc_val": 0.95}, 30, "val") is None


def test_a_non_r_objective_is_judged_in_its_own_units_and_flat_in_r():
    """Under the Anderson-Darling objective (values ~0.01-0.6) an improvement is weighed against
    the objective's own noise (`objective_noise`), not r's resolution; flat reads r against r's
    noise whatever the objective. Last third gains 0.05: more than the AD noise 0.02, less than
    r's resolution 0.1 (which the old rule used, calling the cell converged)."""
    df = _cell([0.6, 0.3, 0.32, 0.35, 0.31, 0.25]).assign(objective_noise=0.02)
    df["residual_val"] = [0.9, 0.5, 0.52, 0.55, 0.51, 0.45]  # r moved: not flat
    (row,) = convergence(df).to_dict("records")
    assert row["threshold"] == 0.02 and row["r_threshold"] == 0.1
    assert not row["converged"] and not row["flat"]
    assert convergence(df.drop(columns="objective_noise"))["converged"].item()  # older rows
    still = df.assign(residual_val=[0.95, 0.9, 0.92, 0.93, 0.91, 0.9])  # r within 0.1
    assert convergence(still)["flat"].item()
    # With confirm runs, each threshold is the std of its own quantity over them.
    confirm = pd.DataFrame([{**df.iloc[-1].to_dict(), "phase": "confirm", "trial_number": s,
                             "tuned_trial": 5, "objective": o, "residual_val": r}
                            for s, (o, r) in enumerate([(0.25, 0.45), (0.35, 0.85)])])  # fmt: skip
    (row,) = convergence(pd.concat([df, confirm], ignore_index=True)).to_dict("records")
    assert row["threshold"] == pytest.approx(0.1 / 2**0.5)
    assert row["r_threshold"] == pytest.approx(0.4 / 2**0.5)
