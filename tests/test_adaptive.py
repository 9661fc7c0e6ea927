"""`trials_per_cell: {min, max}`: every cell observes at least min settings, none more than max,
past min only cells the stopping rule (convergence.STOP_RULE) calls not settled get more, and a
resumed sweep continues the allocation without re-running a trial (searcher.CellSearcher)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_SPEC, sweep_in_process
from ray.tune.search import Searcher

from raysweep.analysis import results
from raysweep.analysis.convergence import convergence, finished, needed, patience_needed
from raysweep.base.storage import open_store
from raysweep.experiment.spec import SpecError, validate
from raysweep.reporting import report
from raysweep.runner import sweep
from raysweep.runner.cluster import record_spec
from raysweep.runner.searcher import (
    STOP_RULE,
    STOP_RULES,
    CellSearcher,
    objective_key,
    open_studies,
    reconcile,
    runs,
)

# ngd is a prefix method: its 0.1 cell leads, its 0.05 cell observes; euk leads each budget.
SPEC = {
    **TINY_SPEC,
    "methods": {
        "ngd": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "sigma2": 1e-6},
        "euk": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "k": 1},
    },
    "trials_per_cell": {"min": 3, "max": 7},
}


def _drive(
    spec,
    store,
    objective,
    parallel: int = 1,
    rule: str = STOP_RULE,
    r_val=None,
    noise=None,
    check=False,
) -> dict[str, list[float]]:
    """Run the searcher on made-up results (`objective(cell, number)`; r on val: the objective
    where feasible, below 10, else `r_val(cell, number)`, default NaN; r's resolution 0.1; the
    objective's own noise `noise`, none reported by default), `parallel` in flight; return each
    cell's objectives in the order told. `check`: after every told run, the searcher's needs,
    updated for the told method only, equal those of a searcher built afresh on all its rows."""
    studies = open_studies(spec, store)
    searcher = CellSearcher(
        spec, studies, reconcile(studies, results.read(store, spec.name)), rule=rule
    )
    told: dict[str, list[float]] = {}
    live, i, finished_ = [], 0, False
    while live or not finished_:
        while len(live) < parallel:
            config = searcher.suggest(f"t{i}")
            if config is None:  # waiting on a run in flight: only legal while one is
                assert live
                break
            if config == Searcher.FINISHED:
                finished_ = True
                break
            live.append((f"t{i}", config))
            i += 1
        if not live:
            continue
        trial_id, config = live.pop(0)
        cells = [(c, n) for c, _, n in config["stops"]] + [(config["cell"], config["number"])]
        result = {objective_key(c): objective(c, n) for c, n in cells}
        result |= {f"resolution@{c}": 0.1 for c, _ in cells}
        result |= {f"objective_noise@{c}": noise for c, _ in cells if noise is not None}
        result |= {f"feasible@{c}": result[objective_key(c)] < 10 for c, _ in cells}
        for c, n in cells:
            value = result[objective_key(c)]
            result[f"r_val@{c}"] = value if value < 10 else (r_val or (lambda c, n: math.nan))(c, n)
        searcher.on_trial_complete(trial_id, result)
        if check:
            fresh = CellSearcher(spec, studies, {}, rows=pd.DataFrame(searcher.rows), rule=rule)
            assert fresh.need == searcher.need
        for c, _ in cells:
            told.setdefault(c, []).append(result[objective_key(c)])
    return told


@pytest.mark.parametrize("rule", STOP_RULES)
@pytest.mark.parametrize("parallel", [1, 3])
def test_min_for_every_cell_and_never_beyond_max(tmp_path, parallel, rule):
    spec = validate(copy.deepcopy(SPEC))
    low, high = spec.trials_range()

    # euk-b0.05 is never feasible (10 + shortfall: no r, so not done however flat: at max);
    # ngd-b0.05, a smaller cell, improves up to its 4th run (index 3), which the table's rule
    # wants in the first two thirds: 6 runs (6 - ceil(6/3) = 4 > 3), patience in the first
    # half: 7 (2 * 3 + 1), and its lead runs on for it; "flat" finds it not flat (its r moved
    # by 3, the noise is 0.1) and wants the first third: 10 (3 * 3 + 1), so max (7). Every other
    # cell returns one value (flat, converged and settled at min).
    def objective(cell, n):
        if cell == "euk-b0.05":
            return 10.5
        if cell == "ngd-b0.05":
            return 5.0 - min(n, low)
        return 1.0

    told = _drive(spec, open_store(str(tmp_path)), objective, parallel, rule, check=True)
    counts = {c: len(v) for c, v in told.items()}
    assert set(counts) == {f"{m}-b{b:g}" for m, b in spec.cells()}
    assert all(low <= n <= high for n in counts.values()), counts
    assert counts["euk-b0.05"] == high
    assert counts["euk-b0.1"] == low
    expected = {"converged": 6, "patience": 7, "flat": 7}[rule]  # none in flight past the answer
    assert counts["ngd-b0.05"] == counts["ngd-b0.1"] == expected


def test_a_plain_int_is_a_fixed_budget(tmp_path):
    spec = validate({**copy.deepcopy(SPEC), "trials_per_cell": 4})
    assert spec.trials_range() == (4, 4)
    told = _drive(spec, open_store(str(tmp_path)), lambda c, n: 1.0)
    assert {len(v) for v in told.values()} == {4}  # converged at 2 already; runs on to 4


def test_needed_agrees_with_the_rule():
    """needed == 0 exactly where convergence() says converged; and `needed` more non-improving
    trials make a cell converged."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        objectives = [rng.choice([1.0, 0.5, 0.3, 0.2, 0.1]) for _ in range(rng.randint(1, 12))]
        rows = pd.DataFrame(
            {"phase": "tune", "status": "ok", "attack": "a", "method": "m", "budget": 0.1,
             "cell": "m-b0.1", "trial_number": range(len(objectives)), "objective": objectives,
             "resolution": 0.15, "tuned_trial": None, "feasible": True}
        )  # fmt: skip
        (row,) = convergence(rows).itertuples()
        assert (row.needed == 0) == row.converged, objectives
        more = objectives + [max(objectives)] * int(row.needed)
        again = rows.iloc[[0] * len(more)].assign(objective=more, trial_number=range(len(more)))
        assert convergence(again)["converged"].item(), (objectives, row.needed)


def test_patience_needed_agrees_with_its_rule():
    """patience_needed == 0 exactly where a cell is converged and its best was set in the first
    half of its trials (written out here from the definition, not from the function); settled
    implies converged; `patience_needed` more non-improving trials settle it, one fewer does not."""
    import math
    import random

    rng = random.Random(1)
    for _ in range(300):
        objectives = [rng.choice([1.0, 0.5, 0.45, 0.2, 0.1]) for _ in range(rng.randint(1, 12))]
        threshold = rng.choice([0.0, 0.06, 0.15, math.nan])
        n, more = len(objectives), patience_needed(objectives, threshold)
        best_at = objectives.index(min(objectives))
        converged = needed(objectives, threshold) == 0
        assert (more == 0) == (converged and best_at < math.ceil(n / 2)), (objectives, threshold)
        assert more >= needed(objectives, threshold)  # stricter: settled => converged
        if math.isinf(more):
            assert math.isnan(threshold)
            continue
        flat = [max(objectives)] * int(more)
        assert patience_needed(objectives + flat, threshold) == 0, (objectives, threshold)
        if more:
            assert patience_needed(objectives + flat[1:], threshold) > 0, (objectives, threshold)


def test_patience_runs_on_where_the_search_still_improves_below_noise(tmp_path):
    """A cell whose best keeps improving, each time by less than the noise (0.1), is converged
    by the table's rule at min; patience gives it trials until its best was set in the first
    half: improvements up to run index 2 -> 5 runs (2 * 2 + 1), within [min, max] = [3, 7]."""
    spec = validate(copy.deepcopy(SPEC))

    def objective(cell, n):
        return 1.0 - 0.01 * min(n, 2) if cell == "euk-b0.1" else 1.0

    for rule, expected in (("converged", 3), ("patience", 5)):
        told = _drive(spec, open_store(str(tmp_path / rule)), objective, 3, rule)
        counts = {c: len(v) for c, v in told.items()}
        assert counts.pop("euk-b0.1") == expected, (rule, told["euk-b0.1"])
        assert set(counts.values()) == {3}, counts  # the flat cells stop at min either way


def test_the_searcher_weighs_an_improvement_against_the_objectives_own_noise(tmp_path):
    """euk's 0.1 cell improves by 0.05 up to run index 2. Against r's resolution (0.1, all a
    row without `objective_noise` has) that is noise: converged at min (3). Against the
    objective's own noise 0.02 (as an Anderson-Darling objective reports it) it is not: the
    improving run must lie in the first two thirds, 5 runs (5 - ceil(5/3) = 3 > 2)."""
    spec = validate(copy.deepcopy(SPEC))

    def objective(cell, n):
        return 1.0 - 0.05 * min(n, 2) if cell == "euk-b0.1" else 1.0

    for noise, expected in ((None, 3), (0.02, 5)):
        told = _drive(spec, open_store(str(tmp_path / str(noise))), objective, 1, "converged",
                      noise=noise)  # fmt: skip
        assert len(told["euk-b0.1"]) == expected, noise


def test_the_searcher_resumes_on_rows_written_before_objective_noise(tmp_path):
    """An experiment's rows from before the column existed: the searcher reads them (the rule
    falls back to `resolution`) and needs what it needs of the same rows with the column NaN."""
    spec = validate(copy.deepcopy(SPEC))
    row = {"phase": "tune", "status": "ok", "attack": "gaussian", "method": "euk", "budget": 0.1,
           "cell": "euk-b0.1", "trial_number": 0, "objective": 0.5, "residual_val": 0.5,
           "resolution": 0.1, "tuned_trial": None, "feasible": True}  # fmt: skip
    old = pd.DataFrame([row | {"trial_number": i} for i in range(3)])
    studies = open_studies(spec, open_store(str(tmp_path)))
    searcher = CellSearcher(spec, studies, {}, rows=old)
    nan = CellSearcher(spec, studies, {}, rows=old.assign(objective_noise=math.nan))
    assert searcher.need == nan.need and searcher.need["euk-b0.1"] == 0


def test_flat_stops_a_flat_cell_at_min_and_holds_one_whose_setting_mattered(tmp_path):
    """Each 0.1 cell improves up to run index 2, each time by less than the noise (0.1); each
    0.05 cell returns 1.0. euk's 0.1 cell reads r within noise of its best in every run: flat,
    so "flat" stops it when converged (min, 3) where patience wants 5 (2 * 2 + 1). ngd's 0.1
    cell had one run (index 1) that cost too much accuracy but read r = 0.2 on val, 0.78 from
    the best: its setting mattered, so "flat" holds the lead (and the 0.05 cell it serves) until
    the best lies in the first third: 7 (3 * 2 + 1), here max."""
    spec = validate(copy.deepcopy(SPEC))

    def objective(cell, n):
        if cell.endswith("b0.05"):
            return 1.0
        return 10.5 if (cell, n) == ("ngd-b0.1", 1) else 1.0 - 0.01 * min(n, 2)

    def r_val(cell, n):
        return 0.2

    for rule, euk, ngd in (("patience", 5, 5), ("flat", 3, 7)):  # euk: its 0.1 cell
        told = _drive(spec, open_store(str(tmp_path / rule)), objective, 1, rule, r_val)
        counts = {c: len(v) for c, v in told.items()}
        expected = {"euk-b0.05": 3, "euk-b0.1": euk, "ngd-b0.05": ngd, "ngd-b0.1": ngd}
        assert counts == expected, rule


def test_flat_reads_every_trial_against_the_best():
    """convergence()'s `flat`: every trial's |r_val|, feasible or not, within the threshold of
    the best's; a trial that read r far off, even an infeasible one, makes the cell not flat; an
    infeasible best (a penalty, no r) is never flat."""

    def rows(objectives, r_val, feasible):
        return pd.DataFrame(
            {"phase": "tune", "status": "ok", "attack": "a", "method": "m", "budget": 0.1,
             "cell": "m-b0.1", "trial_number": range(len(objectives)), "objective": objectives,
             "residual_val": r_val, "resolution": 0.15, "tuned_trial": None,
             "feasible": feasible}
        )  # fmt: skip

    def flat(*args):
        return bool(convergence(rows(*args))["flat"].item())

    assert flat([1.0, 0.9, 0.95], [1.0, -0.9, 0.95], True)  # sign aside: |r| is what counts
    assert not flat([1.0, 0.8, 0.95], [1.0, 0.8, 0.95], True)  # 0.95 - 0.8 > 0.15
    assert not flat([0.9, 10.5, 0.95], [0.9, 0.1, 0.95], [True, False, True])  # removed, at a cost
    assert not flat([0.9, 10.5, 0.95], [0.9, 2.0, 0.95], [True, False, True])  # or made worse
    assert flat([0.9, 10.5, 0.95], [0.9, 0.8, 0.95], [True, False, True])
    assert not flat([10.5, 10.4], [1.0, 1.0], False)  # no feasible best: nothing to call flat


def test_finished_holds_a_cell_without_a_feasible_row_as_the_searcher_does():
    """A cell whose trials are all infeasible is flat (converged by the rule) but not done
    before max: the searcher gives it more trials, so `finished` (which decides whether a
    re-run of the same spec has anything left to do) must not call the sweep complete."""
    low, high = 3, 7

    def rows(objectives, feasible):
        return pd.DataFrame(
            {"phase": "tune", "status": "ok", "attack": "a", "method": "m", "budget": 0.1,
             "cell": "m-b0.1", "trial_number": range(len(objectives)), "objective": objectives,
             "resolution": 0.15, "tuned_trial": None, "feasible": feasible}
        )  # fmt: skip

    infeasible = rows([10.5] * 4, False)
    assert convergence(infeasible)["needed"].item() == 0  # flat: the rule alone would stop it
    assert not finished(infeasible, [("m", 0.1)], low, high)
    assert finished(rows([10.5] * high, False), [("m", 0.1)], low, high)  # at max
    assert finished(rows([0.4] * 4, True), [("m", 0.1)], low, high)  # settled, feasible


def test_spec_refuses_a_bad_range():
    for bad in ({"min": 5, "max": 4}, {"min": 0, "max": 4}, {"min": 2}, {"low": 1, "max": 2}):
        with pytest.raises(SpecError, match="trials_per_cell"):
            validate({**copy.deepcopy(TINY_SPEC), "trials_per_cell": bad})


def test_resume_continues_the_allocation_without_repeating_a_trial(tmp_path):
    """A driver that dies mid-sweep (a run asked, never told), then a resume: every run recorded
    before is kept, none re-run; the sweep ends where an uninterrupted one ends (each cell at
    least min, at most max, converged or at max by the tuning rows)."""
    spec = validate({**copy.deepcopy(TINY_SPEC), "trials_per_cell": {"min": 2, "max": 4}})
    low, high = spec.trials_range()
    store = open_store(str(tmp_path))
    studies = open_studies(spec, store)
    searcher = CellSearcher(spec, studies, reconcile(studies, results.read(store, spec.name)))
    for i in range(3):
        config = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", sweep.reported(sweep.execute(spec, store, config)))
    searcher.suggest("dies")  # asked, never run: the resume marks it failed and re-plans it
    before = pd.read_parquet(f"{tmp_path}/{spec.name}/results")
    df = sweep_in_process(spec, str(tmp_path))
    tuned = df[df["phase"] == "tune"]
    assert not tuned.duplicated(["cell", "trial_number"]).any()
    kept = tuned.merge(before[["cell", "trial_number", "finished_at"]], on=["cell", "trial_number"])
    assert len(kept) == len(before) and (kept["finished_at_x"] == kept["finished_at_y"]).all()
    counts = tuned.groupby("cell").size()
    assert len(counts) == len(spec.cells()) and counts.between(low, high).all(), counts
    for cells in runs(spec).values():  # a lead's cells observe the same runs
        assert counts[[c for c, _ in cells]].nunique() == 1
    assert finished(tuned, spec.cells(), low, high)  # by the tuning rows: converged or at max
    # Confirm rows can re-open a cell (their std is its noise, convergence.py): another resume
    # tunes it on, still within max and without repeating a trial.
    again = sweep_in_process(spec, str(tmp_path))
    tuned = again[again["phase"] == "tune"]
    assert not tuned.duplicated(["cell", "trial_number"]).any()
    assert tuned.groupby("cell").size().between(low, high).all()
    # The report's table says why each cell stopped (the range from the run's spec.json); a
    # table without a range has no such column.
    record_spec(spec, store)
    md, _ = report.write(f"{tmp_path}/{spec.name}", str(tmp_path / "report"))
    lines = [line.split(" | ") for line in md.splitlines() if line.startswith("| gaussian |")]
    header = next(line for line in md.splitlines() if line.startswith("| attack |")).split(" | ")
    stopped = [line[header.index("stopped")] for line in lines if line[2]]  # cells, not references
    assert len(stopped) == len(spec.cells()) and set(stopped) <= {
        "converged",
        "converged, flat",
        "at max",
    }, stopped
    assert " stopped " not in report.markdown_table(results.table(again))


@pytest.mark.integration
def test_ray_sweep_ends_when_every_cell_is_done_and_confirms(local_ray, tmp_path):
    """Through Ray Tune: the searcher's FINISHED ends the Tuner before `num_samples` (each
    lead's max), confirm runs, and the table says how each cell stopped."""
    from raysweep.analysis import results

    raw = {**copy.deepcopy(TINY_SPEC), "trials_per_cell": {"min": 2, "max": 5}}
    spec = validate(raw | {"confirm": {"seeds": [1, 2]}})
    low, high = spec.trials_range()
    df = sweep.run(spec, str(tmp_path))
    tuned = df[df["phase"] == "tune"]
    counts = tuned.groupby("cell").size()
    assert counts.between(low, high).all() and len(counts) == len(spec.cells())
    assert not tuned.duplicated(["cell", "trial_number"]).any()
    table = results.table(df, high)
    cells = table[table["source"] != "reference"]
    assert set(cells["stopped"]) <= {"converged", "converged, flat", "at max"}, cells[
        ["cell", "stopped"]
    ]
    assert ((cells["stopped"] == "at max") == (cells["trials"] >= high)).all()
    assert (df["phase"] == "confirm").any()


def test_the_adaptive_bench_counts_the_seeds_a_rule_stopped_a_lead_before_hindsight(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))  # bench/, beside tests/
    from bench.adaptive import stops_against_hindsight

    def rows(runs: dict[str, int]) -> pd.DataFrame:
        return pd.DataFrame([{"lead": k, "run": i} for k, n in runs.items() for i in range(n)])

    reps = [
        {"variants": {("flat", 8): rows({"a": 8, "b": 20}), ("hindsight", 8): rows({"a": 8, "b": 12})}},
        {"variants": {("flat", 8): rows({"a": 8, "b": 9}), ("hindsight", 8): rows({"a": 10, "b": 30})}},
    ]  # fmt: skip
    lines = stops_against_hindsight(reps, ("flat", 8)).splitlines()
    assert lines[0] == "runs per lead, mean over 2 seeds:"
    assert lines[-2].split() == ["a", "8.0", "9.0", "1"]  # stopped earlier on seed 2 only
    assert lines[-1].split() == ["b", "14.5", "21.0", "1"]
