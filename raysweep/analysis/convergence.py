"""Has each cell's search converged? Best-so-far objective against trial number, from the rows.

A cell's best is what the table reports for it (results.best_per_cell): the lowest objective
among the ok tuning rows of its method at or below its budget ("a method may stop early"), so
the trials that can change it are the cell's own and those of its smaller budgets. Trial i of
the cell is the i-th ok trial of each of those cells (in trial order), and the best so far after
it is the lowest objective among all of them up to their i-th; n is the most ok trials any of
them has. A cell with no smaller budget is just its own trials.

A cell is **not converged** when its best improved, over the last third of its trials (the last
ceil(n / 3)), by more than the noise between runs of one setting: the sample std of the
objective over the feasible confirm runs of its chosen setting (two or more; an infeasible run's
objective is 10 + its accuracy shortfall, a penalty, not noise), else the smallest change in
the objective that chosen row's run can tell apart, in the objective's units
(`objective_noise`, metrics.OBJECTIVES: for |r|, r's resolution on the tuning seed, the relative
half-width of E_before - E_retrain's 95 % interval; for the Anderson-Darling distance, the
half-width of its bootstrap interval over the poisons). Rows without `objective_noise` (written
before it existed) read `resolution`. A cell with one trial has nothing before it and is not
converged.

`needed` turns the rule around for the sweep's adaptive budget (`trials_per_cell: {min, max}`,
searcher.CellSearcher): how many more trials, none of them improving the best, before the rule
can call the cell converged. Those trials are needed whatever they return, so that many may run
at once without one being wasted.

`patience_needed` is the stricter rule that stops an adaptive sweep's cell (searcher.CellSearcher):
a cell is **settled** when it is converged and its best was set in the first 1/p of its trials
(no improvement at all, however small, since): each new best buys the search p - 1 times as
many trials again as it took to find it. `converged` says more trials would not move the best by
more than a run can tell apart; `settled` adds that the search has stopped finding better
settings at all. A settled cell is converged; not the other way round.

A cell is **flat** when every one of its trials so far, feasible or not, read r on val within
the noise of r of its best's (`r_spread`, the largest | |r_val| - the best's |r_val| |, at most
`r_threshold`: the std of |r_val| over the chosen setting's feasible confirm runs, else r's
resolution; the objective's threshold where the objective is |r|): no setting tried did anything
different from any other, so more settings are unlikely to either (the unlearner cannot move r
at this budget, or moves it the same way whatever its hyperparameters). A cell that is not flat
has shown that its setting matters: some setting removed more of the poison than its best, if
only by costing too much accuracy, or removed less. On the quickstart the flat cells are the
methods whose r stays near 1 whatever they are given; the others are those whose best keeps
improving well past `min` (bench/adaptive.py). The sweep's rule (`STOP_RULE`, "flat") stops a
flat cell as soon as it is converged, and any other only once settled at p = FLAT_PATIENCE.
"""

from __future__ import annotations

import math

import pandas as pd

CELL = ["attack", "method", "budget"]


def _candidates(ok: pd.DataFrame, attack: str, method: str, budget: float) -> pd.DataFrame:
    """The ok tuning rows the cell's best is chosen from, each with `step`: its rank among its
    own cell's ok trials (the module docstring's trial i)."""
    rows = ok[(ok["attack"] == attack) & (ok["method"] == method) & (ok["budget"] <= budget)]
    rows = rows.sort_values(["budget", "trial_number"])
    return rows.assign(step=rows.groupby("budget").cumcount())


def _per_step(rows: pd.DataFrame) -> pd.DataFrame:
    """Trial i of a cell (the module docstring), from its `_candidates` rows: `objective`, the
    lowest among the candidate cells' i-th ok trials, and `feasible`, whether any of them is."""
    steps = rows.assign(feasible=rows["feasible"].eq(True)).groupby("step")  # None: not feasible
    return steps.agg(objective=("objective", "min"), feasible=("feasible", "any"))


def best_so_far(df: pd.DataFrame) -> pd.DataFrame:
    """Each cell's best objective against its trials, as the table reads it (the module
    docstring, the rule `convergence` applies): one row per cell and trial i (`n`, from 1) with
    `objective` (trial i's lowest), `best_so_far` (the running minimum) and `feasible` (whether a
    feasible trial is among those so far; if not, the best is a penalty, 10 + a shortfall)."""
    ok = df[(df["phase"] == "tune") & (df["status"] == "ok")]
    columns = [*CELL, "n", "objective", "best_so_far", "feasible"]
    curves = []
    for key in sorted(ok.groupby(CELL).groups):
        steps = _per_step(_candidates(ok, *key)).reset_index(drop=True)
        curves.append(steps.assign(**dict(zip(CELL, key)), n=steps.index + 1,
                                   best_so_far=steps["objective"].cummin(),
                                   feasible=steps["feasible"].cummax())[columns])  # fmt: skip
    return pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=columns)


def _noise(best: pd.Series, confirm: pd.DataFrame, of: str = "objective") -> float:
    """The threshold a change in the objective (`of`="objective") or in |r| on val ("r") must
    pass (see the module docstring)."""
    runs = confirm[
        (confirm["cell"] == best["cell"]) & (confirm["tuned_trial"] == best["trial_number"])
    ]
    runs = runs[runs["feasible"].astype(bool)]
    if len(runs) >= 2:
        r = runs.get("residual_val", pd.Series(math.nan, index=runs.index))  # (rows by hand)
        values = runs["objective"] if of == "objective" else r.abs()
        return float(values.std(ddof=1))
    own = best.get("objective_noise", math.nan) if of == "objective" else math.nan
    return float(own) if pd.notna(own) else float(best["resolution"])


def needed(objectives: list[float], threshold: float) -> float:
    """More ok trials the rule needs before it can call converged a cell whose ok trials, in
    order, returned `objectives` (0: converged now; inf: never, a NaN threshold). Two for a cell
    with none: one to set a best, one after it."""
    if not objectives:
        return 2
    running = pd.Series(objectives).cummin()
    within = (running - running.iloc[-1] <= threshold).to_numpy()
    if not within.any():
        return math.inf
    first = int(within.argmax())  # the first trial whose best-so-far is already within noise
    n = len(objectives)
    # Converged at n trials iff that trial lies in the first n - ceil(n / 3) (the module rule).
    while n - math.ceil(n / 3) <= first:
        n += 1
    return n - len(objectives)


def patience_needed(objectives: list[float], threshold: float, patience: int = 2) -> float:
    """More ok trials, none improving the best, before a cell whose ok trials returned
    `objectives` is settled at `patience` p (the module docstring): what `needed` asks, and
    enough that the trial which set the best lies in the first 1/p. Settled at n trials iff the
    best was set by trial j (0-based) < n / p, i.e. n >= p j + 1 (p = 2: the first half)."""
    more = needed(objectives, threshold)
    if not objectives or math.isinf(more):
        return more
    running = pd.Series(objectives).cummin()
    best_at = int((running == running.iloc[-1]).to_numpy().argmax())
    return max(more, patience * best_at + 1 - len(objectives))


def _spread(rows: pd.DataFrame, chosen: pd.Series) -> float:
    """The module docstring's `r_spread`: how far from the chosen row's |r_val| any candidate
    trial read (NaN where the chosen row is infeasible, its objective a penalty, or no trial has
    an r: nothing to call flat)."""
    if pd.isna(chosen["feasible"]) or "residual_val" not in rows or not chosen["feasible"]:
        return math.nan  # (rows without r_val, made by hand: nothing to call flat either)
    r = rows["residual_val"].abs().dropna()
    return float((r - abs(chosen["residual_val"])).abs().max()) if len(r) else math.nan


def convergence(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell: trials, final best, best after the first two thirds, improvement, threshold,
    converged (see the module docstring for the rule), and the trials each rule still needs
    (`needed`: converged; `patience_needed`: settled)."""
    ok = df[(df["phase"] == "tune") & (df["status"] == "ok")]
    confirm = df[(df["phase"] == "confirm") & (df["status"] == "ok")]
    out = []
    for key in sorted(ok.groupby(CELL).groups):
        rows = _candidates(ok, *key)
        per_step = _per_step(rows)["objective"]  # trial i's best new objective
        n = len(per_step)
        head = per_step.iloc[: n - math.ceil(n / 3)]
        best, before = per_step.min(), head.min() if len(head) else math.inf
        # The chosen row, as best_per_cell ranks them (objective, then smaller budget, earlier).
        chosen = rows.sort_values(["objective", "budget", "trial_number"]).iloc[0]
        threshold = _noise(chosen, confirm)
        r_threshold = _noise(chosen, confirm, "r")  # flat reads r, whatever the objective
        improved = before - best
        done = bool(improved <= threshold)
        more = needed(list(per_step), threshold)
        patience = patience_needed(list(per_step), threshold)
        spread = _spread(rows, chosen)
        flat = bool(spread <= r_threshold)  # NaN: not flat
        # The sweep's rule: a flat cell stops when converged, any other once settled.
        flat_rule = more if flat else patience_needed(list(per_step), threshold, FLAT_PATIENCE)
        out.append(dict(zip(CELL, key)) | {"trials": n, "best": best, "best_before": before,
                    "improvement": improved, "threshold": threshold, "converged": done,
                    "r_spread": spread, "r_threshold": r_threshold, "flat": flat, "needed": more,
                    "patience_needed": patience, "flat_needed": flat_rule})  # fmt: skip
    return pd.DataFrame(out, columns=[*CELL, "trials", "best", "best_before", "improvement",
                                      "threshold", "converged", "r_spread", "r_threshold",
                                      "flat", "needed",
                                      "patience_needed", "flat_needed"])  # fmt: skip


# The rules that can stop a cell of a `trials_per_cell` range -> the column of `convergence` saying
# how many more trials each needs (0: the cell may stop). "converged": the table's rule;
# "patience": settled at p = 2; "flat": converged if flat, else settled at p = FLAT_PATIENCE (the
# module docstring). The sweep stops cells by STOP_RULE, the one that cost least in the best per
# unit saved (bench/results.md, entry `adaptive`).
STOP_RULES = {"converged": "needed", "patience": "patience_needed", "flat": "flat_needed"}
STOP_RULE = "flat"
FLAT_PATIENCE = 3


def still_needed(df: pd.DataFrame, rule: str = STOP_RULE) -> dict[tuple[str, float], float]:
    """Per cell (method, budget) with rows: more trials `rule` needs at least (0: it may stop).
    A cell without a feasible tuning row of its own yet needs at least one more: the rule weighs
    an improvement against r's resolution, and an infeasible best (objective 10 + accuracy
    shortfall) has no r. On `quickstart` at {min: 4, max: 16} such cells were most of what
    stopping lost (bench/adaptive.py)."""
    if not len(df):
        return {}
    table = convergence(df)
    tuned = df[(df["phase"] == "tune") & (df["status"] == "ok")]
    fit = tuned[tuned["feasible"].astype(bool)]
    feasible = set(zip(fit["method"], fit["budget"]))
    more = zip(table["method"], table["budget"], table[STOP_RULES[rule]])
    return {(m, b): n if (m, b) in feasible else max(n, 1) for m, b, n in more}


def finished(df: pd.DataFrame, cells: list[tuple[str, float]], low: int, high: int) -> bool:
    """Whether the rows hold a whole sweep of `cells` ((method, budget)s) at `trials_per_cell`
    (low, high): every cell has `high` tuning trials, or at least `low` and nothing
    `still_needed` (the sweep's searcher stops a cell by the same function)."""
    tuned = df[df["phase"] == "tune"] if len(df) else pd.DataFrame(columns=["method", "budget"])
    trials = tuned.groupby(["method", "budget"]).size()
    more = still_needed(df)
    for cell in cells:
        n = int(trials.get(cell, 0))
        if n < high and not (n >= low and more.get(cell, 1) == 0):
            return False
    return True
