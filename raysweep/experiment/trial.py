"""One trial, top to bottom: checkpoints -> unlearn under the meter -> measure -> one row.

`run_trial` needs no Ray: `run_trial(spec, store, method, budget, params, number, report=rows.append)`
runs one trial in-process. The sweep calls the same function inside Ray Tune.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from raysweep.base.storage import Store, open_store
from raysweep.poisoning.attacks import ATTACKS
from raysweep.poisoning.poisoned import Poisoned, from_tensors, to_tensors
from raysweep.poisoning.records import RECORDS
from raysweep.science.budget import Meter, train_cost
from raysweep.science.data import DATASETS, Split
from raysweep.science.models import MODELS, carry_noise, noise_shape, seeded
from raysweep.science.stats import MAX_RESOLUTION, null_tests
from raysweep.science.train import autocast, train
from raysweep.unlearning.unlearners import PER_BUDGET, UNLEARNERS

from . import extractor
from .checkpoints import ensure, ensure_artifact, ensure_each, key_of
from .metrics import (
    MAX_DEGENERATE,
    OBJECTIVES,
    Probe,
    effect_units,
    margins,
    measure,
    oracle_band,
    oracle_test,
    paired_residual,
    residual_interval,
    resolution,
)
from .relearn import RELEARN_BUDGET, gaps, relearned_units
from .spec import Spec, validate


def device() -> torch.device:
    """Where trials compute. Ray exposes only the GPUs a trial was given (CUDA_VISIBLE_DEVICES,
    set before the trial runs), so any visible GPU is this trial's."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def derive_seed(*parts) -> int:
    """A 63-bit seed from any labels, so each random stream is independent and reproducible."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rng(*parts) -> torch.Generator:
    """The random stream named by these labels (`derive_seed`): every draw of a trial has its own."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def _kwargs(section: dict) -> dict:
    return {k: v for k, v in section.items() if k != "name"}


@dataclass(frozen=True)
class Setup:
    """What every trial of one (spec, seed) shares: data, poisons, both checkpoints, their metrics."""

    split: Split
    poisoned: Poisoned
    probe: Probe
    c_train: float
    poisoned_key: str
    retrain_key: str
    poisoned_state: dict
    before: dict  # metrics of the poisoned model
    retrain: dict  # metrics of the retrain reference
    before_units: dict[str, torch.Tensor]  # per split, the units the effect E is the mean of
    retrain_units: dict[str, torch.Tensor]
    attack_ok: bool  # the attack worked, and well enough to resolve r (metrics.resolution)
    resolution: float
    retrain_state: dict  # for the relearning probe (relearn.py), on confirm rows
    # Retrain oracles (confirm seeds of a spec with confirm.oracles; `oracles`): their (K, n)
    # test margins (metrics.margins), and the columns every row of the seed shares.
    oracle_margins: torch.Tensor | None = None
    oracle_columns: dict = dataclasses.field(default_factory=dict)


def build_model(
    spec: Spec,
    split: Split,
    init: torch.Generator | None = None,
    poisoned: Poisoned | None = None,
    weights: dict | None = None,
) -> torch.nn.Module:
    """The spec's model; freshly initialised from `init` (or left to be loaded from a state dict).

    With `poisoned`, a model that adds the Gaussian noise itself (text) gets it, so the poisoned
    rows of S_corr reach it as they were trained on. A linear model's frozen extractor gets
    `weights` (from `extractor_state`).
    """
    cfg = spec.model
    fn = MODELS[cfg["name"]]
    build = lambda: fn(split.input_shape, split.num_classes, **_kwargs(cfg))
    model = seeded(build, init) if init is not None else build()
    if weights is not None:
        extractor.load(model, weights)
    return carry_noise(model, poisoned.noise if poisoned is not None else None)


def extractor_state(spec: Spec, store: Store, split: Split, seed: int) -> dict | None:
    """A linear model's extractor (raysweep/extractor.py), trained on the clean train set once
    per key; None for every other model."""
    cfg = extractor.config(spec, split, seed)
    if cfg is None:
        return None
    init, stream = rng(seed, "extractor", "init"), rng(seed, "extractor")
    return ensure(store, cfg, lambda: extractor.fit(spec, split, init, stream, device()))


def _forget_retain(poisoned: Poisoned, known_fraction: float, seed: int):
    """S_f = the known poisons (all, or a random fraction: partial discovery); S_r = the rest."""
    n_known = max(1, round(known_fraction * len(poisoned.poison_idx)))
    pick = torch.randperm(len(poisoned.poison_idx), generator=rng(seed, "known"))[:n_known]
    known = poisoned.poison_idx[pick.sort().values]
    is_forget = torch.zeros(len(poisoned.y), dtype=torch.bool)
    is_forget[known] = True
    forget = (poisoned.x[is_forget], poisoned.y[is_forget])
    return forget, (poisoned.x[~is_forget], poisoned.y[~is_forget])


def checkpoint_config(spec: Spec, split: Split, seed: int, role: str) -> dict:
    """Everything that determines a checkpoint's weights: its content-hash key is computed from this."""
    return {
        "role": role,
        "dataset": spec.dataset,
        "data": split.source,
        "model": spec.model,
        "attack": spec.attack,
        "train": spec.raw["train"],  # as written, defaults not filled: keys stay as they were
        "seed": seed,
    }


def poison(
    spec: Spec, store: Store, split: Split, seed: int, weights: dict | None = None
) -> Poisoned:
    """The spec's poisons for `seed`: crafted once per store, then loaded by every process.

    Optimised attacks (a surrogate plus hundreds of crafting steps) can cost more than training,
    and GPU kernels are not bit-reproducible, so two workers crafting independently could hold
    different poisons while sharing one checkpoint. Stored as poisons/<key>/ (checkpoints.py).
    """
    cfg = {"role": "poisons", "dataset": spec.dataset, "data": split.source, "attack": spec.attack}
    # noise_shape: text models decide where the Gaussian noise lives (their embedding width).
    cfg |= {"seed": seed, "noise_shape": list(split.noise_shape) if split.noise_shape else None}
    fn = ATTACKS[spec.attack["name"]]
    # An optimised attack on a linear model crafts against its frozen extractor (which the
    # attacker knows: the fine-tuning threat model); its poisons then depend on that extractor.
    through = weights is not None and "extractor" in inspect.signature(fn).parameters
    if through:
        cfg["extractor"] = extractor.settings(spec)

    def craft():
        # On the trial's device: a CIFAR-10 ResNet-18 surrogate alone would take hours on a CPU.
        # Random draws come from the CPU generator, so only float rounding depends on the
        # device, and the store keeps the one copy everyone uses.
        extra = {}
        if through:
            model = build_model(spec, split, weights=weights)
            extra["extractor"] = extractor.frozen(model.to(device()))
        crafted = fn(moved(split, device()), rng(seed, "attack"), **extra, **_kwargs(spec.attack))
        tensors, scalars = to_tensors(moved(crafted, torch.device("cpu")), split)
        return tensors, {"scalars": scalars}

    tensors, meta = ensure_artifact(store, "poisons", cfg, craft)
    return from_tensors(split, tensors, meta["scalars"])


@functools.lru_cache(maxsize=4)
def prepare(spec_json: str, store_uri: str, seed: int) -> Setup:
    """Load data, poison it, train-or-load both checkpoints and measure them (cached per process)."""
    spec, store = validate(json.loads(spec_json), "<trial>"), open_store(store_uri)
    split = DATASETS[spec.dataset["name"]](**_kwargs(spec.dataset))
    with torch.device("meta"):  # only shapes: where the model wants the Gaussian noise
        shape = noise_shape(build_model(spec, split), split.input_shape)
    split = dataclasses.replace(split, noise_shape=shape)
    weights = extractor_state(spec, store, split, seed)  # a linear model's extractor, or None
    poisoned = poison(spec, store, split, seed, weights)
    # Splitting runs on the CPU (crafting on the device, inside `poison`); everything after
    # runs where the trial was placed.
    poisoned = moved(poisoned, device())
    split = moved(split, device())
    forget, retain = _forget_retain(poisoned, spec.forget.known_fraction, seed)
    epochs = spec.train.epochs

    def fit(x, y, role):
        model = lambda: build_model(spec, split, rng(seed, role, "init"), poisoned, weights)
        return lambda: train(model().to(device()), x, y, rng(seed, role), **spec.train.kwargs())

    cfg_p, cfg_r = (
        checkpoint_config(spec, split, seed, "poisoned"),
        checkpoint_config(spec, split, seed, "retrain"),
    )
    clean = poisoned.without_poisons()
    oracle_roles = [oracle_role(j) for j in range(oracles(spec, seed))]
    # One pass, so that processes preparing the same seed at once share out its trainings
    # (checkpoints.ensure_each) instead of all waiting on the first.
    state_p, state_r, *oracle_states = ensure_each(
        store,
        [
            (cfg_p, fit(poisoned.x, poisoned.y, "poisoned")),
            (cfg_r, fit(*clean, "retrain")),
            *(
                (checkpoint_config(spec, split, seed, role), fit(*clean, role))
                for role in oracle_roles
            ),
        ],
    )
    noise = poisoned.noise
    probe = Probe(
        split.x_val,
        split.y_val,
        split.x_test,
        split.y_test,
        forget,
        retain,
        poisoned,
        x_clean_poison=split.x_train[poisoned.poison_idx],
        control_noise=None
        if noise is None
        else poisoned.eps * torch.randn(noise.shape, generator=rng(seed, "control")).to(device()),
    )
    attack = spec.attack["name"]
    model_p = _loaded(spec, split, poisoned, state_p)
    model_r = _loaded(spec, split, poisoned, state_r)
    (before, units_p), (after_retrain, units_r) = (
        measure(model_p, probe, attack),
        measure(model_r, probe, attack),
    )
    # Judged on val, as tuning reads it; one fixed bootstrap stream per seed.
    res = resolution(units_p["val"], units_r["val"], rng(seed, "resolution"))
    worked = RECORDS[attack].check.worked(before, after_retrain) and res <= MAX_RESOLUTION
    c_train = train_cost(epochs, len(poisoned.y))
    judged = {}
    if oracle_states:
        judged = oracle_reference(
            spec, split, poisoned, probe, oracle_states, (model_p, model_r), (units_p, units_r)
        )
    return Setup(
        split,
        poisoned,
        probe,
        c_train,
        key_of(cfg_p),
        key_of(cfg_r),
        state_p,
        before,
        after_retrain,
        units_p,
        units_r,
        worked,
        res,
        state_r,
        **judged,
    )


def oracles(spec: Spec, seed: int) -> int:
    """How many retrain oracles `seed` gets: confirm.oracles on confirm seeds, none otherwise
    (tuning reads r against the one retrain reference; the oracles judge the confirm rows)."""
    return spec.confirm.oracles if seed in spec.confirm.seeds else 0


def oracle_role(j: int) -> str:
    """Oracle j's checkpoint role: its key, initialisation and batch order are its own."""
    return f"retrain_oracle_{j}"


def oracle_reference(
    spec: Spec,
    split: Split,
    poisoned: Poisoned,
    probe: Probe,
    states: list[dict],
    models: tuple[torch.nn.Module, torch.nn.Module],
    units: tuple[dict, dict],
) -> dict:
    """Setup's oracle fields from the oracles' state dicts: their test margins, and the columns
    every row of the seed shares: K, r's band where retraining lands (metrics.oracle_band), and
    the poisoned and retrain models judged as the unlearned one will be (a control per seed: the
    poisoned model should stand out, the retrain reference should not). `models` and `units`:
    the poisoned and the retrain model, and their effect units per split."""
    attack = spec.attack["name"]
    loaded = [_loaded(spec, split, poisoned, state) for state in states]
    stacked = torch.stack([margins(m, probe, attack) for m in loaded])
    effects = [effect_units(m, probe, attack)["test"].double().cpu() for m in loaded]
    lo, hi = oracle_band(units[0]["test"], effects, units[1]["test"])
    columns = {"oracles": len(states), "oracle_r_lo": lo, "oracle_r_hi": hi}
    for name, model in zip(("before", "retrain"), models):
        judged = oracle_test(margins(model, probe, attack), stacked)
        columns |= {f"{name}_{k}": v for k, v in judged.items()}
    return {"oracle_margins": stacked, "oracle_columns": columns}


def stored_scores(spec: Spec, units: dict[str, torch.Tensor]) -> list[float] | None:
    """The per-poison scores I_i behind gus (None without Gaussian noise), kept in the row so
    the report can draw the paper's Figure 6 from the Parquet rows alone; NaN = degenerate."""
    return (-units["test"]).tolist() if RECORDS[spec.attack["name"]].scores else None


def infeasible_reason(
    spec: Spec, retrain: dict, after: dict, n_poisons: int, split: str
) -> str | None:
    """Why an unlearned model cannot count as a result on `split` (None if it can): every reason
    that applies, joined by "; ": it lost more clean accuracy than delta allows, too many of its
    poison scores carry no information."""
    acc, ref = after[f"clean_acc_{split}"], retrain[f"clean_acc_{split}"]
    degenerate = after.get("gus_degenerate", 0.0)
    reasons = [
        f"clean_acc_{split} {acc:.3f} < retrain's {ref:.3f} - delta {spec.delta:g}"
        if acc < ref - spec.delta
        else None,
        f"{degenerate:.0f} of {n_poisons} poison gradients are zero or non-finite "
        f"(more than {MAX_DEGENERATE:.0%}): the Gaussian score cannot see the noise"
        if degenerate > MAX_DEGENERATE * n_poisons
        else None,
    ]
    return "; ".join(r for r in reasons if r) or None


def unresolved_widened(
    lo: float, hi: float, r: float, attack_ok: bool, resolution: float
) -> tuple[float, float]:
    """r's interval as a row reports it: the paired bootstrap's (lo, hi) where the seed's attack
    worked and resolves r (`attack_ok`), else at least r +- resolution * max(1, |r|) (+-inf when
    the poisoned model shows no effect): r is unresolved there, and no interval may say more.

    The bootstrap's half-width depends on r (near r = 1 the unlearned model's units move with the
    poisoned model's and the noise cancels; far outside [0, 1] it grows with |r|), so on a seed
    whose gap E_before - E_retrain is barely resolved it can still look narrow; resolution, the
    gap's own relative half-width, bounds what that seed can tell apart, and scales with r as
    the gap divides it.
    """
    if attack_ok:
        return lo, hi
    half = resolution * max(1.0, abs(r))
    return float(np.fmin(lo, r - half)), float(np.fmax(hi, r + half))


def _loaded(spec: Spec, split: Split, poisoned: Poisoned, state: dict) -> torch.nn.Module:
    model = build_model(spec, split, poisoned=poisoned)
    model.load_state_dict(state)
    return model.to(device()).eval()


def moved(obj, device: torch.device):
    """A copy of a frozen dataclass with every tensor field on `device`."""
    tensors = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    moved = {k: v.to(device) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    return dataclasses.replace(obj, **moved)


def run_trial(
    spec: Spec,
    store: Store,
    method: str,
    budget: float,
    params: dict,
    number: int,
    report: Callable[[dict], None],
    seed: int | None = None,
    stops: tuple[float, ...] = (),
    relearn: bool = False,
) -> dict:
    """Unlearn the poisoned model with one method and setting, measure it, report one row.

    `stops`: smaller budgets at which the same run is also measured (anytime budgets), each
    reported as a row of its own before the final one; only for methods outside PER_BUDGET.
    `relearn`: the final row also carries the relearning probe's columns (`relearn_columns`).
    """
    started = time.time()
    seed = spec.seed if seed is None else seed
    setup = prepare(json.dumps(spec.raw, sort_keys=True), store.uri, seed)
    stops = sorted(b for b in stops if b < budget)
    if stops and method in PER_BUDGET:
        raise ValueError(f"{method}: its runs are not prefixes of longer ones (PER_BUDGET)")

    model = _loaded(spec, setup.split, setup.poisoned, setup.poisoned_state)
    row = functools.partial(_row, spec, setup, model, method, number, seed, started)

    by_units = {b * setup.c_train: b for b in stops}

    def at_stop(units: float) -> None:
        # Measured as the final model is (eval mode, no autocast), then put back as it was.
        modes = {m: m.training for m in model.modules()}
        with torch.autocast(device().type, enabled=False), torch.enable_grad():
            report(row(by_units[units], meter.used))
        for m, training in modes.items():
            m.train(training)

    meter = Meter(budget * setup.c_train, tuple(by_units), at_stop)
    # A prefix method's stream does not depend on its budget: its run to a stop is the
    # shorter run, bit for bit (tests/test_anytime.py).
    per_budget = (budget,) if method in PER_BUDGET else ()
    gen = rng(seed, method, *per_budget, number)
    with autocast(spec.train.precision, model):  # as the model was trained
        UNLEARNERS[method](model, setup.probe.forget, setup.probe.retain, meter, gen, **params)
    meter.finish()
    final = row(budget, meter.used)
    if relearn:  # after the row is measured, on copies: the row's own numbers stay as they are
        final |= relearn_columns(spec, store, setup, model, seed)
    report(final)
    return final


def relearn_seed(seed: int) -> int:
    """The relearning probe's stream: one per seed, so every row of a seed and its retrain
    reference are probed with the same sets and batches (relearn.relearned_units)."""
    return derive_seed(seed, "relearn")


@functools.lru_cache(maxsize=4)
def retrain_relearned(spec_json: str, store_uri: str, seed: int) -> dict[str, torch.Tensor]:
    """The retrain reference's probed units: the same for every row of a seed, so once per process."""
    spec, setup = validate(json.loads(spec_json), "<trial>"), prepare(spec_json, store_uri, seed)
    model = _loaded(spec, setup.split, setup.poisoned, setup.retrain_state)
    return probed(spec, setup, model, seed)


def probed(spec: Spec, setup: Setup, model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """`model`'s effect units after each relearning probe, at RELEARN_BUDGET x C_train units."""
    precision = spec.train.precision  # fine-tuned as it was trained
    cap = RELEARN_BUDGET * setup.c_train
    return relearned_units(
        model, setup.probe, spec.attack["name"], cap, relearn_seed(seed), precision
    )


def relearn_columns(
    spec: Spec, store: Store, setup: Setup, model: torch.nn.Module, seed: int
) -> dict:
    """The relearning probe's columns for the unlearned `model` (relearn.py): its relearn_gap per
    probe against the retrain reference's, and the seconds the probe took here."""
    started = time.time()
    reference = retrain_relearned(json.dumps(spec.raw, sort_keys=True), store.uri, seed)
    after = probed(spec, setup, model, seed)
    out = gaps(after, reference, rng(seed, "relearn", "bootstrap"))
    return out | {"relearn_wall_s": time.time() - started}


def _row(spec, setup, model, method, number, seed, started, budget, used) -> dict:
    """Measure `model` as the result of a run at `budget` that spent `used` units: one row."""
    after, units = measure(model.eval(), setup.probe, spec.attack["name"])
    # On the units all three models score (metrics.paired): one rule for degenerate poisons.
    r_val, r_test = (
        paired_residual(setup.before_units[s], units[s], setup.retrain_units[s])
        for s in ("val", "test")
    )
    # r is NaN, not an error, when the attack had no effect (E_before = E_retrain): that trial
    # is kept and marked by attack_ok. Non-finite weights mean divergence: a failed trial. (A
    # finite but dead model is a row, infeasible: its poison scores are degenerate.)
    finite = all(
        torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point()
    )
    if not (finite and math.isfinite(after["clean_acc_val"])):
        raise FloatingPointError(f"{method}: non-finite result; the model diverged")
    r_lo, r_hi = residual_interval(
        setup.before_units["test"],
        units["test"],
        setup.retrain_units["test"],
        rng(seed, method, budget, number, "bootstrap"),
    )
    r_lo, r_hi = unresolved_widened(r_lo, r_hi, r_test, setup.attack_ok, setup.resolution)
    # Feasible on val decides tuning; feasible on test decides what the report averages, so
    # neither reads the other's split.
    reasons = {
        split: infeasible_reason(spec, setup.retrain, after, len(setup.poisoned.poison_idx), split)
        for split in ("val", "test")
    }
    shortfall = setup.retrain["clean_acc_val"] - spec.delta - after["clean_acc_val"]
    row = {
        "seed": seed,
        "poisoned_key": setup.poisoned_key,
        "retrain_key": setup.retrain_key,
        "budget": budget,
        "budget_used": used / (budget * setup.c_train),
        "budget_units": used,
        "residual_val": r_val,
        "residual": r_test,
        "residual_lo": r_lo,
        "residual_hi": r_hi,
        "attack_ok": setup.attack_ok,
        "resolution": setup.resolution,
        "feasible": reasons["val"] is None,
        "feasible_test": reasons["test"] is None,
        "infeasible_reason": "; ".join(dict.fromkeys(r for r in reasons.values() if r)) or None,
        "objective": objective(spec, r_val, units["val"], shortfall, reasons["val"] is None),
        # the smallest change in it this run can tell apart (the convergence rule's threshold)
        "objective_noise": OBJECTIVES[spec.objective].noise(
            setup.resolution, units["val"], rng(seed, method, budget, number, "objective_noise")
        ),
        "wall_s": time.time() - started,
        **{f"before_{k}": v for k, v in setup.before.items()},
        **{f"after_{k}": v for k, v in after.items()},
        **{f"retrain_{k}": v for k, v in setup.retrain.items()},
        "before_scores": stored_scores(spec, setup.before_units),
        "after_scores": stored_scores(spec, units),
        "retrain_scores": stored_scores(spec, setup.retrain_units),
    }
    if row["after_scores"] is not None:  # the per-poison tests need the Gaussian scores
        row |= null_tests(np.asarray(row["after_scores"]), np.asarray(row["retrain_scores"]))
    if setup.oracle_margins is not None:  # judged against the retrain oracles, unit by unit
        own = margins(model, setup.probe, spec.attack["name"])
        row |= setup.oracle_columns | oracle_test(own, setup.oracle_margins)
    return row


def objective(
    spec: Spec, r_val: float, units_val: torch.Tensor, shortfall: float, feasible: bool
) -> float:
    """Minimise the spec's objective on val (metrics.OBJECTIVES: |r| unless it says otherwise)
    subject to clean_acc_val >= retrain's - delta (docs/design.md §5).

    |r|, not r: overshooting the retrain reference (r < 0, e.g. a Gaussian score pushed positive)
    leaves a detectable trace too, and "better than retraining" is not what unlearning promises.
    anderson_darling sees that overshoot and, beyond it, a few poisons still memorised in a tail
    that |r| averages away. An infeasible trial scores 10 + its accuracy shortfall (at least 0):
    worse than any feasible trial below 10 (|r| = 1 already means nothing was removed; the
    poisoned model's Anderson-Darling distance is about 0.5), and graded so the sampler can climb
    out. A model with too many degenerate poison scores is infeasible however accurate.
    """
    if not feasible:
        return 10.0 + max(shortfall, 0.0)
    return OBJECTIVES[spec.objective].value(r_val, units_val)
