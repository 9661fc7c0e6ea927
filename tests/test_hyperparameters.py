"""The setting recorded is the setting run (issue 29): one type per hp_<name> column from what
every method declares, no silent cast between the sampler and the row, and confirm trials that
re-run their tuned trial's setting exactly, whatever order the spec lists its methods in."""

from __future__ import annotations

import functools
import inspect
import io
import math
import re
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_SPEC, sweep_in_process
from ray.tune.search import Searcher

from raysweep.analysis import results
from raysweep.base.domains import PosFloat, PosInt
from raysweep.base.storage import open_store
from raysweep.experiment.spec import SpecError, distributions, load, validate
from raysweep.runner import sweep
from raysweep.runner.rows import hyperparameter_types, params_of, schema, write_row
from raysweep.runner.searcher import CellSearcher, open_studies, reconcile
from raysweep.unlearning.unlearners import UNLEARNERS

SPECS = sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))
NGD = {"lr": {"low": 1e-5, "high": 0.3, "log": True}, "sigma2": {"low": 1e-8, "high": 1e-5}}


def same(a, b) -> bool:
    """Equal bit for bit: the same kind (bool, int, float, str) and value (float.hex for floats)."""
    kinds = [next(k for k in (bool, int, float, str) if isinstance(v, k)) for v in (a, b)]
    if kinds[0] is not kinds[1]:
        return False
    return float(a).hex() == float(b).hex() if kinds[0] is float else a == b


def same_setting(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def hp(row: dict) -> dict:
    """A row's non-null hp_ columns as parameters, exactly as read back (no cast here)."""
    out = {}
    for k, v in row.items():
        if k.startswith("hp_") and v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[k.removeprefix("hp_")] = v.item() if hasattr(v, "item") else v
    return out


def _issue_spec(gd: dict, gd_first: bool) -> dict:
    methods = [("ngd", NGD), ("gd", gd)]
    methods = methods[::-1] if gd_first else methods
    return {**TINY_SPEC, "methods": dict(methods), "confirm": {"seeds": [1]}}


# ---------------------------------------------------------------- column types at validation


@pytest.mark.parametrize("gd", [{"lr": 1}, {"lr": {"choices": [1, 0.01]}}])
def test_columns_are_typed_by_what_every_method_declares_in_any_order(gd):
    a, b = (validate(_issue_spec(gd, first)) for first in (False, True))
    assert hyperparameter_types(a) == hyperparameter_types(b)
    assert hyperparameter_types(a)["hp_lr"] == pa.float64()
    assert a.hash == b.hash  # listing order is no change: a resume accepts either
    # The int literal runs as the float its parameter takes, and is recorded as one.
    dists, fixed = distributions("gd", gd)
    values = dists["lr"].choices if dists else (fixed["lr"],)
    assert all(type(v) is float for v in values) and values[0] == 1.0


def test_a_spec_whose_kinds_agree_keeps_its_hash_and_column_types():
    spec = load(SPECS[0])
    assert spec.hash == validate(spec.raw, str(SPECS[0])).hash
    assert all(t in (pa.float64(), pa.int64()) for t in hyperparameter_types(spec).values())


def _fake(**annotations):
    """An unlearner taking keyword-only parameters of the given domains (defaults: None)."""

    def fake(model, forget, retain, meter, gen, **kwargs):
        pass

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in
              ("model", "forget", "retain", "meter", "gen")]  # fmt: skip
    params += [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a)
        for n, a in annotations.items()
    ]
    fake.__signature__ = inspect.Signature(params)
    return fake


@pytest.fixture
def kinds(monkeypatch):
    """Unlearners declaring every kind a hyperparameter can have, under names others share."""
    monkeypatch.setitem(
        UNLEARNERS,
        "every_kind",
        _fake(k=bool, steps=PosInt, lr=PosFloat, mode=Literal["a", "b"], batch_size=PosInt),
    )
    monkeypatch.setitem(UNLEARNERS, "int_steps", _fake(steps=PosFloat, mixed=Literal[1, "a"]))
    return {**TINY_SPEC, "methods": {}}


@pytest.mark.parametrize(
    "methods, message",
    [
        (
            {"euk": {"k": 3}, "every_kind": {"k": True}},
            "spec.yaml: methods.every_kind.k: takes bool but methods.euk.k takes int, and both "
            "are recorded in column hp_k; allowed: one kind per hyperparameter name (int and "
            "float share a float column)",
        ),
        (
            {"every_kind": {"k": True}, "euk": {"k": 3}},
            "spec.yaml: methods.euk.k: takes int but methods.every_kind.k takes bool",
        ),
        (
            {"int_steps": {"mixed": 1}},
            "spec.yaml: methods.int_steps.mixed: its parameter takes 1, a, values of several "
            "kinds that one hp_mixed column cannot hold; allowed: bool, int, float or str",
        ),
        (
            {"int_steps": {"steps": 1.5}, "ga": {"steps": 2**53 + 1}},
            "spec.yaml: methods.ga.steps: 9007199254740993 is not exact as a float, and hp_steps "
            "is a float column (another method's steps takes floats); allowed: int in "
            "[-2^53, 2^53] here",
        ),
        (
            {"gd": {"lr": {"low": 1, "high": 3, "int": True}}},
            "spec.yaml: methods.gd.lr.int: true on a float > 0 parameter; allowed: false (a float "
            "range is sampled as floats), or {choices: [...]}",
        ),
    ],
)
def test_mixed_or_ambiguous_kinds_are_refused_in_one_line(kinds, methods, message):
    with pytest.raises(SpecError, match=re.escape(message)) as e:
        validate({**kinds, "methods": methods}, "spec.yaml")
    assert "\n" not in str(e.value)


def test_int_and_float_share_a_float_column_and_read_back_as_each_takes_them(kinds):
    spec = validate({**kinds, "methods": {"int_steps": {"steps": 1.5}, "ga": {"steps": 7}}})
    assert hyperparameter_types(spec)["hp_steps"] == pa.float64()
    row = {"method": "ga", "hp_steps": 7.0}
    assert same_setting(params_of(spec, row), {"steps": 7})


@pytest.mark.parametrize(
    "tried, message",
    [
        (
            {"euk": [{"k": True}]},
            "spec.yaml: tried_first.euk[0].k: True is bool; allowed: [1, 3]",
        ),
        (
            {"gd": [{"lr": 1}]},
            "spec.yaml: tried_first.gd[0].lr: 1 is int; allowed: float in [0.001, 2] (write 1.0)",
        ),
    ],
)
def test_tried_first_values_of_the_wrong_kind_are_refused(tried, message):
    methods = {"euk": {"k": {"choices": [1, 3]}}, "gd": {"lr": {"low": 1e-3, "high": 2}}}
    with pytest.raises(SpecError, match=re.escape(message)):
        validate({**TINY_SPEC, "methods": methods, "tried_first": tried}, "spec.yaml")
    ok = {"euk": [{"k": 1}], "gd": [{"lr": 1.0}]}
    validate({**TINY_SPEC, "methods": methods, "tried_first": ok}, "spec.yaml")


# ---------------------------------------------------------------- writing a row


def test_a_row_with_every_kind_reads_back_equal(kinds, tmp_path):
    methods = {"every_kind": {"k": True, "steps": 3, "lr": 2.9e-5, "mode": "b"}}
    methods |= {"int_steps": {"steps": 0.5}, "gd": {"batch_size": 2**62}}
    spec = validate({**kinds, "methods": methods})
    store = open_store(str(tmp_path))
    setting = {"k": True, "steps": 2**53, "lr": 2.9e-5, "mode": "b", "batch_size": 2**62 + 1}
    row = {"experiment": spec.name, "phase": "tune", "cell": "every_kind-b0.1", "trial_number": 0}
    row |= {"method": "every_kind"} | {f"hp_{k}": v for k, v in setting.items()}
    write_row(store, spec, row)
    back = results.read(store, spec.name).to_dict("records")[0]
    batch_size = setting.pop("batch_size")  # gd's: a column every_kind's rows need not fill
    assert same_setting(params_of(spec, back), setting)  # as every_kind takes them
    assert same(hp(back)["batch_size"], batch_size) and same(hp(back)["steps"], 2.0**53)
    types = hyperparameter_types(spec)
    assert types == {"hp_batch_size": pa.int64(), "hp_k": pa.bool_(), "hp_lr": pa.float64(),
                     "hp_mode": pa.string(), "hp_steps": pa.float64()}  # fmt: skip


@pytest.mark.parametrize(
    "column, value",
    [("hp_batch_size", 2.9e-5), ("hp_batch_size", True), ("hp_lr", True), ("hp_lr", "1"),
     ("hp_steps", 2**53 + 1), ("hp_k", 1), ("hp_mode", 1)],
)  # fmt: skip
def test_writing_a_value_its_column_would_change_is_refused(kinds, tmp_path, column, value):
    methods = {"every_kind": {"k": True, "steps": 3, "lr": 0.1, "mode": "b", "batch_size": 8}}
    spec = validate({**kinds, "methods": {**methods, "int_steps": {"steps": 0.5}}})
    row = {"experiment": spec.name, "phase": "tune", "cell": "c", "trial_number": 0, column: value}
    with pytest.raises(ValueError, match=f"^{column}: "):
        write_row(open_store(str(tmp_path)), spec, row)
    assert not list(tmp_path.rglob("*.parquet"))


def test_rows_typed_by_a_literal_before_still_read(tmp_path, tiny_spec_dict):
    """An experiment whose hp_lr was int64 (the last method's `lr: 1`) reads with the new rows."""
    spec = validate(tiny_spec_dict)
    store = open_store(str(tmp_path))
    current = schema(spec)
    for number, value, t in ((0, 1, pa.int64()), (1, 0.5, pa.float64())):
        row = {"experiment": spec.name, "phase": "tune", "cell": "gd-b0.1"}
        row |= {"trial_number": number, "method": "gd", "hp_lr": value}
        old = current.set(current.get_field_index("hp_lr"), pa.field("hp_lr", t))
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([row], schema=old), buf)
        store.write(results.row_name(spec.name, "tune", "gd-b0.1", number), buf.getvalue())
    assert list(results.read(store, spec.name).sort_values("trial_number")["hp_lr"]) == [1.0, 0.5]


# ---------------------------------------------------------------- sampler to row to confirm


def _recording_run_trial(received: list):
    """run_trial without compute: records the setting it is handed, reports a row per budget."""

    def run_trial(spec, store, method, budget, params, number, report, seed, stops, **_):
        received.append(dict(params))
        for b in (*stops, budget):
            report({"budget": b, "objective": 1.0 / (number + 2), "feasible": True,
                    "feasible_test": True, "residual_val": 0.5, "residual": 0.5})  # fmt: skip

    return run_trial


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_shipped_spec_records_and_confirms_the_setting_run(path, tmp_path, monkeypatch):
    received: list[dict] = []
    monkeypatch.setattr(sweep, "run_trial", _recording_run_trial(received))
    loaded = load(path)
    spec = validate({**loaded.raw, "confirm": {"seeds": [loaded.seed + 1]}}, str(path))
    store = open_store(str(tmp_path))
    studies = open_studies(spec, store)
    searcher = CellSearcher(spec, studies, reconcile(studies, results.read(store, spec.name)))
    # Enough runs per lead for its tried_first settings and a sampled one after them.
    per_lead = 1 + max((len(v) for v in spec.tried_first.values()), default=0)
    ran = {}  # (cell, trial_number) -> the setting its run received
    for i in range(per_lead * len(searcher.runs)):
        if (config := searcher.suggest(f"t{i}")) == Searcher.FINISHED:
            break
        rows = sweep.execute(spec, store, config)
        searcher.on_trial_complete(f"t{i}", sweep.reported(rows))
        ran |= {(r["cell"], r["trial_number"]): received[-1] for r in rows}
    plan = sweep.tuned_settings(
        spec, store, sweep.confirm_plan(spec, results.read(store, spec.name))
    )
    assert plan
    for config in plan:
        sweep.execute(spec, store, config)
        assert same_setting(received[-1], ran[config["cell"], config["tuned_trial"]])
    for row in results.read(store, spec.name).to_dict("records"):
        setting = ran[
            row["cell"], row["tuned_trial"] if row["phase"] == "confirm" else row["trial_number"]
        ]
        assert same_setting(params_of(spec, row), setting)
        assert {k: float(v) for k, v in hp(row).items()} == {
            k: float(v) for k, v in setting.items()
        }


@pytest.mark.parametrize(
    "gd", [{"lr": 1}, {"lr": {"choices": [1, 0.01]}}], ids=["const", "choices"]
)
def test_the_issues_specs_carry_ngds_real_lr_in_either_order(gd, tmp_path, monkeypatch):
    received: list[tuple[str, dict]] = []

    def recording(method):
        fn = UNLEARNERS[method]

        @functools.wraps(fn)
        def unlearner(*args, **params):
            received.append((method, dict(params)))
            return fn(*args, **params)

        return unlearner

    for method in ("ngd", "gd"):
        monkeypatch.setitem(UNLEARNERS, method, recording(method))
    runs = []
    execute = sweep.execute
    monkeypatch.setattr(sweep, "execute", lambda *a: runs.append(execute(*a)) or runs[-1])
    frames = []
    for gd_first in (False, True):
        received.clear()
        runs.clear()
        spec = validate(_issue_spec(gd, gd_first))
        df = sweep_in_process(spec, str(tmp_path / f"gd_first={gd_first}"))
        assert len(received) == len(runs)  # one unlearner call per run
        by_run = {}
        for (method, params), rows in zip(received, runs):
            for row in rows:
                assert row["method"] == method and same_setting(hp(row), params)
                by_run[row["phase"], row["cell"], row["trial_number"]] = params
        for row in df.to_dict("records"):  # as read back from Parquet
            params = by_run[row["phase"], row["cell"], row["trial_number"]]
            assert {k: float(v) for k, v in hp(row).items()} == params
            if row["phase"] == "confirm":
                assert same_setting(params, by_run["tune", row["cell"], row["tuned_trial"]])
        ngd = df[df["method"] == "ngd"]
        assert (ngd["hp_lr"] > 0).all() and ngd["hp_lr"].nunique() > 1
        table = results.table(df)
        assert set(table["source"]) == {"reference", "confirm"}  # every cell confirmed
        tuned = df[df["phase"] == "tune"].set_index(["cell", "trial_number"])
        for row in table[table["method"] == "ngd"].to_dict("records"):
            lr = tuned.loc[(f"ngd-b{row['from_budget']:g}", row["tuned_trial"]), "hp_lr"]
            assert f"lr={lr:.3g}" in row["setting"]
        keep = ["phase", "cell", "trial_number", "seed", "tuned_trial", "hp_lr", "hp_sigma2",
                "objective", "residual"]  # fmt: skip
        frames.append(df[keep].sort_values(keep[:3], ignore_index=True))
    assert frames[0].equals(frames[1])  # listing order changes nothing
