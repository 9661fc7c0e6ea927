"""An attack is one record (poisoning/records.py): a toy attack registered in one place, its
crafting function beside it, is picked up by every consumer: spec validation, crafting, the
effect and its margins, attack_ok, the stored scores, preflight's draw limits, the report's
attack check."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import TINY_SPEC, sweep_in_process

from raysweep.analysis import results
from raysweep.base.domains import PosInt
from raysweep.experiment.spec import SpecError, validate
from raysweep.poisoning.attacks import ATTACKS
from raysweep.poisoning.poisoned import Poisoned
from raysweep.poisoning.records import RECORDS, Attack, gap
from raysweep.reporting import figures, report
from raysweep.runner import preflight
from raysweep.science.data import Split, digits
from raysweep.science.stats import MAX_RESOLUTION


def shifted_labels(split: Split, generator: torch.Generator, *, n: PosInt = 40) -> Poisoned:
    """A label-flip variant: n random train rows get the next class, (y + 1) mod classes."""
    if not 0 < n <= len(split.y_train):
        raise ValueError(f"shifted_labels: n={n} must be in 1..{len(split.y_train)}")
    idx = torch.randperm(len(split.y_train), generator=generator)[:n].sort().values
    y = split.y_train.clone()
    y[idx] = (y[idx] + 1) % split.num_classes
    return Poisoned(split.x_train.clone(), y, idx)


GAP = 0.03
TOY = Attack(f"{__name__}:shifted_labels", "rows", gap(GAP), {"n": "train"})


@pytest.fixture
def toy(monkeypatch):
    """The toy attack registered: one line, as a new attack's would be in RECORDS."""
    monkeypatch.setitem(RECORDS, "shifted_labels", TOY)


def _spec(n: int = 40, **more):
    attack = {"name": "shifted_labels", "n": n}
    return validate({**TINY_SPEC, "name": "toy", "attack": attack, **more}, "toy.yaml")


def test_the_toy_is_crafted_and_validated_through_its_record(toy):
    assert ATTACKS["shifted_labels"] is shifted_labels and "shifted_labels" in ATTACKS
    split = digits(size=8)
    p = ATTACKS["shifted_labels"](split, torch.Generator().manual_seed(0), n=25)
    assert len(p.poison_idx) == 25 and (p.y != split.y_train).sum() == 25
    assert _spec().attack == {"name": "shifted_labels", "n": 40}
    with pytest.raises(SpecError, match="attack.n"):  # its signature's domain: PosInt
        _spec(n=0)
    with pytest.raises(SpecError, match="unknown attack 'shifted_labels_2'; allowed: .*shifted_l"):
        validate({**TINY_SPEC, "attack": {"name": "shifted_labels_2"}}, "toy.yaml")


def test_preflight_reads_the_toys_draw_limits(toy):
    split = digits(size=16)
    rows = len(split.y_train)
    assert preflight.draw_limits(split, "shifted_labels") == {"n": (rows, "the train rows")}
    preflight.check_fits(_spec(n=rows))
    with pytest.raises(SpecError, match=rf"attack.n: {rows + 1}; allowed: 1..{rows} \(the"):
        preflight.check_fits(_spec(n=rows + 1))


def test_a_sweep_measures_judges_and_reports_the_toy(toy, tmp_path):
    spec = _spec(n=500, confirm={"seeds": [1], "oracles": 2})
    df = sweep_in_process(spec, str(tmp_path))
    ok = df[df["status"] == "ok"]
    assert len(ok) == len(df) > 0 and set(df["attack"]) == {"shifted_labels"}
    for row in ok.to_dict("records"):
        before = {k.removeprefix("before_"): v for k, v in row.items() if k.startswith("before_")}
        retrain = {
            k.removeprefix("retrain_"): v for k, v in row.items() if k.startswith("retrain_")
        }
        # "rows" units: E is the error rate on each split, for every model measured
        for m in ("before", "after", "retrain"):
            for split in ("val", "test"):
                acc = row[f"{m}_clean_acc_{split}"]
                # (accuracy is a float32 mean, the effect a float64 one)
                assert row[f"{m}_effect_{split}"] == pytest.approx(1 - acc, abs=1e-6)
        # attack_ok is the record's rule, and r resolved
        worked = before["effect_val"] - retrain["effect_val"] >= GAP
        assert row["attack_ok"] == (worked and row["resolution"] <= MAX_RESOLUTION)
        assert row["before_scores"] is None  # not Gaussian scores: none stored
        assert row["null_log10p"] is None or pd.isna(row["null_log10p"])
    confirm = ok[ok["phase"] == "confirm"]
    assert len(confirm) and (confirm["oracles"] == 2).all()  # margins of "rows" units
    assert confirm["oracle_p"].between(1 / 3, 1).all()

    # 500 of digits' 1078 train rows moved to the next class: an accuracy attack that works on
    # every seed (seed 0: E_before - E_retrain 0.33 against the record's 0.03, resolution 0.16
    # against 0.25)
    assert ok["attack_ok"].all()
    table = results.table(df)
    fig = figures.attack_check(table, df)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    drawn = sorted(y for seg in ax.collections[-1].get_segments() for y in {seg[0][1]})
    refs = results.reference_rows(df, "shifted_labels", df["seed"].unique())
    assert drawn == pytest.approx(sorted(100 * (refs["retrain_effect_val"] + GAP)))
    assert ax.get_ylabel() == TOY.check.label
    md, _ = report.write(f"{tmp_path}/toy", str(tmp_path / "report"))
    assert "| shifted_labels | poisoned |" in md


def test_every_record_names_what_its_consumers_know():
    from typing import get_args

    from raysweep.experiment.metrics import MARGINS, UNITS
    from raysweep.poisoning.records import Pool

    for name, record in RECORDS.items():
        assert record.units in UNITS and record.units in MARGINS, name
        assert set(record.draws.values()) <= set(get_args(Pool)), name
        assert callable(ATTACKS[name]) and ATTACKS[name].__name__ == record.craft, name
        assert record.scores == (name == "gaussian"), name
