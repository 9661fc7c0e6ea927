"""Convergence shown: the table's `converged` flag is the documented rule, recomputed here with
plain pandas from the Parquet rows of a small real run (in-process, no Ray)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from conftest import sweep_in_process

from raysweep import results
from raysweep.convergence import best_so_far, convergence
from raysweep.spec import validate


def flag_by_pandas(df: pd.DataFrame) -> dict[tuple, bool]:
    tune = df[(df.phase == "tune") & (df.status == "ok")].sort_values("trial_number")
    confirm = df[(df.phase == "confirm") & (df.status == "ok")]
    out = {}
    for (attack, method, budget), g in tune.groupby(["attack", "method", "budget"]):
        n = len(g)
        head = g.objective.iloc[: n - math.ceil(n / 3)]
        best_row = g.sort_values(["objective", "trial_number"]).iloc[0]
        runs = confirm[
            (confirm.cell == best_row.cell) & (confirm.tuned_trial == best_row.trial_number)
        ]
        noise = runs.objective.std() if len(runs) >= 2 else best_row.resolution
        gain = (head.min() if len(head) else math.inf) - g.objective.min()
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


def _cell(objectives, resolution=0.1, confirm=()) -> pd.DataFrame:
    rows = [
        {"phase": "tune", "status": "ok", "attack": "gaussian", "method": "gd", "budget": 0.1,
         "cell": "gd-b0.1", "trial_number": i, "objective": o, "resolution": resolution,
         "tuned_trial": None}
        for i, o in enumerate(objectives)
    ] + [
        {"phase": "confirm", "status": "ok", "attack": "gaussian", "method": "gd", "budget": 0.1,
         "cell": "gd-b0.1", "trial_number": s, "objective": o, "resolution": resolution,
         "tuned_trial": t}
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
