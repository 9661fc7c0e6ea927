"""Results: one Parquet file per trial under <storage>/<experiment>/results/, one fixed schema.

Every file of a run has the same schema (all methods' hyperparameters are columns, null where a
method lacks them), so `pandas.read_parquet("<storage>/<experiment>/results")` reads the whole
run. Each file is written atomically under a name fixed by (phase, cell, trial number), so a
re-run of the same trial replaces its row instead of duplicating it.
"""

from __future__ import annotations

import io
import json
import platform
from importlib.metadata import version

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .spec import Spec, distributions
from .storage import Store

# Metrics measured on each of the three models; columns are before_<m>, after_<m>, retrain_<m>.
METRICS = {
    "clean_acc_val": "accuracy on the val split (tuning reads this)",
    "clean_acc_test": "accuracy on the test split (reports read this)",
    "retain_acc": "accuracy on the retain set",
    "forget_acc": "accuracy on the forget set (as trained on)",
    "gus": "Gaussian Unlearning Score: mean of I over the poisons",
    "gus_z": "gus * sqrt(n); N(0,1) if the model never saw the noise",
    "gus_p": "two-sided p-value of gus_z",
    "tpr_at_1fpr": "Gaussian MIA: fraction of poisons with I <= Phi^-1(0.01)",
    "control_gus_z": "gus_z of fresh noise never trained on (must look N(0,1))",
    "loss_mia_tpr": "loss-threshold MIA: TPR on the forget set at 1% FPR on test",
    "target_adv_rate": "gradient_matching: fraction of its target test rows classified as y_adv",
    "backdoor_asr_val": "backdoor: triggered val rows not of class y_adv classified as y_adv",
    "backdoor_asr_test": "backdoor: the same on test",
    "effect_val": "the attack's effect E on val (higher = stronger poison; metrics.EFFECTS): "
    "-gus (gaussian), target_adv_rate (gradient_matching), 1 - clean_acc_val "
    "(gradient_canceling, label_flip), backdoor_asr_val (backdoor)",
    "effect_test": "the attack's effect E on test (target_adv_rate is the same on both splits)",
}
MODELS_MEASURED = ("before", "after", "retrain")

COLUMNS = {
    "experiment": pa.string(),
    "spec_name": pa.string(),
    "spec_hash": pa.string(),
    "phase": pa.string(),
    "cell": pa.string(),
    "trial_number": pa.int64(),
    "attack": pa.string(),
    "method": pa.string(),
    "budget": pa.float64(),
    "seed": pa.int64(),
    "status": pa.string(),
    "error": pa.string(),
    "poisoned_key": pa.string(),
    "retrain_key": pa.string(),
    "attack_ok": pa.bool_(),
    "feasible": pa.bool_(),
    "objective": pa.float64(),
    "residual_val": pa.float64(),
    "residual": pa.float64(),
    "budget_used": pa.float64(),
    "budget_units": pa.float64(),
    "wall_s": pa.float64(),
    "started_at": pa.timestamp("ms", tz="UTC"),
    "finished_at": pa.timestamp("ms", tz="UTC"),
    "host": pa.string(),
    "versions": pa.string(),
}


def hyperparameter_types(spec: Spec) -> dict[str, pa.DataType]:
    """hp_<name> columns for the union of all methods' hyperparameters in the spec."""
    types: dict[str, pa.DataType] = {}
    for method, space in spec.methods.items():
        dists, fixed = distributions(method, space)
        for name, value in {**fixed, **{k: d for k, d in dists.items()}}.items():
            sample = value.choices[0] if hasattr(value, "choices") else getattr(value, "low", value)
            types[f"hp_{name}"] = _arrow_type(sample)
    return dict(sorted(types.items()))


def _arrow_type(value) -> pa.DataType:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()


def schema(spec: Spec) -> pa.Schema:
    metric_cols = {f"{m}_{k}": pa.float64() for m in MODELS_MEASURED for k in METRICS}
    return pa.schema({**COLUMNS, **hyperparameter_types(spec), **metric_cols})


def versions() -> str:
    names = ("raysweep", "torch", "ray", "optuna", "pyarrow")
    return json.dumps({n: version(n) for n in names} | {"python": platform.python_version()})


def row_name(experiment: str, phase: str, cell: str, number: int) -> str:
    return f"{experiment}/results/{phase}-{cell}-{number:04d}.parquet"


def write_row(store: Store, spec: Spec, row: dict) -> str:
    """Write one trial's row atomically; returns its path relative to the store."""
    table = pa.Table.from_pylist([row], schema=schema(spec))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    name = row_name(row["experiment"], row["phase"], row["cell"], row["trial_number"])
    store.write(name, buf.getvalue())
    return name


def read(store: Store, experiment: str) -> pd.DataFrame:
    """All rows of an experiment (empty frame if none)."""
    names = [n for n in store.list(f"{experiment}/results") if n.endswith(".parquet")]
    if not names:
        return pd.DataFrame()
    paths = [store.path(f"{experiment}/results/{n}") for n in names]
    return pq.read_table(paths, filesystem=store.fs).to_pandas()


def best_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    """The best ok trial of each (attack, method, budget): lowest objective, feasible first."""
    ok = df[df["status"] == "ok"].sort_values(["feasible", "objective"], ascending=[False, True])
    return ok.groupby(["attack", "method", "budget"], sort=True).head(1)


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The run's summary: poisoned and retrain references, then the best trial per cell (test split)."""
    cols = {
        "clean_acc_test": "clean_acc",
        "gus": "gus",
        "gus_z": "gus_z",
        "tpr_at_1fpr": "tpr_at_1fpr",
    }
    cols |= {"loss_mia_tpr": "loss_mia_tpr"}
    ok = df[df["status"] == "ok"]
    refs = []
    for label, prefix in (("poisoned", "before"), ("retrain", "retrain")):
        ref = {"method": label, "budget": None, "trials": None, "failed": None}
        ref |= {v: ok[f"{prefix}_{k}"].iloc[0] if len(ok) else None for k, v in cols.items()}
        ref |= {"residual": 1.0 if label == "poisoned" else 0.0}
        refs.append(ref)
    rows = []
    counts = df.groupby(["method", "budget"])["status"]
    for _, best in best_per_cell(df).iterrows():
        key = (best["method"], best["budget"])
        row = {"method": best["method"], "budget": best["budget"]}
        row |= {"trials": counts.size()[key], "failed": (counts.get_group(key) != "ok").sum()}
        row |= {v: best[f"after_{k}"] for k, v in cols.items()}
        row |= {"residual": best["residual"], "feasible": best["feasible"]}
        rows.append(row)
    return pd.DataFrame(refs + rows)
