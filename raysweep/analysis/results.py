"""Results: one Parquet file per trial under <storage>/<experiment>/results/, one fixed schema.

Every file of a run has the same schema (all methods' hyperparameters are columns, null where a
method lacks them), so `pandas.read_parquet("<storage>/<experiment>/results")` reads the whole
run. Each file is written atomically under a name fixed by (phase, cell, trial number), so a
re-run of the same trial replaces its row instead of duplicating it.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.base.storage import CorruptStorage, Store
from raysweep.science.stats import MAX_RESOLUTION, NULL_ALPHA, null_tests

from .convergence import CELL, convergence


@dataclass(frozen=True)
class Column:
    """One column of a row: its Parquet type and what it means (the docs' column reference)."""

    type: pa.DataType
    doc: str


_UTC = pa.timestamp("ms", tz="UTC")

# The columns every row has, in this order; then hp_<name> per hyperparameter of the spec's
# methods (runner/rows.py types them), the measured metrics per model and the per-poison scores.
COLUMNS = {
    "experiment": Column(pa.string(), "the spec's `name`"),
    "spec_name": Column(pa.string(), "the spec's `name`"),
    "spec_hash": Column(pa.string(), "hash of the validated spec"),
    "phase": Column(pa.string(), "`tune` or `confirm` (a best setting re-run on a fresh seed)"),
    "cell": Column(pa.string(), "`<method>-b<budget>`, also the Optuna study name"),
    "trial_number": Column(pa.int64(), "the trial's number in its study (confirm rows: the seed)"),
    "run_of": Column(
        pa.string(),
        "the run the row was measured in, `<cell>:<trial_number>` of the run's own (largest-budget) row; a prefix method's run has a row in each of its cells",
    ),
    "tuned_trial": Column(
        pa.int64(), "confirm rows: the tuning trial whose setting they re-run (else null)"
    ),
    "attack": Column(pa.string(), "which attack poisoned the model"),
    "method": Column(pa.string(), "which unlearner ran"),
    "budget": Column(
        pa.float64(),
        "the budget fraction `f` the row stands for (a run's anytime stop: where the meter stopped to measure it)",
    ),
    "seed": Column(pa.int64(), "seed of poisons, checkpoints and trial"),
    "status": Column(pa.string(), "`ok` or `failed`"),
    "error": Column(pa.string(), "the error of a failed trial"),
    "poisoned_key": Column(pa.string(), "content hash of the poisoned checkpoint"),
    "retrain_key": Column(pa.string(), "content hash of the retrain checkpoint"),
    "attack_ok": Column(
        pa.bool_(),
        "the attack worked on the poisoned model, and well enough to resolve r (`resolution` ≤ 0.25)",
    ),
    "resolution": Column(
        pa.float64(),
        "half-width of the 95 % bootstrap interval of `E_before − E_retrain` (val), relative to it",
    ),
    "feasible": Column(
        pa.bool_(),
        "on val (tuning): `after_clean_acc_val ≥ retrain_clean_acc_val − δ` and ≤ 5 % degenerate poison scores",
    ),
    "feasible_test": Column(pa.bool_(), "the same on test: which seeds the report averages"),
    "infeasible_reason": Column(pa.string(), "why not feasible (null when feasible)"),
    "objective": Column(
        pa.float64(),
        "what the study minimised: the spec's `objective` on val (`|residual_val|` by default), or"
        " `10 + shortfall` where infeasible",
    ),
    "objective_noise": Column(
        pa.float64(),
        "the smallest change in `objective` the run can tell apart, in its units: `resolution` for"
        " `residual`, the half-width of the Anderson-Darling distance's 95 % bootstrap interval"
        " over the poisons for `anderson_darling` (the convergence rule's threshold)",
    ),
    "residual_val": Column(
        pa.float64(),
        "`r` on val (tuning), on the poisons all three models score (non-NaN in all three); NaN when fewer than 95 % of them remain",
    ),
    "residual": Column(pa.float64(), "`r` on test (reporting), on the same poisons"),
    "residual_lo": Column(
        pa.float64(), "lower end of the 95 % paired-bootstrap interval of `residual`"
    ),
    "residual_hi": Column(pa.float64(), "upper end of that interval"),
    "null_ks_log10p": Column(
        pa.float64(),
        "log10 p of a one-sample Kolmogorov–Smirnov test of the unlearned model's per-poison Gaussian scores (`after_scores`, non-NaN) against N(0, 1), exact; null for attacks without Gaussian noise, NaN when > 5 % of the scores are degenerate",
    ),
    "null_low_log10p": Column(
        pa.float64(),
        "log10 exact binomial p of the count of those scores ≤ Φ⁻¹(0.01) against 1 % (one-sided: an excess), summed in log space",
    ),
    "null_high_log10p": Column(
        pa.float64(), "the same for the count ≥ Φ⁻¹(0.99): an overshoot past N(0, 1)"
    ),
    "null_retrain_log10p": Column(
        pa.float64(),
        "log10 p of a two-sample Kolmogorov–Smirnov test of those scores against `retrain_scores` (conservative: both models score the same noise)",
    ),
    "null_log10p": Column(
        pa.float64(),
        'the four combined by Bonferroni, `min(0, log10 4 + min of the four)`: the row is rejected at α when any test is at α / 4; the report\'s "indistinguishable from never trained" reads it at 0.01 / (distinct Gaussian cells)',
    ),
    "relearn_budget": Column(
        pa.float64(),
        "the relearning probe's cap per probe and per model, as a share of C_train (0.02); null on tuning rows",
    ),
    "relearn_gap_retain": Column(
        pa.float64(),
        "relearning probe (a), confirm rows only: the unlearned and the retrained model are each fine-tuned (SGD lr 0.01, momentum 0.9, batch 64, `relearn_budget` × C_train units, the same batches) on the retain set alone; the unlearned model's attack effect E afterwards minus the retrained model's, on test units (Gaussian: −I on the 90 % of poisons probe (b) does not use). > 0: the poison comes back faster than after retraining",
    ),
    "relearn_gap_retain_lo": Column(
        pa.float64(), "lower end of its 95 % paired-bootstrap interval"
    ),
    "relearn_gap_retain_hi": Column(pa.float64(), "upper end of that interval"),
    "relearn_gap_poisons": Column(
        pa.float64(),
        "relearning probe (b): the same, fine-tuned on a random 10 % of the poisoned rows (as trained on, fixed per seed), scored on the other 90 %",
    ),
    "relearn_gap_poisons_lo": Column(
        pa.float64(), "lower end of its 95 % paired-bootstrap interval"
    ),
    "relearn_gap_poisons_hi": Column(pa.float64(), "upper end of that interval"),
    "relearn_wall_s": Column(
        pa.float64(),
        "seconds the probe took for this row (the retrained model's probe, once per seed per process, included where it ran); not in `wall_s`",
    ),
    "oracles": Column(
        pa.int64(),
        "K, the retrain oracles of this row's seed (`confirm: {oracles: K}`): retrain models trained as `retrain_key` was, each from its own initialisation and batch order; null on tuning rows and without the key",
    ),
    "oracle_r_lo": Column(
        pa.float64(),
        "the least r of the K oracles (each against `before` and the `retrain` reference, on test): where retraining itself lands",
    ),
    "oracle_r_hi": Column(
        pa.float64(),
        "the greatest r of the K oracles. A model like the oracles falls inside [`oracle_r_lo`, `oracle_r_hi`] with probability (K − 1) / (K + 1)",
    ),
    "oracle_outside": Column(
        pa.float64(),
        "KLoM-style, per test unit of E (each target, triggered row, clean row for accuracy attacks, poison for Gaussian noise): the share of units where the unlearned model's margin toward the poison's effect (log odds of `y_adv`, log odds against the true class, or −Iᵢ) lies strictly outside the oracles' [min, max]; a model like the oracles expects at most 2 / (K + 1)",
    ),
    "oracle_p": Column(
        pa.float64(),
        "permutation p of `oracle_outside`: each of the K + 1 models is judged by the same count against the other K, p = share of them at or above the unlearned model's. Exact whatever the dependence between units, and never below 1 / (K + 1): rejecting at 0.05 needs K ≥ 19",
    ),
    "before_oracle_outside": Column(
        pa.float64(),
        "the poisoned model judged the same way (a control per seed: it should stand out)",
    ),
    "before_oracle_p": Column(pa.float64(), "its permutation p"),
    "retrain_oracle_outside": Column(
        pa.float64(),
        "the retrain reference judged the same way (a control per seed: it should not stand out)",
    ),
    "retrain_oracle_p": Column(pa.float64(), "its permutation p"),
    "budget_used": Column(pa.float64(), "fraction of the cap spent"),
    "budget_units": Column(pa.float64(), "budget units spent"),
    "wall_s": Column(
        pa.float64(), "trial wall-clock seconds (an anytime stop's row: since its run started)"
    ),
    "started_at": Column(_UTC, "when the trial started (UTC)"),
    "finished_at": Column(_UTC, "when it finished (UTC)"),
    "host": Column(pa.string(), "hostname"),
    "node_id": Column(
        pa.string(), "Ray node that ran the trial (nodes of one machine or image share a `host`)"
    ),
    "versions": Column(pa.string(), "JSON of package versions"),
}

# What is measured on each of the three models (experiment/metrics.py's METRICS compute them):
# columns before_<name>, after_<name>, retrain_<name>, all float64.
MEASURED = {
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
    "effect_val": "the attack's effect E on val (higher = stronger poison; the mean of the "
    "attack record's units, metrics.UNITS): -gus (gaussian), target_adv_rate "
    "(gradient_matching), 1 - clean_acc_val (gradient_canceling, label_flip), backdoor_asr_val "
    "(backdoor, text_backdoor)",
    "effect_test": "the attack's effect E on test (target_adv_rate is the same on both splits)",
}
MODELS_MEASURED = ("before", "after", "retrain")
# Per-poison Gaussian scores I_i of each model (null for attacks without Gaussian noise).
SCORES = {f"{m}_scores": pa.list_(pa.float64()) for m in MODELS_MEASURED}


def measured_columns() -> dict[str, pa.DataType]:
    """<model>_<metric> for every model and measured metric, typed, in the rows' order."""
    return {f"{m}_{k}": pa.float64() for m in MODELS_MEASURED for k in MEASURED}


def versions() -> str:
    names = ("raysweep", "torch", "ray", "optuna", "pyarrow")
    return json.dumps({n: version(n) for n in names} | {"python": platform.python_version()})


def row_name(experiment: str, phase: str, cell: str, number: int) -> str:
    return f"{experiment}/results/{phase}-{cell}-{number:04d}.parquet"


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


@dataclass(frozen=True)
class Reported:
    """A number the table reports per model as mean ± std over runs (columns <name>, <name>_std):
    the MEASURED metric it reads (after_<metric> for a cell, before_/retrain_ for the
    references; MEASURED says what it means), its header in report.md and its decimals."""

    metric: str
    header: str
    digits: int = 3


# What the table reports per model: test-split accuracy, and the poison scores (computed on the
# poisons themselves, in no evaluation split) and loss MIA (test rows as non-members).
REPORTED = {
    "clean_acc": Reported("clean_acc_test", "clean acc"),
    "gus": Reported("gus", "GUS"),
    "tpr_at_1fpr": Reported("tpr_at_1fpr", "Gaussian MIA TPR@1%FPR"),
    "loss_mia_tpr": Reported("loss_mia_tpr", "loss MIA TPR@1%FPR"),
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


def _stopped(converged: bool, flat: bool, trials: int, trials_max: int | None) -> str:
    """Why a cell's tuning ended: "at max" wins, as a fixed budget's cells all end there; else
    "converged", "converged, flat" where no setting tried moved r by more than the noise
    (convergence.py; the sweep's rule stops those first), and "running" for a cell short of
    both (its sweep was interrupted)."""
    if trials_max is None:
        return ""
    if trials >= trials_max:
        return "at max"
    return ("converged, flat" if flat else "converged") if converged else "running"


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
    `stopped` says why a cell got no more trials: "converged" ("converged, flat" where no
    setting tried moved r by more than the noise), or "at max" (`trials_max`, the spec's
    trials_per_cell or its range's max; left empty when not given).
    `indistinguishable` counts the runs (of `n`) whose unlearned model's per-poison Gaussian
    scores pass metrics.null_tests at `null_alpha` (`indistinguishable` below).
    """
    counts = df[df["phase"] == "tune"].groupby(["attack", "method", "budget"])["status"]
    rule = convergence(df).set_index(CELL)
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
        row |= {"converged": bool(rule["converged"].get(key, False))}  # convergence.py
        flat = bool(rule["flat"].get(key, False))
        row |= {"stopped": _stopped(row["converged"], flat, row["trials"], trials_max)}
        row |= {"tuned_trial": best["trial_number"], "feasible": len(feasible)}
        # The seed the setting was chosen on, and whether its attack resolved r (attack_warnings).
        row |= {"tuned_seed": best["seed"], "tuned_attack_ok": bool(best["attack_ok"])}
        row |= {"tuned_resolution": best["resolution"]}
        row |= {"setting": _setting(best)}
        row |= _stats(
            feasible,
            {"residual": "residual"} | {k: f"after_{c.metric}" for k, c in REPORTED.items()},
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
            ref |= _stats(per_seed, {k: f"{prefix}_{c.metric}" for k, c in REPORTED.items()})
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
