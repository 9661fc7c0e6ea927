"""Retrain oracles (confirm: {oracles: K}; issue 24 part 2): a model trained like the oracles passes
their tests at about the nominal rate or less, the poisoned model is flagged, the oracles are
shared out among processes, and a spec without the key keeps its rows."""

from __future__ import annotations

import copy
import json
import threading
import time

import pandas as pd
import pytest
from conftest import TINY_SPEC, sweep_in_process
from torch import nn

from raysweep.analysis import results
from raysweep.base.storage import open_store
from raysweep.experiment import checkpoints, trial
from raysweep.experiment.metrics import (
    effect_units,
    margins,
    oracle_band,
    oracle_test,
    paired_residual,
)
from raysweep.experiment.spec import SpecError, load, validate
from raysweep.reporting import report

# 19 reference oracles: the least p they allow is 1 / 20, so the test can reject at 0.05. Six
# more models trained the same way (5 held-out oracles and the retrain reference) are judged
# against those 19 on each of five confirm seeds: 30 judgments of models the null holds for.
K, HELD, SEEDS, ALPHA = 19, 5, (1, 2, 3, 4, 5), 0.05


def shrunk(path: str) -> dict:
    """A quickstart spec at test size: the MLP for its small CNN, 8 epochs for 20 (an oracle
    trains in a fraction of a second), K + HELD oracles on five confirm seeds."""
    raw = copy.deepcopy(load(path).raw)
    raw["model"] = {"name": "mlp", "width": 64, "depth": 1}
    raw["train"] = {**raw["train"], "epochs": 8}
    raw["confirm"] = {"seeds": list(SEEDS), "oracles": K + HELD}
    return raw


def judged(raw: dict, store) -> list[dict]:
    """Per confirm seed: the held-out oracles' and the retrain reference's tests against the first
    K oracles, the poisoned model's, each one's r, and the K oracles' band of r."""
    spec = validate(raw)
    attack, out = spec.attack["name"], []
    for seed in SEEDS:
        setup = trial.prepare(json.dumps(spec.raw, sort_keys=True), store.uri, seed)
        ref = setup.oracle_margins[:K]
        states = [
            checkpoints.load(
                store,
                checkpoints.key_of(
                    trial.checkpoint_config(spec, setup.split, seed, trial.oracle_role(j))
                ),
            )
            for j in range(K + HELD)
        ]
        models = [trial._loaded(spec, setup.split, setup.poisoned, s) for s in states]
        units = [effect_units(m, setup.probe, attack)["test"].double().cpu() for m in models]
        before, retrain = setup.before_units["test"], setup.retrain_units["test"]
        retrain_model = trial._loaded(spec, setup.split, setup.poisoned, setup.retrain_state)
        poisoned_model = trial._loaded(spec, setup.split, setup.poisoned, setup.poisoned_state)
        held = [setup.oracle_margins[K + i] for i in range(HELD)]
        held.append(margins(retrain_model, setup.probe, attack))
        out.append(
            {
                "null": [oracle_test(m, ref) for m in held],
                # the held-out oracles' r (the retrain reference's is 0 by definition of r)
                "null_r": [paired_residual(before, u, retrain) for u in units[K:]],
                "band": oracle_band(before, units[:K], retrain),
                "poisoned": oracle_test(margins(poisoned_model, setup.probe, attack), ref),
            }
        )
    return out


@pytest.mark.parametrize("attack", ["backdoor", "label_flip"])
def test_oracles_pass_their_own_test_and_flag_the_poisoned_model(attack, tmp_path):
    results = judged(shrunk(f"search_spaces/quickstart_{attack}.yaml"), open_store(str(tmp_path)))
    null = [t for seed in results for t in seed["null"]]
    rejected = sum(t["oracle_p"] <= ALPHA for t in null)
    # p is exact under exchangeability, P(p <= 0.05) <= 0.05: 1.5 of 30 expected, dependent
    # within a seed (one reference set): allow 4.
    assert rejected <= 4, [t["oracle_p"] for t in null]
    # uniform on {1/20, ..., 1}: mean 0.525; a broken test piles p at the bottom
    assert sum(t["oracle_p"] for t in null) / len(null) > 0.35
    # Their share outside the oracles' range: 2 / 20 expected per unit, more for a model that is
    # more or less confident throughout (which is why p is a permutation p, not a binomial one).
    assert max(t["oracle_outside"] for t in null) < 0.5
    for seed in results:
        poisoned = seed["poisoned"]
        # the poisoned model is the most extreme of the 20 on every seed: p = 1 / (K + 1)
        assert poisoned["oracle_p"] == pytest.approx(1 / (K + 1))
        assert poisoned["oracle_outside"] > 0.8  # measured 0.91-1.0 (backdoor, label_flip)
        assert poisoned["oracle_outside"] > 2 * max(t["oracle_outside"] for t in seed["null"])
    if attack == "backdoor":  # r resolves here (label_flip's r does not at this size, see below)
        inside = [
            seed["band"][0] <= r <= seed["band"][1] for seed in results for r in seed["null_r"]
        ]
        # a held-out oracle lands inside 19 oracles' [min, max] with probability 18 / 20
        assert sum(inside) >= len(inside) - 5, results
        assert all(seed["band"][1] < 0.2 for seed in results)  # r = 1 for the poisoned model


def test_ensure_each_shares_the_trainings_out():
    """Three threads ask for the same three checkpoints at once: each key is trained once, and by
    more than one thread (with one lock per key taken in order, the first would train all three
    while the others waited)."""
    import tempfile

    store = open_store(tempfile.mkdtemp())
    trainers: dict[int, str] = {}
    configs = [{"role": "oracle", "j": j} for j in range(3)]

    def build(j: int):
        def make():
            trainers[j] = threading.current_thread().name
            time.sleep(0.5)  # the others reach this key's lock while it is held
            return nn.Linear(2, 2)

        return make

    threads = [
        threading.Thread(
            target=checkpoints.ensure_each,
            args=(store, [(c, build(c["j"])) for c in configs]),
            name=f"t{i}",
        )
        for i in range(3)
    ]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    keys = [checkpoints.key_of(c) for c in configs]
    assert all(checkpoints.train_count(store, k) == 1 for k in keys)
    assert len(set(trainers.values())) == 3, trainers


def test_oracle_rows_and_the_default_rows(tmp_path):
    """Oracles add their columns to confirm rows and change nothing else in any row; without the
    key every oracle column is null."""
    base = {**TINY_SPEC, "attack": {"name": "backdoor", "n": 40, "y_adv": 0, "patch": 3}}
    base |= {"budgets": [0.1], "trials_per_cell": 1, "confirm": {"seeds": [1]}}
    plain = sweep_in_process(validate(copy.deepcopy(base)), str(tmp_path / "plain"))
    with_k = {**base, "confirm": {"seeds": [1], "oracles": 3}}
    oracled = sweep_in_process(validate(copy.deepcopy(with_k)), str(tmp_path / "oracles"))
    oracle_cols = [c for c in oracled.columns if "oracle" in c]
    assert len(oracle_cols) == 9 and plain[oracle_cols].isna().all().all()
    confirm = oracled[oracled["phase"] == "confirm"]
    assert (confirm["oracles"] == 3).all() and oracled.loc[
        oracled["phase"] == "tune", "oracles"
    ].isna().all()
    assert (confirm["before_oracle_p"] == 1 / 4).all()  # the poisoned model: the most extreme
    table = results.table(oracled).set_index("method")
    assert table.loc["poisoned", "oracle_extreme"] == 1 == table.loc["poisoned", "oracle_judged"]
    assert table.loc["poisoned", "oracle_inside"] == 0  # r = 1, far above the oracles' band
    assert "K = 3: r in band" in report.markdown_table(results.table(oracled))
    assert results.table(plain)["oracles"].isna().all()
    assert "against retrain oracles" not in report.markdown_table(results.table(plain))
    varying = {"spec_hash", "wall_s", "started_at", "finished_at", "relearn_wall_s", "versions"}
    same = [c for c in plain.columns if c not in varying and c not in oracle_cols]
    key = ["phase", "cell", "trial_number"]
    a, b = (df.sort_values(key)[same].reset_index(drop=True) for df in (plain, oracled))
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_oracles_key_is_checked():
    raw = {**TINY_SPEC, "confirm": {"seeds": [1], "oracles": 1}}
    with pytest.raises(SpecError, match=r"confirm.oracles: 1 .*allowed"):
        validate(copy.deepcopy(raw), "s.yaml")
    raw["confirm"] = {"seeds": [1], "oracle": 3}
    with pytest.raises(SpecError, match="did you mean 'oracles'"):
        validate(copy.deepcopy(raw), "s.yaml")
    assert "oracles" not in validate(copy.deepcopy(TINY_SPEC)).raw["confirm"]  # none written
