"""The paper's §6 mechanism study, on a `linear` spec's frozen features (one table of rows).

H1: logistic regression fitted to its optimum moves further (ℓ1) when a fraction β of the
poisons is removed than when as many random clean rows are. H2: on ridge regression over the
same features, gradient descent on the rows that stay (the retain set) heads almost orthogonally
to the shift that removing the poisons requires. Each seed is the trial's own setup (fresh
poisons, fresh extractor); `study` returns one row per seed × hypothesis × kind × β or step.
"""

from __future__ import annotations

import functools
import io
import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raysweep.base.storage import Store, open_store
from raysweep.experiment import extractor, trial
from raysweep.experiment.spec import Spec, SpecError
from raysweep.reporting.plotstyle import mean_std
from raysweep.science.models import chunked
from raysweep.unlearning import softmax

BETAS = tuple(i / 10 for i in range(11))  # fractions of the poisons removed (H1)
# GD steps at which H2 measures the update (closed form, so a million costs nothing), plus the
# step counts the spec's budgets pay for (`budget_steps`).
STEPS = (1, 3, 10, 30, 100, 300, 1_000, 10_000, 100_000, 1_000_000)
GTOL = 1e-10  # the logistic fits stop at this gradient norm (float64)
COS_ORTHOGONAL = 0.3  # "nearly orthogonal": an angle above 72.5 degrees
KINDS = ("poisons", "random_clean")

COLUMNS = {
    "spec_name": (pa.string(), "the spec's name"),
    "spec_hash": (pa.string(), "the spec's content hash"),
    "seed": (pa.int64(), "the trial seed: its poisons, extractor and removal subsets"),
    "hypothesis": (pa.string(), "H1 (logistic, ℓ1 shift) or H2 (ridge, GD direction)"),
    "kind": (pa.string(), "what was removed: poisons, or as many random_clean rows"),
    "beta": (pa.float64(), "fraction of the poisons removed (H2: 1.0, all of them)"),
    "n_removed": (pa.int64(), "rows removed from S_corr (= round(beta × poisons))"),
    "n_rows": (pa.int64(), "rows of S_corr"),
    "n_params": (pa.int64(), "parameters of the linear model (classes × (features + bias))"),
    "weight_decay": (pa.float64(), "the l2 term wd/2·‖θ‖² of both objectives (train's)"),
    "step": (pa.int64(), "H2: GD steps on the remaining rows from θ(S_corr); H1: null"),
    "budget": (pa.float64(), "H2: those steps' cost as a fraction of the training compute"),
    "shift_l1": (pa.float64(), "‖θ(S_corr) − θ(S_corr minus the removed rows)‖₁ (H2: ‖Δ*‖₁)"),
    "shift_l2": (pa.float64(), "the same shift's ℓ2 norm"),
    "cosine": (pa.float64(), "H2: cosine(GD update after `step` steps, Δ*); H1: null"),
    "covered": (pa.float64(), "H2: ⟨update, Δ*⟩ / ‖Δ*‖², the part of Δ* done; H1: null"),
    "remaining": (pa.float64(), "H2: ‖θ_step − θ(removed)‖₂ / ‖Δ*‖₂, 1 = not moved; H1: null"),
    "step_size": (pa.float64(), "H2: GD's step size, 1 / the largest Hessian eigenvalue"),
    "grad_norm": (pa.float64(), "largest gradient norm of the two fits the row compares"),
    "shift_error": (pa.float64(), "bound on the shift's ℓ2 error: their gradient norms / wd"),
}
SCHEMA = pa.schema({name: kind for name, (kind, _) in COLUMNS.items()})


def _features(spec: Spec, store: Store, seed: int) -> tuple[torch.Tensor, trial.Setup]:
    """(S_corr's features through the frozen extractor plus a bias column, float64; the setup)."""
    setup = trial.prepare(json.dumps(spec.raw, sort_keys=True), store.uri, seed)
    state = trial.extractor_state(spec, store, setup.split, seed)
    model = trial.build_model(spec, setup.split, weights=state)
    body = extractor.frozen(model).double().cpu()
    # The poisoned inputs pass through the extractor, as in training; float64 a chunk at a time.
    phi = chunked(lambda x: body(x.double()), setup.poisoned.x.cpu(), 1024)
    return softmax.with_bias(phi), setup


def logistic(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, wd: float):
    """(loss, gradient, probabilities) of mean cross-entropy + wd/2·‖θ‖², θ (classes, features)
    with the bias as its last column and regularised, as train()'s weight decay does."""
    logp = torch.log_softmax(x @ theta.T, 1)
    p = logp.exp()
    loss = -logp[torch.arange(len(y)), y].mean() + wd / 2 * theta.square().sum()
    return loss, softmax.gradient(theta, x, y, p, wd), p


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, wd: float, theta: torch.Tensor, max_newton: int = 100
) -> tuple[torch.Tensor, float]:
    """Newton-CG from `theta` to the optimum of `logistic` (gradient norm ≤ GTOL); returns
    (θ, its gradient norm). CG is preconditioned by the Hessian's diagonal; Armijo backtracking."""
    for _ in range(max_newton):
        loss, grad, p = logistic(theta, x, y, wd)
        norm = float(grad.norm())
        if norm <= GTOL:
            break
        diag = (p * (1 - p)).T @ x.square() / len(y) + wd
        hessp = functools.partial(softmax.hessp, p=p, x=x, ridge=wd)
        # forcing term √‖g‖: superlinear convergence without over-solving far from the optimum
        rtol = min(0.1, math.sqrt(norm))
        step = softmax.conjugate_gradient(hessp, -grad, 10_000, rtol, diag)
        t, slope = 1.0, float((grad * step).sum())
        while logistic(theta + t * step, x, y, wd)[0] > loss + 1e-4 * t * slope and t > 1e-12:
            t /= 2
        theta = theta + t * step
    return theta, norm


def _subsets(setup: trial.Setup, seed: int) -> dict[str, torch.Tensor]:
    """Per kind, the order rows are removed in: the first k of it for any k (nested subsets)."""
    poisons = setup.poisoned.poison_idx.cpu()
    is_clean = torch.ones(len(setup.poisoned.y), dtype=torch.bool)
    is_clean[poisons] = False
    pools = {"poisons": poisons, "random_clean": is_clean.nonzero().squeeze(1)}
    if len(pools["random_clean"]) < len(poisons):
        raise SpecError(
            f"mechanism: {len(poisons)} poisons but only {len(pools['random_clean'])} clean rows; "
            "the baseline removes as many clean rows as poisons (lower attack.n)"
        )
    return {
        kind: rows[torch.randperm(len(rows), generator=trial.rng(seed, "mechanism", kind))]
        for kind, rows in pools.items()
    }


def _keep(n: int, removed: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return keep


def h1_rows(x: torch.Tensor, y: torch.Tensor, subsets: dict, wd: float, betas=BETAS) -> list[dict]:
    """H1: ℓ1 shift of the logistic optimum when each β of the poisons (or as many random clean
    rows) is removed, refitted from θ(S_corr)."""
    full, full_norm = fit_logistic(x, y, wd, torch.zeros(int(y.max()) + 1, x.shape[1], **_f64))
    n_poisons, rows = len(subsets["poisons"]), []
    for kind, order in subsets.items():
        for beta in betas:
            k = round(beta * n_poisons)
            keep = _keep(len(y), order[:k])
            theta, norm = fit_logistic(x[keep], y[keep], wd, full)
            shift = theta - full
            rows.append(
                _row("H1", kind, beta, k, y, theta, wd, shift, (full_norm, norm), step=None)
            )
    return rows


_f64 = {"dtype": torch.float64}


def _ridge(x: torch.Tensor, y: torch.Tensor, wd: float, classes: int):
    """(Hessian, θ) of ridge least squares on one-hot targets: mean ½‖θᵀx − e_y‖² + wd/2·‖θ‖²."""
    hess = x.T @ x / len(y) + wd * torch.eye(x.shape[1], **_f64)
    rhs = x.T @ torch.nn.functional.one_hot(y, classes).double() / len(y)
    return hess, torch.linalg.solve(hess, rhs), rhs


def h2_rows(
    x: torch.Tensor, y: torch.Tensor, subsets: dict, wd: float, budget_steps: dict[int, float]
) -> list[dict]:
    """H2: cosine between the update gradient descent on the remaining rows makes from
    θ(S_corr) after k steps and the shift Δ* = θ(remaining) − θ(S_corr) it would need.

    The objective is quadratic, so after k steps of size η the update is exactly
    Q diag(1 − (1 − ηλ)^k) Qᵀ Δ* (H = QΛQᵀ, the remaining rows' Hessian): no loop over steps.
    """
    classes, n_poisons, rows = int(y.max()) + 1, len(subsets["poisons"]), []
    hess_full, full, rhs_full = _ridge(x, y, wd, classes)
    for kind, order in subsets.items():
        keep = _keep(len(y), order[:n_poisons])
        hess, target, rhs = _ridge(x[keep], y[keep], wd, classes)
        norms = (_ridge_grad(hess_full, full, rhs_full), _ridge_grad(hess, target, rhs))
        delta = target - full
        lam, q = torch.linalg.eigh(hess)
        eta = 1 / float(lam[-1])
        along = q.T @ delta
        for k, budget in sorted(budget_steps.items()):
            update = q @ ((1 - (1 - eta * lam) ** k)[:, None] * along)
            row = _row("H2", kind, 1.0, n_poisons, y, target, wd, delta, norms, step=k)
            cos = float((update * delta).sum() / (update.norm() * delta.norm()))
            row |= {"budget": budget, "cosine": cos, "step_size": eta}
            row["covered"] = float((update * delta).sum() / delta.square().sum())
            row["remaining"] = float((delta - update).norm() / delta.norm())
            rows.append(row)
    return rows


def _ridge_grad(hess, theta, rhs) -> float:
    return float((hess @ theta - rhs).norm())


def _row(hypothesis, kind, beta, k, y, theta, wd, shift, norms, step) -> dict:
    return {
        "hypothesis": hypothesis,
        "kind": kind,
        "beta": beta,
        "n_removed": k,
        "n_rows": len(y),
        "n_params": theta.numel(),
        "weight_decay": wd,
        "step": step,
        "shift_l1": float(shift.abs().sum()),
        "shift_l2": float(shift.norm()),
        "grad_norm": max(norms),
        "shift_error": sum(norms) / wd,
    }


def weight_decay(spec: Spec) -> float:
    """The spec's l2 term (train's default if it sets none); both objectives need one > 0."""
    wd = spec.train.weight_decay
    if spec.model["name"] != "linear" or wd <= 0:
        raise SpecError(
            f"mechanism: {spec.name}: model.name is {spec.model['name']!r} and train.weight_decay "
            f"{wd}; the study needs model.name: linear (a frozen extractor) and weight_decay > 0 "
            "(an l2 term, so both objectives have one optimum)"
        )
    return float(wd)


def study(spec: Spec, storage: str, seeds: list[int], betas=BETAS) -> pd.DataFrame:
    """Both hypotheses on every seed: one row per seed × hypothesis × kind × β or step.
    `storage` holds the checkpoints (shared with `raysweep run` on the same spec)."""
    wd, store, rows = weight_decay(spec), open_store(storage), []
    for seed in seeds:
        x, setup = _features(spec, store, seed)
        y, subsets = setup.poisoned.y.cpu(), _subsets(setup, seed)
        n_retain = len(y) - len(subsets["poisons"])
        # A full-batch step on the remaining rows costs one unit per row (budget.py's unit);
        # each budget's row is the most steps it pays for; 1.0 is the whole training compute.
        paid = [max(1, math.floor(f * setup.c_train / n_retain)) for f in (*spec.budgets, 1.0)]
        budget_steps = {k: k * n_retain / setup.c_train for k in (*STEPS, *paid)}
        for row in h1_rows(x, y, subsets, wd, betas) + h2_rows(x, y, subsets, wd, budget_steps):
            rows.append({"spec_name": spec.name, "spec_hash": spec.hash, "seed": seed, **row})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def to_parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    table = pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False)
    pq.write_table(table, buf)
    return buf.getvalue()


def read(path: str) -> pd.DataFrame:
    """mechanism.parquet as written (int columns with nulls stay nullable integers)."""
    return pq.read_table(path).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def _paired(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per seed, `column` for each kind (columns poisons, random_clean), seeds in order."""
    return rows.pivot_table(index="seed", columns="kind", values=column).reindex(columns=KINDS)


def over_seeds(values: pd.Series, digits: int = 2) -> str:
    """`values`' mean ± std over the seeds (the mean alone for one seed: it has no spread)."""
    return mean_std(values.mean(), values.std(), digits)


def _status(hits: int, seeds: int) -> str:
    return "holds" if hits == seeds else "does not hold here" if hits == 0 else "is mixed"


def verdict_h1(df: pd.DataFrame) -> str:
    """H1 at the largest β, from the rows: poisons' ℓ1 shift against as many random clean rows'."""
    h1 = df[df["hypothesis"] == "H1"]
    beta = h1["beta"].max()
    shift = _paired(h1[h1["beta"] == beta], "shift_l1")
    ratio = shift["poisons"] / shift["random_clean"]
    hits, n = int((ratio > 1).sum()), len(ratio)
    removed = int(h1.loc[h1["beta"] == beta, "n_removed"].iloc[0])
    return (
        f"H1 {_status(hits, n)}: at β={beta:g} ({removed} rows removed) removing poisons shifts "
        f"θ by {over_seeds(shift['poisons'], 1)} (ℓ1) vs "
        f"{over_seeds(shift['random_clean'], 1)} for random clean rows; ratio {over_seeds(ratio, 2)}, larger for poisons on {hits} of {n} seeds"
    )


def at_budget(df: pd.DataFrame, budget: float) -> tuple[int, float]:
    """(steps, their cost as a fraction of the training compute): the most GD steps among the
    rows that fit in `budget`, what an unlearner with that budget could run; one step if even
    that costs more."""
    h2 = df[df["hypothesis"] == "H2"]
    fits = h2[h2["budget"] <= budget * (1 + 1e-9)]
    row = (fits if len(fits) else h2).sort_values("step").iloc[-1 if len(fits) else 0]
    return int(row["step"]), float(row["budget"])


def verdict_h2(df: pd.DataFrame, budget: float) -> str:
    """H2 at the steps `budget` pays for, from the rows: is the clean-data GD update nearly
    orthogonal (cosine < COS_ORTHOGONAL) to the shift that removes the poisons, and more so
    than for random clean rows?"""
    h2, (step, cost) = df[df["hypothesis"] == "H2"], at_budget(df, budget)
    first, last = (_paired(h2[h2["step"] == k], "cosine") for k in (1, step))
    orthogonal = int((last["poisons"] < COS_ORTHOGONAL).sum())
    lower = int((last["poisons"] < last["random_clean"]).sum())
    n = len(last)
    status = _status(orthogonal, n)
    if orthogonal == n and lower < n:
        status = "holds only in part (no more orthogonal than for random clean rows)"
    return (
        f"H2 {status}: cosine(clean-data GD update, shift that removes the poisons) is "
        f"{over_seeds(first['poisons'], 3)} after 1 step and {over_seeds(last['poisons'], 3)} "
        f"after {step} (they cost {cost:.1%} of the training compute; budget {budget:.0%}); for "
        f"as many random clean rows {over_seeds(first['random_clean'], 3)} and {over_seeds(last['random_clean'], 3)}; below "
        f"{COS_ORTHOGONAL} on {orthogonal} of {n} seeds, below the random-rows baseline on "
        f"{lower} of {n}"
    )
