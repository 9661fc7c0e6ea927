"""The relearning probe (relearn.py): its own control, and that it leaves the measured row alone.

The control (issue 24's acceptance): a second retrained model (its own initialisation, the same
clean data) probed against the retrain reference gives a gap whose interval covers 0; the
poisoned model probed against it gives one that excludes 0. On the tiny spec with 150 poisons
(seeds 0-2, one thread), measured: retrain-vs-retrain gaps -0.054 .. 0.036 with every interval
inside [-0.17, 0.16]; poisoned-vs-retrain gaps 0.74 .. 0.91 with lower ends 0.62 .. 0.75.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import TINY_SPEC

from raysweep.base.storage import open_store
from raysweep.experiment import relearn, trial
from raysweep.experiment.spec import validate
from raysweep.science.train import train

# 150 poisons, as the quickstart has: 135 scored by the poisons probe, enough to resolve a gap.
SPEC = {**copy.deepcopy(TINY_SPEC), "attack": {"name": "gaussian", "n": 150, "eps": 2.0}}


@pytest.fixture(scope="module")
def spec_and_store(tmp_path_factory):
    return validate(SPEC, "<test>"), open_store(str(tmp_path_factory.mktemp("relearn")))


def _setup(spec, store, seed):
    return trial.prepare(json.dumps(spec.raw, sort_keys=True), store.uri, seed)


def second_retrain(spec, setup, seed) -> torch.nn.Module:
    """Another retrain model: the same clean rows, its own initialisation and batch order."""
    init = trial.rng(seed, "retrain2", "init")
    model = trial.build_model(spec, setup.split, init, setup.poisoned).to(trial.device())
    rows = setup.poisoned.without_poisons()
    return train(model, *rows, trial.rng(seed, "retrain2"), **spec.train.kwargs())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_control_retrain_covers_zero_and_poisoned_excludes_it(spec_and_store, seed):
    spec, store = spec_and_store
    setup = _setup(spec, store, seed)
    assert setup.attack_ok
    reference = trial.retrain_relearned(json.dumps(spec.raw, sort_keys=True), store.uri, seed)
    poisoned = trial._loaded(spec, setup.split, setup.poisoned, setup.poisoned_state)
    for name, model, covers in (
        ("retrain2", second_retrain(spec, setup, seed), True),
        ("poisoned", poisoned, False),
    ):
        cols = relearn.gaps(
            trial.probed(spec, setup, model, seed), reference, torch.Generator().manual_seed(0)
        )
        for probe in relearn.PROBES:
            g, lo, hi = (cols[f"relearn_gap_{probe}{s}"] for s in ("", "_lo", "_hi"))
            assert lo <= g <= hi, (name, probe, cols)
            if covers:  # measured: |gap| <= 0.054, both ends >= 0.058 from 0
                assert lo < 0 < hi and abs(g) < 0.1, (name, probe, cols)
            else:  # measured: lower ends 0.62 .. 0.75
                assert lo > 0.4, (name, probe, cols)


def test_probe_sets_use_a_tenth_of_the_poisons_and_score_the_rest(spec_and_store):
    spec, store = spec_and_store
    setup = _setup(spec, store, 0)
    sets, held = relearn.probe_sets(setup.probe, torch.Generator().manual_seed(3))
    n = len(setup.poisoned.poison_idx)
    x, y = sets["poisons"]
    assert len(y) == round(relearn.RELEARN_SHARE * n) == n - int(held.sum())
    # the used rows are poisoned rows as trained on: their inputs carry the noise
    used = setup.poisoned.poison_idx[~held.to(setup.poisoned.poison_idx.device)]
    assert torch.equal(x, setup.poisoned.x[used]) and torch.equal(y, setup.poisoned.y[used])
    assert sets["retain"] is setup.probe.retain


def test_fine_tune_spends_its_cap_and_leaves_the_model_and_rng_alone(spec_and_store):
    spec, store = spec_and_store
    setup = _setup(spec, store, 0)
    model = trial._loaded(spec, setup.split, setup.poisoned, setup.poisoned_state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seen = []
    original = relearn.descend
    try:  # count the rows the probe trains on: at most its cap of 1-unit rows
        relearn.descend = lambda m, opt, batches: original(
            m, opt, (seen.append(len(b[1])) or b for b in batches)
        )
        tuned = relearn.fine_tuned(
            model, setup.probe.retain, 200.0, torch.Generator().manual_seed(0), "fp32"
        )
    finally:
        relearn.descend = original
    assert sum(seen) == 200
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, tuned.state_dict()[k]) for k, v in before.items())


def test_the_probe_adds_columns_only(spec_and_store):
    """A confirm row with the probe equals the row without it, bit for bit, in every column the
    row had (wall_s aside); the probe's own columns are reproducible."""
    spec, store = spec_and_store
    runs = [
        trial.run_trial(spec, store, "gd", 0.1, {"lr": 0.01}, 0, lambda r: None, 1, relearn=r)
        for r in (False, True, True)
    ]
    plain, probed, again = runs
    new = set(probed) - set(plain)
    assert new == {c for c in probed if c.startswith("relearn_")}
    for k, v in plain.items():
        if k != "wall_s":
            assert repr(probed[k]) == repr(v), k
    for k in new - {"relearn_wall_s"}:
        assert repr(probed[k]) == repr(again[k]), k
    assert all(math.isfinite(probed[k]) for k in new)
    assert probed["relearn_budget"] == relearn.RELEARN_BUDGET


def test_confirm_rows_carry_the_probe_and_tuning_rows_do_not(finished_run):
    import pandas as pd

    df = pd.read_parquet(f"{finished_run}/results")
    ok = df[df["status"] == "ok"]
    confirm, tune = ok[ok["phase"] == "confirm"], ok[ok["phase"] == "tune"]
    assert len(confirm) and confirm["relearn_gap_retain"].notna().all()
    assert confirm["relearn_gap_poisons_lo"].notna().all()
    assert tune["relearn_gap_retain"].isna().all()


def test_table_counts_the_runs_that_relearn_faster(finished_run):
    import pandas as pd

    from raysweep.analysis import results

    df = pd.read_parquet(f"{finished_run}/results")
    table = results.table(df)
    for best, runs, source in results.chosen(df):
        got = table[(table["method"] == best["method"]) & (table["budget"] == best["budget"])]
        for probe in relearn.PROBES:
            col = f"relearn_gap_{probe}"
            assert got[col].iloc[0] == pytest.approx(runs[col].mean(), nan_ok=True)
            if source == "confirm":
                want = int((runs[f"{col}_lo"] > 0).sum())
                assert got[f"relearn_faster_{probe}"].iloc[0] == want
    # rows written before the probe existed read as no probe, not as an error
    old = df.drop(columns=[c for c in df if c.startswith("relearn_")])
    assert results.table(old)["relearn_gap_retain"].isna().all()
