"""raysweep plan: what a sweep will run and what it costs, before it runs.

Counts come from the code paths the sweep itself takes: the searcher's leads (`searcher.runs`:
anytime sharing and PER_BUDGET), the confirm phase's plan (`sweep.confirm_plan`, exact once
tuning has finished), and the artifacts each seed makes (`trial.prepare`: poisons, then the
poisoned and retrain checkpoints, and a linear model's extractor). Compute is counted in budget
units and in FLOPs on meta tensors for the spec's model and input shape; memory per trial is
`footprint.trial`. Wall time follows the sweep's schedule (each seed's artifacts are made once,
by the first trial that needs them, while the others wait on its lock) from a throughput the
user gives, or one measured here (`calibrate`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from raysweep.analysis import results
from raysweep.analysis.convergence import finished
from raysweep.base.storage import RunStateError, open_store
from raysweep.experiment import footprint
from raysweep.experiment.footprint import Footprint, Shape, bound, shape, trial
from raysweep.experiment.metrics import input_gradients
from raysweep.experiment.spec import Spec
from raysweep.experiment.trial import device as trial_device
from raysweep.experiment.trial import oracles as trial_oracles
from raysweep.poisoning.attacks import ATTACKS
from raysweep.poisoning.records import RECORDS
from raysweep.science.budget import flops, train_cost
from raysweep.science.data import PAD
from raysweep.science.models import MODELS, chunked, seeded
from raysweep.science.train import train

from .searcher import runs
from .sweep import confirm_plan

# A trial's fixed cost beyond its counted work (Tune's scheduling, loading the poisoned model,
# the float64 copy, the bootstrap interval): 0.85 s, docs/design.md §8's measurement of Tune's
# per-trial overhead; make quickstart's 152 tuning runs fit wall_s = 1.09 s + units / 48k per s.
TRIAL_OVERHEAD_S = 0.85
# Each phase starts a Tuner (and the first, Ray): outside any trial's work.
START_S = 8.0


@dataclass(frozen=True)
class Counts:
    """What a run makes: runs per phase, rows, and the artifacts trained or crafted."""

    cells: int
    tuning_runs: int  # Tune trials of the tuning phase (a prefix method's run serves its cells)
    tuning_runs_min: int  # a trials_per_cell range's least: every lead at min (else = the above)
    tuning_rows: int
    tuning_done: int  # runs already recorded in the experiment's rows
    confirm_runs: int  # cells x seeds at most; exact once tuning is done (`confirm_exact`)
    confirm_exact: bool
    seeds: tuple[int, ...]  # the tuning seed, then the confirm seeds: one poison set each
    trainings: dict[str, int]  # role -> trainings (poisoned, retrain, extractor, retrain oracles)
    surrogates: int  # models trained inside crafting, never stored
    poison_sets: int


# ---------------------------------------------------------------- counts


def tuned_rows(spec: Spec, storage: str | None) -> pd.DataFrame:
    """The experiment's rows if `storage` holds it (read-only), else an empty frame."""
    if storage is None:
        return pd.DataFrame()
    try:
        store = open_store(storage, create=False)
    except RunStateError:
        return pd.DataFrame()
    return results.read(store, spec.name)


def counts(spec: Spec, df: pd.DataFrame) -> Counts:
    """The runs and artifacts a run of `spec` makes, given the rows it already has (`df`)."""
    leads = runs(spec)
    tuned = df[df["phase"] == "tune"] if len(df) else df
    done = 0
    if len(tuned):
        lead_rows = tuned[tuned["cell"].isin(list(leads))]
        done = lead_rows.drop_duplicates(["cell", "trial_number"]).shape[0]
    low, high = spec.trials_range()  # a range: the most it may run, and the least
    tuning_runs = len(leads) * high
    seeds = (spec.seed, *spec.confirm.seeds)
    confirm_max = len(spec.cells()) * len(spec.confirm.seeds)
    exact = done >= tuning_runs if low == high else finished(df, spec.cells(), low, high)
    # Once every tuning run is recorded, the confirm plan of the tuned rows is what a run
    # confirms (cells that chose a smaller budget's row still each get their own run).
    confirm = len(confirm_plan(spec, tuned)) if exact and len(tuned) else confirm_max
    attack = bound(ATTACKS[spec.attack["name"]], spec.attack)
    per_seed = {"poisoned": 1, "retrain": 1}
    if spec.model["name"] == "linear":
        per_seed["extractor"] = 1
    surrogate = RECORDS[spec.attack["name"]].surrogates(attack)
    trainings = {role: n * len(seeds) for role, n in per_seed.items()}
    oracles = sum(trial_oracles(spec, s) for s in seeds)  # confirm seeds only (trial.oracles)
    if oracles:
        trainings["retrain oracles"] = oracles
    return Counts(
        cells=len(spec.cells()),
        tuning_runs=tuning_runs,
        tuning_runs_min=len(leads) * low,
        tuning_rows=len(spec.cells()) * high,
        tuning_done=done,
        confirm_runs=confirm,
        confirm_exact=exact,
        seeds=seeds,
        trainings=trainings,
        surrogates=surrogate * len(seeds),
        poison_sets=len(seeds),
    )


# ---------------------------------------------------------------- compute


def model_flops(spec: Spec, sz: Shape, batch: int) -> tuple[float, float]:
    """FLOPs of one example's forward + backward (a budget unit) and of its forward alone, for
    the spec's model at the input shape, counted on meta tensors at `batch` rows (nothing is
    allocated or computed)."""
    model = footprint.model(spec, sz).train()
    with torch.device("meta"):
        x = torch.zeros((batch, *sz.input_shape), dtype=sz.dtype)
        y = torch.zeros(batch, dtype=torch.long)
    both = flops(lambda: F.cross_entropy(model(x), y).backward())
    forward = flops(lambda: model(x))
    return both / batch, forward / batch


def measured_rows(spec: Spec, sz: Shape) -> tuple[int, int]:
    """Rows one measurement of a model passes forward (accuracies, the loss MIA, the attack's
    effect) and rows it differentiates in float64 (the Gaussian score: the training noise, the
    null control, and the effect E again): metrics.measure's passes over the trial's probe."""
    attack = bound(ATTACKS[spec.attack["name"]], spec.attack)
    n_forget = max(1, round(spec.forget.known_fraction * attack["n"]))
    n_retain = sz.n_train - n_forget
    held = sz.n_val + sz.n_test
    forward = held + n_retain + n_forget + (n_forget + sz.n_test)  # clean_acc, loss_mia
    grad64 = 0
    units = RECORDS[spec.attack["name"]].units  # what the attack's effect is the mean of
    if units == "poisons":
        grad64 = 3 * attack["n"]
    elif units == "targets":
        forward += 2 * attack["n_targets"]
    elif units == "triggered":  # rows not of class y_adv, metric and effect
        forward += 2 * round(held * (sz.num_classes - 1) / sz.num_classes)
    else:  # accuracy attacks: errors on val and test
        forward += held
    return forward, grad64


def oracle_measure(spec: Spec, sz: Shape, unit: float, fwd: float) -> float:
    """FLOPs of measuring one retrain oracle (trial.oracle_reference): its effect units and its
    margins on them, two passes over the test units (metrics.UNITS, MARGINS): forward passes,
    or float64 input gradients for Gaussian poisons (one budget unit's FLOPs each). `unit`, `fwd`:
    `model_flops`."""
    attack = bound(ATTACKS[spec.attack["name"]], spec.attack)
    units = RECORDS[spec.attack["name"]].units
    if units == "poisons":
        return 2 * attack["n"] * unit
    if units == "targets":
        return 2 * attack["n_targets"] * fwd
    if units == "triggered":  # the test rows not of class y_adv
        return 2 * round(sz.n_test * (sz.num_classes - 1) / sz.num_classes) * fwd
    return 2 * sz.n_test * fwd  # accuracy attacks: every test row


def seed_units(spec: Spec, sz: Shape) -> dict[str, float]:
    """Units of the artifacts one seed makes, by what trains them (crafting loops excluded)."""
    attack = bound(ATTACKS[spec.attack["name"]], spec.attack)
    epochs = spec.train.epochs
    out = {
        "poisoned": train_cost(epochs, sz.n_train),
        "retrain": train_cost(epochs, sz.n_train - attack["n"]),
    }
    if spec.model["name"] == "linear":
        epochs_x = bound(MODELS["linear"], spec.model)["extractor_epochs"]
        out["extractor"] = train_cost(epochs_x, sz.n_train)
    n = RECORDS[spec.attack["name"]].surrogates(attack)
    if n:
        out["surrogates"] = n * train_cost(attack["surrogate_epochs"], sz.n_train)
    return out


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Work:
    """One line of the plan: how many, and their compute in budget units and in FLOPs."""

    what: str
    count: int
    units: float
    flops: float


@dataclass(frozen=True)
class Plan:
    spec: Spec
    shape: Shape
    counts: Counts
    unit_flops: float  # one example's forward + backward: one budget unit
    forward_flops: float  # one example's forward
    c_train: float
    seed_units: dict[str, float]  # what one seed's artifacts cost to train, by role
    measured: tuple[int, int]  # rows one measurement passes forward, and differentiates (fp64)
    phases: dict[str, list[Work]]  # setup, tune, confirm -> lines
    footprint: Footprint


def make(spec: Spec, storage: str | None = None) -> Plan:
    """The plan of `spec`, continuing the experiment in `storage` if there is one there."""
    sz = shape(spec)
    df = tuned_rows(spec, storage)
    c = counts(spec, df)
    kw = spec.train.kwargs()
    unit, fwd = model_flops(spec, sz, kw["batch_size"])
    c_train = train_cost(kw["epochs"], sz.n_train)
    forward, grad64 = measured_rows(spec, sz)
    measure_flops = forward * fwd + grad64 * unit  # a float64 gradient: one unit's FLOPs
    work = lambda what, n, units: Work(what, n, units, units * unit)
    per_seed = seed_units(spec, sz)
    seeds = len(c.seeds)
    # Surrogates are trained inside crafting, never stored: counted apart from checkpoints.
    made = c.trainings | {"surrogates": c.surrogates}
    setup = [work(f"{role} trained", made[role], u * seeds) for role, u in per_seed.items()]
    setup.append(work("poison sets crafted (their loops not counted)", c.poison_sets, 0.0))
    oracles = c.trainings.get("retrain oracles", 0)
    if oracles:  # each a retrain model; then measured once: its effect units and test margins
        setup.append(work("retrain oracles trained", oracles, oracles * per_seed["retrain"]))
        setup.append(
            work("oracles measured", oracles, oracles * oracle_measure(spec, sz, unit, fwd) / unit)
        )
    # Each seed's maker measures its poisoned and retrain models (other processes measure them
    # again once per seed they see: counted in `schedule`).
    setup.append(
        work("models measured (poisoned, retrain)", 2 * seeds, 2 * seeds * measure_flops / unit)
    )
    # A run spends up to its budget cap: a prefix method's at its largest budget (measured at
    # the smaller ones on the way), a PER_BUDGET method's at each budget.
    by_budget: dict[float, int] = {}
    for cells in runs(spec).values():
        by_budget[cells[-1][1]] = by_budget.get(cells[-1][1], 0) + spec.trials_range()[1]
    tune = [
        work(f"unlearning runs at {b:g} of C_train", n, n * b * c_train)
        for b, n in sorted(by_budget.items())
    ]
    if c.confirm_exact:
        configs = confirm_plan(spec, df[df["phase"] == "tune"])
        confirm_units = sum(x["budget"] for x in configs) * c_train
    else:  # at most: each cell's best re-run at its own budget
        confirm_units = sum(b for _, b in spec.cells()) * len(spec.confirm.seeds) * c_train
    rows = lambda n, extra=0.0: work("rows measured", n, n * (measure_flops + extra) / unit)
    # Confirm rows of a spec with oracles also take the unlearned model's test margins.
    margin_flops = (
        oracle_measure(spec, sz, unit, fwd) / 2 if c.trainings.get("retrain oracles") else 0.0
    )
    phases = {
        "setup": setup,
        "tune": [*tune, rows(c.tuning_rows)],
        "confirm": [
            work("unlearning runs, at their budget caps", c.confirm_runs, confirm_units),
            rows(c.confirm_runs, margin_flops),
        ],
    }
    return Plan(spec, sz, c, unit, fwd, c_train, per_seed, (forward, grad64), phases, trial(spec))


# ---------------------------------------------------------------- time and money


@dataclass(frozen=True)
class Throughput:
    """Examples per second of one trial at the spec's resources."""

    train: float  # forward + backward + optimiser step in float32: budget units per second
    forward: float  # eval forward (accuracies, the loss MIA)
    grad64: float  # float64 input gradients (the Gaussian score)
    source: str


def from_tflops(plan: Plan, tflops: float, fp64: float, source: str) -> Throughput:
    """A throughput from the sustained TFLOP/s of the GPU a trial gets (its `gpu` share of it),
    or of the trial itself on a spec without GPUs: examples/s at the counted FLOPs per unit."""
    share = plan.spec.resources.gpu or 1.0
    return given(plan, tflops * 1e12 * share / plan.unit_flops, fp64, source)


def given(plan: Plan, train_per_s: float, fp64: float, source: str) -> Throughput:
    """A throughput from one figure: forward passes at the FLOP ratio, float64 at `fp64` of it."""
    return Throughput(
        train_per_s, train_per_s * plan.unit_flops / plan.forward_flops, train_per_s * fp64, source
    )


@dataclass(frozen=True)
class Schedule:
    slots: int  # trials at once
    phase_s: dict[str, float]  # tune (with the tuning seed's setup), confirm: wall seconds
    busy_s: float  # trial seconds summed over all trials
    wall_s: float
    gpu_hours_held: float  # workers x their GPUs x wall: what a cloud bills
    gpu_hours_busy: float  # trials' GPU fractions x their seconds


def schedule(
    plan: Plan, rate: Throughput, slots: int, workers: int, worker_gpus: float
) -> Schedule:
    """Wall time on `slots` trials at once, as the sweep schedules: a seed's artifacts are made
    by the first trial that needs them while the others wait on its lock; every other process
    measures the poisoned and retrain models once per seed it sees; trials then share the slots.
    A phase takes at least its longest run."""
    c, spec = plan.counts, plan.spec
    fwd, grad = plan.measured
    measure_s = fwd / rate.forward + grad / rate.grad64
    setup_s = sum(plan.seed_units.values()) / rate.train + 2 * measure_s
    trial_s = lambda units, n: units / rate.train + n * (measure_s + TRIAL_OVERHEAD_S)
    longest = max(b for _, b in spec.cells()) * plan.c_train / rate.train + measure_s
    tune_units = sum(w.units for w in plan.phases["tune"][:-1])
    confirm_units = plan.phases["confirm"][0].units
    tune_busy = trial_s(tune_units, c.tuning_runs) + 2 * measure_s * (min(slots, c.tuning_runs) - 1)
    tune_busy += (c.tuning_rows - c.tuning_runs) * measure_s  # checkpoint rows of prefix runs
    tune = START_S + setup_s + max(tune_busy / slots, longest)
    confirm_seeds = len(c.seeds) - 1
    confirm_busy = trial_s(confirm_units, c.confirm_runs) + (confirm_seeds - 1) * setup_s
    # Retrain oracles: shared out among the trials preparing a seed (checkpoints.ensure_each).
    confirm_busy += c.trainings.get("retrain oracles", 0) * plan.seed_units["retrain"] / rate.train
    confirm_busy += 2 * measure_s * max(min(slots, c.confirm_runs) - confirm_seeds, 0)
    confirm = START_S + setup_s + max(confirm_busy / slots, longest) if c.confirm_runs else 0.0
    busy = setup_s * (1 + (confirm_seeds > 0)) + tune_busy + confirm_busy
    wall = tune + confirm
    gpu = spec.resources.gpu
    return Schedule(
        slots,
        {"tune": tune, "confirm": confirm},
        busy,
        wall,
        wall / 3600 * workers * worker_gpus,
        busy / 3600 * gpu,
    )


def calibrate(plan: Plan, examples: int = 256, device: torch.device | None = None) -> Throughput:
    """Measure one trial's throughput here: `examples` rows of the spec's model through train's
    steps (its batch size, optimizer and precision), an eval forward and a float64 input
    gradient, on random inputs of its shape, with as many threads as the spec gives a trial."""
    spec, sz = plan.spec, plan.shape
    device = device or trial_device()
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    fn = MODELS[spec.model["name"]]
    gen = torch.Generator().manual_seed(0)
    build = lambda: fn(sz.input_shape, sz.num_classes, **bound(fn, spec.model))
    model = seeded(build, gen).to(device)
    x = random_inputs(sz, examples, gen).to(device)
    y = torch.randint(0, sz.num_classes, (examples,), generator=gen).to(device)
    kw = spec.train.kwargs() | {"epochs": 1}
    rates = {
        "train": lambda n: train(model, x[:n], y[:n], gen, **kw),
        "forward": lambda n: chunked(model.eval(), x[:n]),
        "grad64": lambda n: input_gradients(model, x[:n], y[:n]),
    }
    per_s = {}
    for name, run in rates.items():
        run(min(examples, kw["batch_size"]))  # warm-up: allocations, kernels chosen
        _sync(device)
        t = time.perf_counter()
        run(examples)
        _sync(device)
        per_s[name] = examples / (time.perf_counter() - t)
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    )
    threads = torch.get_num_threads()
    return Throughput(
        **per_s, source=f"calibrated on {where} ({examples} examples, {threads} thread(s))"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_inputs(sz: Shape, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` rows shaped like the spec's inputs: standardised pixels, or GPT-2 token ids."""
    if sz.dtype.is_floating_point:
        return torch.randn((n, *sz.input_shape), generator=gen)
    return torch.randint(0, PAD, (n, *sz.input_shape), generator=gen)


# Where bench/gpu.py writes the throughput it measured on a lent GPU, per model and input shape.
MEASURED = Path(__file__).resolve().parents[1] / "bench" / "throughput.json"


def measured(plan: Plan) -> Throughput | None:
    """bench/gpu.py's measurement for the spec's model and input shape, if one was made."""
    if not MEASURED.is_file():
        return None
    entry = json.loads(MEASURED.read_text()).get(throughput_key(plan.spec, plan.shape))
    if entry is None:
        return None
    return Throughput(
        entry["train"],
        entry["forward"],
        entry["grad64"],
        f"bench/gpu.py on {entry['device']}, {entry['date']}",
    )


def throughput_key(spec: Spec, sz: Shape) -> str:
    """The model and input a throughput holds for: `resnet18 {'width': 64} (3, 32, 32)`."""
    return f"{spec.model['name']} {bound(MODELS[spec.model['name']], spec.model)} {tuple(sz.input_shape)}"


# ---------------------------------------------------------------- what `raysweep plan` prints


def _n(x: float) -> str:
    """3 significant digits with an SI suffix: 4.5 k, 1.2 G, 3.4 P."""
    for suffix, scale in (
        ("E", 1e18),
        ("P", 1e15),
        ("T", 1e12),
        ("G", 1e9),
        ("M", 1e6),
        ("k", 1e3),
    ):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {suffix}"
    return f"{x:.3g}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} days"


def render(
    plan: Plan,
    rate: Throughput | None = None,
    sched: Schedule | None = None,
    price: float | None = None,
) -> str:
    spec, sz, c, fp = plan.spec, plan.shape, plan.counts, plan.footprint
    out = [
        f"{spec.source}: experiment '{spec.name}'",
        f"  model {spec.model['name']} on inputs {tuple(sz.input_shape)}, {sz.num_classes} classes; "
        f"{sz.n_train:,} train / {sz.n_val:,} val / {sz.n_test:,} test rows",
        f"  one budget unit (an example's forward + backward) = {_n(plan.unit_flops)}FLOP; "
        f"a forward = {_n(plan.forward_flops)}FLOP ({plan.forward_flops / plan.unit_flops:.2f} of a unit)",
        f"  C_train = {plan.c_train:,.0f} units; {c.cells} cells x {'-'.join(map(str, sorted(set(spec.trials_range()))))} trials; "
        f"seeds {', '.join(map(str, c.seeds))} (tuning, then confirm)",
    ]
    if c.tuning_runs_min < c.tuning_runs:
        out.append(
            f"  {c.tuning_runs_min}-{c.tuning_runs} tuning runs: past min, only cells not "
            "converged get more (convergence.py); the plan below is of the most"
        )
    if c.tuning_done:
        out.append(
            f"  {c.tuning_done} of {c.tuning_runs} tuning runs already recorded "
            "(the plan below is of the whole run)"
        )
    out += ["", f"  {'phase':8} {'what':48} {'count':>7} {'units':>10} {'FLOPs':>10}"]
    total_units = total_flops = 0.0
    for phase, lines in plan.phases.items():
        for w in lines:
            what = w.what
            if phase == "confirm" and w.count and not c.confirm_exact:
                what += " (at most)"
            out.append(f"  {phase:8} {what:48} {w.count:>7,} {_n(w.units):>10} {_n(w.flops):>10}")
            total_units += w.units
            total_flops += w.flops
    out.append(f"  {'total':8} {'':48} {'':>7} {_n(total_units):>10} {_n(total_flops):>10}")
    parts = ", ".join(f"{k} {_n(v)}B" for k, v in fp.parts().items())
    out += ["", f"  memory per trial: peak {_n(fp.peak)}B ({parts})"]
    if rate is None or sched is None:
        out.append("  wall time: give --throughput EXAMPLES_PER_S or --calibrate")
        return "\n".join(out)
    out += [
        "",
        f"  throughput per trial: {_n(rate.train)} train, {_n(rate.forward)} forward, "
        f"{_n(rate.grad64)} float64-gradient examples/s ({rate.source})",
        f"  {sched.slots} trials at once: tune {_duration(sched.phase_s['tune'])}, "
        f"confirm {_duration(sched.phase_s['confirm'])}, total {_duration(sched.wall_s)} "
        f"(trials busy {_duration(sched.busy_s)})",
    ]
    if sched.gpu_hours_held:
        money = f"; ${price * sched.gpu_hours_held:,.0f} at ${price:g}/GPU-hour" if price else ""
        out.append(
            f"  GPU-hours: {sched.gpu_hours_held:,.1f} held ({sched.gpu_hours_busy:,.1f} busy){money}"
        )
    return "\n".join(out)


def slots(spec: Spec, workers: int | None, worker_cpus: float, worker_gpus: float) -> int:
    """Trials at once: on `workers` nodes of the given size, or on this machine (None); 0 if a
    trial's request does not fit one node."""
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    if workers is None:
        workers, worker_cpus = 1, os.cpu_count() or 1
        worker_gpus = torch.cuda.device_count()
    per = worker_cpus / cpu if cpu else math.inf
    if gpu:
        per = min(per, worker_gpus / gpu)
    return int(per + 1e-9) * workers


# ---------------------------------------------------------------- the paper-scale plans

A10G = (
    "an A10G at 30 % of its 31.2 TFLOPS FP32 peak (NVIDIA A10 datasheet; 30 % sustained is our "
    "assumption), FP64 at 1/64 of FP32 (GA102)"
)
A100 = (
    "an A100 80 GB at 30 % of its 312 TFLOPS BF16 peak (NVIDIA A100 datasheet; 30 % is our "
    "assumption), FP64 at 1/2 of FP32"
)


@dataclass(frozen=True)
class Assumed:
    """How a paper-scale spec is planned in docs/plans.md until bench/gpu.py has measured it."""

    workers: int
    worker_cpus: float
    worker_gpus: float
    tflops: float  # sustained, per GPU
    fp64: float
    price: float  # USD per GPU-hour
    hardware: str


G5 = Assumed(
    8,
    4,
    1,
    0.3 * 31.2,
    1 / 64,
    1.006,
    f"cluster.yaml's 8 g5.xlarge workers: {A10G}; "
    "$1.006 per hour (g5.xlarge on demand, us-west-2; spot is cheaper)",
)
PAPER_PLANS = {
    **{
        f"search_spaces/cifar10_resnet18_{attack}.yaml": G5
        for attack in (
            "gaussian",
            "backdoor",
            "gradient_canceling",
            "gradient_matching",
            "label_flip",
            "linear",
        )
    },
    # GPT-2 medium at 512 tokens needs more than an A10G's 24 GB (see its memory line).
    "search_spaces/imdb_gpt2_gaussian.yaml": Assumed(
        8,
        12,
        1,
        0.3 * 312,
        0.5,
        4.0,
        f"8 workers of 12 CPUs and {A100}; $4 per GPU-hour (an assumption)",
    ),
}


def paper_plans() -> tuple[str, str]:
    """docs/plans.md (`raysweep plan` of every shipped paper-scale spec, with its assumptions)
    and its summary table, which docs/cluster.md shows."""
    from raysweep.experiment.spec import load

    table = [
        "| spec | tuning runs (rows) | confirm runs, at most | trainings | compute "
        "| peak memory per trial | wall time | GPU-hours | cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sections = []
    for path, a in PAPER_PLANS.items():
        spec = load(path)
        p = make(spec)
        rate = from_tflops(p, a.tflops, a.fp64, f"assumed: {a.tflops:.3g} TFLOP/s per GPU")
        n = slots(spec, a.workers, a.worker_cpus, a.worker_gpus)
        sched = schedule(p, rate, n, a.workers, a.worker_gpus)
        cmd = (
            f"raysweep plan {path} --workers {a.workers} --worker-cpus {a.worker_cpus:g} "
            f"--worker-gpus {a.worker_gpus:g} --tflops {a.tflops:.3g} --fp64 {a.fp64:.3g} "
            f"--price {a.price:g}"
        )
        sections += ["", f"## {spec.name}", "", f"Assumed: {a.hardware}.", "", "```", f"$ {cmd}"]
        sections += [render(p, rate, sched, a.price), "```"]
        c = p.counts
        units = sum(w.units for lines in p.phases.values() for w in lines)
        flop = sum(w.flops for lines in p.phases.values() for w in lines)
        table.append(
            f"| [`{spec.name}`](#{spec.name}) | {c.tuning_runs:,} ({c.tuning_rows:,}) "
            f"| {c.confirm_runs:,} | {sum(c.trainings.values())} "
            f"| {_n(units)} units, {_n(flop)}FLOP | {_n(p.footprint.peak)}B "
            f"| {_duration(sched.wall_s)} on {a.workers} workers ({sched.slots} trials at once) "
            f"| {sched.gpu_hours_held:,.0f} | ${a.price * sched.gpu_hours_held:,.0f} |"
        )
    intro = (
        "Generated by `python -m raysweep.runner.plan > docs/plans.md` (tests/test_plan.py checks it is "
        "current). Counts, units, FLOPs and memory come from the code; wall time, GPU-hours and "
        "dollars from the throughput each section assumes, until `bench/gpu.py` has measured "
        "it on a GPU (`raysweep plan` then reads bench/throughput.json instead). Crafting loops "
        "(gradient matching, gradient canceling) are not counted; their surrogates are."
    )
    summary = "\n".join(table)
    doc = "\n".join(["# Plans of the paper-scale specs", "", intro, "", summary, *sections])
    return doc + "\n", summary


if __name__ == "__main__":
    print(paper_plans()[0], end="")
