"""`raysweep plan`: its counts against what finished runs recorded, its FLOPs against an
independent count, and its measurement passes against the passes `metrics.measure` makes."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPEC, sweep_in_process

from raysweep.base.storage import open_store
from raysweep.experiment import checkpoints
from raysweep.experiment.metrics import measure
from raysweep.experiment.spec import load, validate
from raysweep.experiment.trial import _loaded, prepare
from raysweep.runner import plan

CONFIRM = {"confirm": {"seeds": [1, 2]}}
# Three offline specs whose runs differ in what they make: anytime sharing and PER_BUDGET
# (euk), a linear model's extractor checkpoints, and an accuracy attack (label_flip).
SPECS = {
    "gaussian": {
        **TINY_SPEC,
        **CONFIRM,
        "methods": {**TINY_SPEC["methods"], "euk": {"lr": {"low": 1e-4, "high": 1e-1}, "k": 1}},
    },
    "linear": {
        **TINY_SPEC,
        **CONFIRM,
        "name": "tiny_linear",
        "dataset": {"name": "digits", "size": 8},
        "model": {
            "name": "linear",
            "extractor": "mlp",
            "width": 32,
            "depth": 1,
            "extractor_epochs": 2,
        },
        "budgets": [0.1],
    },
    "label_flip": {
        **TINY_SPEC,
        **CONFIRM,
        "name": "tiny_flip",
        "attack": {"name": "label_flip", "n": 40},
        "budgets": [0.05, 0.1, 0.2],
        "trials_per_cell": 1,
    },
    # Retrain oracles: 3 per confirm seed, none for the tuning seed (trial.oracles).
    "oracles": {
        **TINY_SPEC,
        "confirm": {"seeds": [1, 2], "oracles": 3},
        "name": "tiny_oracles",
        "attack": {"name": "backdoor", "n": 40, "y_adv": 0, "patch": 3},
        "budgets": [0.1],
        "trials_per_cell": 1,
    },
}


def recorded_caps(df) -> float:
    """Units the runs of `df` were granted (a run's cap = its own row's units / fraction used)."""
    own = df[df["cell"] == df["run_of"].str.split(":").str[0]]
    return float((own["budget_units"] / own["budget_used"]).sum())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_plan_predicts_what_a_finished_run_recorded(name, tmp_path):
    spec = validate(copy.deepcopy(SPECS[name]))
    before = plan.make(spec)  # nothing run yet: confirm runs are an upper bound
    df = sweep_in_process(spec, str(tmp_path))
    after = plan.make(spec, str(tmp_path))  # given the finished experiment: exact
    store = open_store(str(tmp_path), create=False)
    tuned, confirmed = df[df["phase"] == "tune"], df[df["phase"] == "confirm"]

    for p in (before, after):
        c = p.counts
        assert c.tuning_runs == tuned["run_of"].nunique()
        assert c.tuning_rows == len(tuned)
        keys = store.list("checkpoints")
        assert sum(c.trainings.values()) == len(keys)
        assert all(checkpoints.train_count(store, k) == 1 for k in keys)
        assert c.poison_sets == len(store.list("poisons"))
        tune_units = sum(w.units for w in p.phases["tune"][:-1])
        assert tune_units == pytest.approx(recorded_caps(tuned), rel=1e-9)
    assert before.counts.confirm_runs == len(spec.cells()) * 2 >= len(confirmed)
    assert after.counts.confirm_exact and after.counts.confirm_runs == len(confirmed)
    assert after.phases["confirm"][0].units == pytest.approx(recorded_caps(confirmed), rel=1e-9)
    assert after.counts.tuning_done == after.counts.tuning_runs
    # Retrain oracles: the plan's count is the store's, role by role (each trained once above).
    roles = [
        json.loads(store.read(f"checkpoints/{key}/meta.json"))["config"]["role"] for key in keys
    ]
    oracles = sum(role.startswith("retrain_oracle") for role in roles)
    k = spec.confirm.oracles
    assert after.counts.trainings.get("retrain oracles", 0) == oracles == 2 * k
    if k:  # K on every confirm row; null on tuning rows, judged against the one retrain model
        assert (confirmed["oracles"] == k).all() and tuned["oracles"].isna().all()


def test_plan_writes_nothing(tmp_path):
    spec = validate(copy.deepcopy(TINY_SPEC))
    where = tmp_path / "nowhere"
    plan.make(spec, str(where))
    assert not where.exists()


def test_unit_flops_match_an_independent_count():
    # Counted with FlopCounterMode on real tensors for the quickstart MLP (width 512, depth 2,
    # 32x32 inputs, batch 64) outside this project: a forward is 101.3 MFLOP, forward +
    # backward 236.8 MFLOP (the first layer needs no input gradient).
    spec = load("search_spaces/quickstart.yaml")
    unit, forward = plan.model_flops(spec, plan.shape(spec), batch=64)
    assert forward * 64 == pytest.approx(101.3e6, rel=1e-3)
    assert unit * 64 == pytest.approx(236.8e6, rel=1e-3)


@pytest.mark.parametrize(
    "attack",
    [
        {"name": "gaussian", "n": 30, "eps": 2.0},
        {"name": "label_flip", "n": 30},
        {"name": "backdoor", "n": 30, "y_adv": 0},
    ],
)
def test_measured_rows_are_the_passes_measure_makes(attack, tmp_path):
    """Every pass of `metrics.measure` goes through the model's head: count the rows there,
    float64 ones (the Gaussian score's input gradients) apart."""
    spec = validate({**copy.deepcopy(TINY_SPEC), "attack": attack})
    setup = prepare(json.dumps(spec.raw, sort_keys=True), str(tmp_path), spec.seed)
    model = _loaded(spec, setup.split, setup.poisoned, setup.poisoned_state)
    seen = {torch.float32: 0, torch.float64: 0}
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.register_forward_hook(lambda m, i, o: seen.__setitem__(o.dtype, seen[o.dtype] + len(o)))
    measure(model, setup.probe, spec.attack["name"])
    forward, grad64 = plan.measured_rows(spec, plan.shape(spec))
    assert seen[torch.float64] == grad64
    # Backdoors measure the held-out rows not of class y_adv: the plan assumes balanced classes.
    exact = attack["name"] != "backdoor"
    assert seen[torch.float32] == (forward if exact else pytest.approx(forward, rel=0.01))


def test_schedule_more_slots_never_slower():
    spec = load("search_spaces/quickstart.yaml")
    p = plan.make(spec)
    rate = plan.given(p, 10_000.0, 0.5, "test")
    walls = [plan.schedule(p, rate, n, 1, 0).wall_s for n in (1, 2, 4, 16)]
    assert walls == sorted(walls, reverse=True)
    one = plan.schedule(p, rate, 1, 1, 0)
    assert one.wall_s >= one.busy_s  # one slot: everything in sequence, plus start-up


def test_cli_plan_prints_counts_and_time_quickly(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "raysweep",
        "plan",
        "search_spaces/cifar10_resnet18_gaussian.yaml",
        "--workers",
        "8",
        "--throughput",
        "2000",
        "--price",
        "1.2",
    ]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - t < 30
    assert "unlearning runs at 0.1 of C_train" in out.stdout and "260" in out.stdout
    assert "GPU-hours" in out.stdout and "$" in out.stdout


def test_gpu_bench_writes_the_throughput_plan_reads(tmp_path, monkeypatch):
    """bench/gpu.py's two additions, on the CPU at a smoke scale: the throughput file round-trips
    into `plan.measured`, and the paper trial runs through the real trial code."""
    path = Path(__file__).parents[1] / "bench" / "gpu.py"
    loader = importlib.util.spec_from_file_location("gpu_bench", path)
    gpu = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(gpu)
    monkeypatch.setattr(plan, "MEASURED", tmp_path / "throughput.json")
    spec_path = gpu.PAPER[0]
    gpu.write_throughput(torch.device("cpu"), examples=8, paths=(spec_path,))
    p = plan.make(load(spec_path))
    rate = plan.measured(p)
    assert rate is not None and rate.train > 0 and "bench/gpu.py on CPU" in rate.source
    assert plan.measured(plan.make(load("search_spaces/quickstart.yaml"))) is None
    smaller = {
        "dataset": {"n_train": 400, "val_fraction": 0.004},
        "attack": {"n": 40},
        "model": {"width": 8},
    }
    out = gpu.paper_trial(epochs=1, smaller=smaller, n_test=200)
    assert out["train_rows"] == 400
    # At this scale the two runs differ by 32 units: their times say nothing, but they exist.
    assert all(math.isfinite(out[k]) for k in ("unlearn_ex_per_s", "measure_s", "checkpoints_s"))


def test_docs_plans_are_current():
    """docs/plans.md and docs/cluster.md's table of it are generated from the code, so they cannot
    drift."""
    doc, summary = plan.paper_plans()
    root = Path(__file__).parents[1]
    assert (root / "docs" / "plans.md").read_text() == doc, (
        "python -m raysweep.runner.plan > docs/plans.md"
    )
    assert summary.replace("](#", "](plans.md#") in (root / "docs" / "cluster.md").read_text()
