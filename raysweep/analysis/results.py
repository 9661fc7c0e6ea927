"""Results: one Parquet file per trial under <storage>/<experiment>/results/, one fixed schema.

Every file of a run has the same schema (all methods' hyperparameters are columns, null where a
method lacks them), so `pandas.read_parquet("<storage>/<experiment>/results")` reads the whole
run. Each file is written atomically under a name fixed by (phase, cell, trial number), so a
re-run of the same trial replaces its row instead of duplicating it.
"""

from __future__ import annotations

import io
import json
import math
import platform
from importlib.metadata import version

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.base.domains import kind
from raysweep.base.storage import CorruptStorage, Store
from raysweep.experiment.metrics import MAX_RESOLUTION, NULL_ALPHA, null_tests
from raysweep.experiment.spec import Spec, domain, hyperparameter_kinds, keyword_params
from raysweep.unlearning.unlearners import UNLEARNERS

from .convergence import CELL, convergence

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
    "gus_degenerate": "poisons whose input gradient is zero or non-finite (left out of gus)",
    "control_gus_z": "gus_z of fresh noise never trained on (must look N(0,1))",
    "loss_mia_tpr": "loss-threshold MIA: TPR on the forget set at <= 1% FPR on test",
    "loss_mia_fpr": "loss-threshold MIA: its realised FPR on test (<= 0.01; ties never exceed it)",
    "target_adv_rate": "gradient_matching: fraction of its target test rows classified as y_adv",
    "backdoor_asr_val": "backdoor: triggered val rows not of class y_adv classified as y_adv",
    "backdoor_asr_test": "backdoor: the same on test",
    "effect_val": "the attack's effect E on val (higher = stronger poison; metrics.EFFECTS): "
    "-gus (gaussian), target_adv_rate (gradient_matching), 1 - clean_acc_val "
    "(gradient_canceling, label_flip), backdoor_asr_val (backdoor)",
    "effect_test": "the attack's effect E on test (target_adv_rate is the same on both splits)",
}
MODELS_MEASURED = ("before", "after", "retrain")
# Per-poison Gaussian scores I_i of each model (null for attacks without Gaussian noise).
SCORES = {f"{m}_scores": pa.list_(pa.float64()) for m in MODELS_MEASURED}

COLUMNS = {
    "experiment": pa.string(),
    "spec_name": pa.string(),
    "spec_hash": pa.string(),
    "phase": pa.string(),
    "cell": pa.string(),
    "trial_number": pa.int64(),
    "run_of": pa.string(),  # the run the row was measured in: "<cell>:<trial_number>" of its lead
    "tuned_trial": pa.int64(),  # confirm rows: the tuning trial whose setting they re-run
    "attack": pa.string(),
    "method": pa.string(),
    "budget": pa.float64(),
    "seed": pa.int64(),
    "status": pa.string(),
    "error": pa.string(),
    "poisoned_key": pa.string(),
    "retrain_key": pa.string(),
    "attack_ok": pa.bool_(),
    "resolution": pa.float64(),  # relative half-width of E_before - E_retrain's 95 % interval
    "feasible": pa.bool_(),  # on val: what tuning reads
    "feasible_test": pa.bool_(),  # on test: which runs the report averages
    "infeasible_reason": pa.string(),
    "objective": pa.float64(),
    "residual_val": pa.float64(),
    "residual": pa.float64(),
    "residual_lo": pa.float64(),  # 95 % paired-bootstrap interval of `residual`
    "residual_hi": pa.float64(),
    # The unlearned model's per-poison Gaussian scores against never having trained on the noise
    # (metrics.null_tests), as log10 p-values; null for attacks without Gaussian noise.
    "null_ks_log10p": pa.float64(),  # one-sample KS against N(0, 1)
    "null_low_log10p": pa.float64(),  # excess of scores <= Phi^-1(0.01), exact binomial
    "null_high_log10p": pa.float64(),  # excess of scores >= Phi^-1(0.99), exact binomial
    "null_retrain_log10p": pa.float64(),  # two-sample KS against the retrained model's scores
    "null_log10p": pa.float64(),  # the four combined: Bonferroni, min p x 4
    # The relearning probe (relearn.py), on confirm rows; null on tuning rows. The unlearned
    # model's effect E after a fixed fine-tune minus the retrain reference's after the same one.
    "relearn_budget": pa.float64(),  # each probe's cap per model, as a share of C_train
    "relearn_gap_retain": pa.float64(),  # fine-tuned on the retain set alone
    "relearn_gap_retain_lo": pa.float64(),  # its 95 % paired-bootstrap interval
    "relearn_gap_retain_hi": pa.float64(),
    "relearn_gap_poisons": pa.float64(),  # fine-tuned on 10 % of the poisons; scored on the rest
    "relearn_gap_poisons_lo": pa.float64(),
    "relearn_gap_poisons_hi": pa.float64(),
    "relearn_wall_s": pa.float64(),  # seconds the probe took, outside wall_s
    # Retrain oracles (confirm.oracles; metrics.oracle_test), on confirm rows; null otherwise.
    "oracles": pa.int64(),  # K: retrain models of this seed, each with its own initialisation
    "oracle_r_lo": pa.float64(),  # the least r of the K oracles: where retraining itself lands
    "oracle_r_hi": pa.float64(),  # the greatest
    "oracle_outside": pa.float64(),  # share of test units outside the oracles' [min, max] margin
    "oracle_p": pa.float64(),  # permutation p of that share among the K + 1 models, >= 1/(K+1)
    "before_oracle_outside": pa.float64(),  # the poisoned model judged the same way (a control)
    "before_oracle_p": pa.float64(),
    "retrain_oracle_outside": pa.float64(),  # the retrain reference judged the same way
    "retrain_oracle_p": pa.float64(),
    "budget_used": pa.float64(),
    "budget_units": pa.float64(),
    "wall_s": pa.float64(),
    "started_at": pa.timestamp("ms", tz="UTC"),
    "finished_at": pa.timestamp("ms", tz="UTC"),
    "host": pa.string(),
    "node_id": pa.string(),  # the Ray node: nodes of one machine or image share a hostname
    "versions": pa.string(),
}


def hyperparameter_types(spec: Spec) -> dict[str, pa.DataType]:
    """hp_<name> columns for the union of all methods' hyperparameters in the spec, each typed by
    what every method naming it declares (spec.hyperparameter_kinds), not by the spec's values."""
    kinds = hyperparameter_kinds(spec.methods, spec.source)
    return {f"hp_{name}": _arrow_type(k) for name, k in kinds.items()}


def _arrow_type(kind: type) -> pa.DataType:
    return {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}[kind]


def schema(spec: Spec) -> pa.Schema:
    metric_cols = {f"{m}_{k}": pa.float64() for m in MODELS_MEASURED for k in METRICS}
    return pa.schema({**COLUMNS, **hyperparameter_types(spec), **metric_cols, **SCORES})


def versions() -> str:
    names = ("raysweep", "torch", "ray", "optuna", "pyarrow")
    return json.dumps({n: version(n) for n in names} | {"python": platform.python_version()})


def row_name(experiment: str, phase: str, cell: str, number: int) -> str:
    return f"{experiment}/results/{phase}-{cell}-{number:04d}.parquet"


def write_row(store: Store, spec: Spec, row: dict) -> str:
    """Write one trial's row atomically; returns its path relative to the store."""
    for name, want in hyperparameter_kinds(spec.methods, spec.source).items():
        _lossless(f"hp_{name}", row.get(f"hp_{name}"), want)
    table = pa.Table.from_pylist([row], schema=schema(spec))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    name = row_name(row["experiment"], row["phase"], row["cell"], row["trial_number"])
    store.write(name, buf.getvalue())
    return name


def _lossless(column: str, value, want: type) -> None:
    """Refuse a hyperparameter that its column would change: pyarrow casts 2.9e-5 into an int64
    column as 0, silently. Validation gives every value its parameter's kind (spec.py), so this
    failing is a bug upstream, never a value to convert here."""
    boolean = isinstance(value, (bool, np.bool_))
    number = not boolean and isinstance(value, (int, float, np.integer, np.floating))
    fits = {
        bool: boolean,
        int: number and isinstance(value, (int, np.integer)) and -(2**63) <= value < 2**63,
        float: number and math.isfinite(value) and float(value) == value,
        str: isinstance(value, str),
    }[want]
    if value is not None and not fits:
        raise ValueError(
            f"{column}: {value!r} ({type(value).__name__}) would not survive its "
            f"{_arrow_type(want)} column unchanged; the spec's validation should have given it "
            "its parameter's kind"
        )


def read(store: Store, experiment: str) -> pd.DataFrame:
    """All rows of an experiment (empty frame if none); CorruptStorage naming a damaged file."""
    names = [n for n in store.list(f"{experiment}/results") if n.endswith(".parquet")]
    if not names:
        return pd.DataFrame()
    paths = [store.path(f"{experiment}/results/{n}") for n in names]
    try:
        return pq.read_table(paths, filesystem=store.fs).to_pandas()
    except (pa.ArrowException, OSError) as e:
        try:  # rows whose hp_ column was typed by a spec's literal before (int64 for `lr: 1`)
            table = pq.read_table(paths, filesystem=store.fs, schema=_promoted(store, paths))
            return table.to_pandas()
        except (pa.ArrowException, OSError):
            raise _damaged(store, paths, e) from None


def _promoted(store: Store, paths: list[str]) -> pa.Schema:
    """One schema for row files whose columns differ in type: each column the wider one."""
    schemas = [pq.read_schema(p, filesystem=store.fs) for p in paths]
    return pa.unify_schemas(schemas, promote_options="permissive")


def _damaged(store: Store, paths: list[str], error: Exception) -> CorruptStorage:
    """The first row file that does not read on its own, or the directory if each one does."""
    fix = "move it out of results/ (or delete it); `raysweep run SPEC --resume` runs a trial in its place"
    for path in paths:
        try:
            pq.read_table(path, filesystem=store.fs)
        except (pa.ArrowException, OSError) as e:
            why = _first_line(e).replace(f" '{path}'", "")  # pyarrow names the file again
            return CorruptStorage(f"{path}: not a readable Parquet row ({why}); {fix}")
    where = paths[0].rsplit("/", 1)[0]
    return CorruptStorage(f"{where}: the row files do not read together ({_first_line(error)})")


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def params_of(spec: Spec, row: dict) -> dict:
    """The hyperparameters a row's trial ran with, typed as its method takes them.

    By the method's own domain, not the column's: an int parameter sharing a float column reads
    back as the int it was, and Parquet-to-pandas turns an int column with nulls into floats.
    The confirm phase reads the journal instead (sweep.tuned_settings): the setting as it ran.
    """
    fn = UNLEARNERS[row["method"]]
    params = keyword_params(fn)
    out = {}
    for n in spec.methods[row["method"]] or {}:
        value = row[f"hp_{n}"]
        null = value is None or (isinstance(value, float) and math.isnan(value))
        out[n] = None if null else kind(domain(fn, params[n]))(value)
    return out


def best_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    """Each (attack, method, budget) cell's best ok tuning row at or below its budget ("a method
    may stop early"): feasible first, then lowest objective (both from val), then the smallest
    budget, then the earliest trial. So a method's best never gets worse with the budget.

    `budget` is the cell's and `from_budget` the chosen row's; `cell` and `trial_number` still
    name the chosen row (in its own study, the cell of `from_budget`).
    """
    tune = df[df["phase"] == "tune"]
    ok = tune[tune["status"] == "ok"].sort_values(
        ["feasible", "objective", "budget", "trial_number"], ascending=[False, True, True, True]
    )
    picks = []  # (index of the chosen row, the cell's budget)
    for (attack, method), cells in tune.groupby(["attack", "method"]):
        rows = ok[(ok["attack"] == attack) & (ok["method"] == method)]
        for budget in sorted(cells["budget"].unique()):
            upto = rows.index[rows["budget"] <= budget]
            picks += [(upto[0], budget)] if len(upto) else []
    best = ok.loc[[i for i, _ in picks]].copy()
    best["from_budget"] = best["budget"]
    best["budget"] = [b for _, b in picks]
    return best.sort_values(["attack", "method", "budget"], kind="stable")


# What the table reports per model: test-split accuracy, and the poison scores (computed on the
# poisons themselves, in no evaluation split) and loss MIA (test rows as non-members).
REPORTED = {
    "clean_acc": "clean_acc_test",
    "gus": "gus",
    "tpr_at_1fpr": "tpr_at_1fpr",
    "loss_mia_tpr": "loss_mia_tpr",
}
STATS = ("residual", *REPORTED)


def _stats(rows: pd.DataFrame, columns: dict[str, str]) -> dict:
    """Mean and sample std (NaN for one run) of each column, as <name> and <name>_std."""
    out = {}
    for name, col in columns.items():
        values = rows[col].astype(float)
        out[name] = values.mean()
        out[f"{name}_std"] = values.std(ddof=1) if len(values) > 1 else float("nan")
    return out


def _setting(best: pd.Series) -> str:
    hp = {k.removeprefix("hp_"): v for k, v in best.items() if k.startswith("hp_") and pd.notna(v)}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def chosen(df: pd.DataFrame) -> list[tuple[pd.Series, pd.DataFrame, str]]:
    """Each cell's best tuned row (`best_per_cell`), the rows that report it, and their source: its ok confirm
    rows (the same setting on fresh seeds) when there are any, else the tuning row itself."""
    confirmed = df[(df["phase"] == "confirm") & (df["status"] == "ok")]
    out = []
    for i, best in best_per_cell(df).iterrows():
        runs = confirmed[
            (confirmed["attack"] == best["attack"])
            & (confirmed["cell"] == best["cell"])
            & (confirmed["tuned_trial"] == best["trial_number"])
        ]
        out.append((best, runs, "confirm") if len(runs) else (best, df.loc[[i]], "tune"))
    return out


def reference_rows(df: pd.DataFrame, attack: str, seeds) -> pd.DataFrame:
    """One ok row per seed: the poisoned and retrain metrics depend on the seed only."""
    ok = df[(df["status"] == "ok") & (df["attack"] == attack) & df["seed"].isin(seeds)]
    return ok.drop_duplicates("seed").sort_values("seed")


def attack_warnings(table: pd.DataFrame) -> list[str]:
    """One line per attack that did not work on every seed's poisoned model (`attack_ok` false):
    its rows stay in the table, marked, but their r compares against an effect that is not there
    or too weak to resolve r. And one per tuning seed whose attack failed: every cell's setting
    was then chosen by an r that seed cannot resolve, whatever the confirm seeds show."""
    refs = table[table["method"] == "poisoned"]
    lines = [
        f"warning: {row['attack']}: the attack worked on {row['attack_ok']} of {row['n']} seeds' "
        f"poisoned models (attack_ok: its effect, resolving r to ±{MAX_RESOLUTION:g}); r is "
        "unresolved where it did not"
        for row in refs.to_dict("records")
        if row["attack_ok"] < row["n"]
    ]
    cells = table[(table["source"] != "reference") & ~table["tuned_attack_ok"].astype(bool)]
    for (attack, seed), rows in cells.groupby(["attack", "tuned_seed"]):
        lines.append(
            f"warning: {attack}: the attack failed on tuning seed {seed:.0f} (attack_ok false, "
            f"resolution {rows['tuned_resolution'].iloc[0]:.2f}, limit {MAX_RESOLUTION:g}): "
            f"{len(rows)} cells' settings were chosen by an r that seed cannot resolve"
        )
    return lines


def feasibility_warnings(table: pd.DataFrame) -> list[str]:
    """One line per cell whose chosen setting was infeasible on some of its runs (`feasible`)."""
    cells = table[(table["source"] != "reference") & (table["feasible"] < table["n"])]
    return [
        f"warning: {row['attack']}: {row['method']} at {row['budget']:g}: infeasible on "
        f"{row['n'] - row['feasible']:.0f} of {row['n']:.0f} runs (rows' infeasible_reason); its "
        f"numbers are over the other {row['feasible']:.0f}"
        for row in cells.to_dict("records")
    ]


def null_log10p(rows: pd.DataFrame, model: str) -> list[float]:
    """Per row with Gaussian scores, the combined log10 p (metrics.null_tests) that `model`'s
    scores come from a model never trained on the noise; recomputed from the stored scores, so
    rows written before the `null_log10p` column existed read the same. Empty for other attacks."""
    pairs = zip(rows[f"{model}_scores"], rows["retrain_scores"])
    return [
        null_tests(np.asarray(s, float), np.asarray(ref, float))["null_log10p"]
        for s, ref in pairs
        if s is not None
    ]


def indistinguishable(table_rows: list[dict]) -> None:
    """Set each row's `indistinguishable`: how many of its runs' scores pass the null tests at
    `null_alpha` = NULL_ALPHA / (the number of distinct cells with Gaussian scores), Bonferroni
    over the table's cells (references are read at the same level, not counted); NaN without
    scores. A run whose tests are NaN (too many degenerate scores) counts as not passing."""
    # Cells that a smaller budget's best also won report the same runs: counted once.
    tested = {
        (r["attack"], r["method"], r["from_budget"], r["tuned_trial"])
        for r in table_rows
        if r["source"] != "reference" and r["null"]
    }
    alpha = NULL_ALPHA / max(len(tested), 1)
    for r in table_rows:
        ps = r.pop("null")
        if ps:
            r |= {"indistinguishable": sum(p > np.log10(alpha) for p in ps), "null_alpha": alpha}


def _stopped(converged: bool, trials: int, trials_max: int | None) -> str:
    """Why a cell's tuning ended: "at max" wins, as a fixed budget's cells all end there
    (a cell short of both is one whose sweep was interrupted: "running")."""
    if trials_max is None:
        return ""
    if trials >= trials_max:
        return "at max"
    return "converged" if converged else "running"


RELEARN_PROBES = ("retain", "poisons")  # relearn.PROBES: the relearn_gap_<probe> columns


def relearn_stats(runs: pd.DataFrame) -> dict:
    """Over all of a cell's runs (as `indistinguishable` counts): per probe, the mean
    relearn_gap and how many runs relearn faster than the retrain reference (the gap's 95 %
    interval above 0). NaN where the runs have no probe (tuning rows, or rows written before)."""
    out = {}
    for probe in RELEARN_PROBES:
        col = f"relearn_gap_{probe}"
        lo = runs[f"{col}_lo"].astype(float) if f"{col}_lo" in runs else pd.Series(dtype=float)
        probed = lo.notna()
        out[col] = runs.loc[probed, col].astype(float).mean() if probed.any() else math.nan
        out[f"relearn_faster_{probe}"] = int((lo[probed] > 0).sum()) if probed.any() else math.nan
    return out


def oracle_stats(runs: pd.DataFrame, model: str, r) -> dict:
    """Over a cell's runs (or a reference's seeds) with retrain oracles (metrics.oracle_test):
    K; how many runs' r (`r`: a column, or the reference's constant) lie inside their seed's
    oracle band; the mean share of test units outside the oracles' margin range; and how many
    runs are more extreme than every oracle (oracle_p = 1 / (K + 1), the least K allows).
    `model`: "" for the unlearned model, "before_" or "retrain_" for the references. NaN where
    no run had oracles."""
    judged = runs[f"{model}oracle_p"].notna() if f"{model}oracle_p" in runs else []
    if not len(judged) or not judged.any():
        return dict.fromkeys(ORACLE_STATS, math.nan)
    runs = runs[judged]
    r = runs["residual"] if isinstance(r, str) else pd.Series(r, index=runs.index)
    k = runs["oracles"].astype(float)
    return {
        "oracles": int(k.max()),
        "oracle_inside": int(((runs["oracle_r_lo"] <= r) & (r <= runs["oracle_r_hi"])).sum()),
        "oracle_outside": runs[f"{model}oracle_outside"].astype(float).mean(),
        "oracle_extreme": int((runs[f"{model}oracle_p"] * (k + 1) < 1 + 1e-9).sum()),
        "oracle_judged": len(runs),
    }


ORACLE_STATS = ("oracles", "oracle_inside", "oracle_outside", "oracle_extreme", "oracle_judged")


def table(df: pd.DataFrame, trials_max: int | None = None) -> pd.DataFrame:
    """The paper-style table: per attack, the poisoned and retrain references, then each cell's
    best setting (chosen on val, among its method's rows at or below its budget: `from_budget`
    is where the chosen run stopped), reported on test over its confirmation seeds (or the
    single tuning run when the cell has none).

    Nothing is hidden: `feasible` counts the runs whose unlearned model met the utility
    constraint on test (and had informative poison scores) out of `n`; the means and stds are over those
    feasible runs only, and `residual_lo`/`residual_hi` span every feasible run's 95% interval
    of r (the hull), so two methods whose spans overlap are not told apart by this table; a run
    whose seed's attack did not resolve r (`attack_ok` false) reports an interval no narrower
    than that seed's resolution (trial.unresolved_widened), and the report says "unresolved".
    `tuned_seed`, `tuned_attack_ok`, `tuned_resolution`: the seed the setting was chosen on.
    `converged` is false where more trials might still change the cell's best (convergence.py).
    `stopped` says why a cell got no more trials: "converged", or "at max" (`trials_max`, the
    spec's trials_per_cell or its range's max; left empty when not given).
    `indistinguishable` counts the runs (of `n`) whose unlearned model's per-poison Gaussian
    scores pass metrics.null_tests at `null_alpha` (`indistinguishable` below).
    """
    counts = df[df["phase"] == "tune"].groupby(["attack", "method", "budget"])["status"]
    converged = convergence(df).set_index(CELL)["converged"]
    cells, seeds = [], {}
    for best, runs, source in chosen(df):
        key = (best["attack"], best["method"], best["budget"])
        seeds.setdefault(key[0], set()).update(runs["seed"])
        feasible = runs[runs["feasible_test"].astype(bool)]
        row = {"attack": key[0], "method": key[1], "budget": key[2], "source": source}
        row |= {"from_budget": best["from_budget"]}  # the run it came from stopped there
        row |= {"n": len(runs), "seeds": ",".join(map(str, sorted(runs["seed"])))}
        row |= {"attack_ok": int(runs["attack_ok"].sum())}  # seeds whose attack worked
        row |= {"trials": counts.size()[key], "failed": int((counts.get_group(key) != "ok").sum())}
        row |= {"converged": bool(converged.get(key, False))}  # convergence.py: the rule
        row |= {"stopped": _stopped(row["converged"], row["trials"], trials_max)}
        row |= {"tuned_trial": best["trial_number"], "feasible": len(feasible)}
        # The seed the setting was chosen on, and whether its attack resolved r (attack_warnings).
        row |= {"tuned_seed": best["seed"], "tuned_attack_ok": bool(best["attack_ok"])}
        row |= {"tuned_resolution": best["resolution"]}
        row |= {"setting": _setting(best)}
        row |= _stats(
            feasible, {"residual": "residual"} | {k: f"after_{c}" for k, c in REPORTED.items()}
        )
        row |= {
            "residual_lo": feasible["residual_lo"].min(),
            "residual_hi": feasible["residual_hi"].max(),
        }
        row |= {"null": null_log10p(runs, "after")}  # over all n runs, as attack_ok counts
        row |= relearn_stats(runs)
        row |= oracle_stats(runs, "", "residual")
        cells.append(row)
    refs = []
    for attack, used in sorted(seeds.items()):
        per_seed = reference_rows(df, attack, used)
        for label, prefix, r in (("poisoned", "before", 1.0), ("retrain", "retrain", 0.0)):
            ref = {"attack": attack, "method": label, "source": "reference", "n": len(per_seed)}
            ref |= {"seeds": ",".join(map(str, per_seed["seed"]))}
            ref |= {"attack_ok": int(per_seed["attack_ok"].sum())}
            ref |= {"residual": r, "residual_std": 0.0 if len(per_seed) > 1 else float("nan")}
            ref |= _stats(per_seed, {k: f"{prefix}_{c}" for k, c in REPORTED.items()})
            ref |= {"null": null_log10p(per_seed, prefix)}  # a check: poisoned no, retrain yes
            ref |= oracle_stats(per_seed, f"{prefix}_", r)  # the same check against the oracles
            refs.append(ref)
    indistinguishable(refs + cells)
    out = pd.DataFrame(refs + cells)
    order = ["attack", "method", "budget", "from_budget", "source", "n", "seeds", "attack_ok"]
    order += ["trials", "failed", "converged", "stopped"]
    order += ["tuned_trial", "tuned_seed", "tuned_attack_ok", "tuned_resolution"]
    order += ["feasible", "setting", "residual", "residual_std"]
    order += ["residual_lo", "residual_hi", "indistinguishable", "null_alpha"]
    order += [f"relearn_{k}_{p}" for p in RELEARN_PROBES for k in ("gap", "faster")]
    order += list(ORACLE_STATS)
    order += [c for s in STATS[1:] for c in (s, f"{s}_std")]
    return out.reindex(columns=order).sort_values(["attack"], kind="stable", ignore_index=True)
