"""Do the quickstart's winners change when the studies minimise the per-poison scores'
Anderson-Darling distance from N(0, 1) instead of |r| (issue 24, part 5)?

Runs the quickstart sweep twice through the real CLI (Ray, TPE, confirm seeds 1 and 2), once per
objective, each in a fresh store, and reads each run's table (results.table): per cell the
winner's setting, its r on test over the confirm seeds and how many of those runs pass the
per-poison null tests ("indistinguishable from never trained", at the table's alpha). One
sampler seed (the spec's, 0): a quickstart sweep takes 4-8 minutes on 2 busy cores, so more did
not fit. Also the relearning probe's cost, from the residual run's confirm rows.

    PYTHONPATH=. python -m bench objective
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from raysweep.analysis import results
from raysweep.base.storage import open_store
from raysweep.experiment.spec import load

SPEC = Path(__file__).parent.parent / "search_spaces" / "quickstart.yaml"
OBJECTIVES = ("residual", "anderson_darling")
NEAR = ("random_label", "salun", "bad_teacher", "euk")
SHOWN = ("setting", "residual", "feasible", "indistinguishable", "n")


def sweep(objective: str, store: str) -> pd.DataFrame:
    """One quickstart sweep under `objective` into `store`; its rows. residual is the default,
    so its spec is the quickstart's own (same hash, rows as `make quickstart` writes them)."""
    raw = load(SPEC).raw
    if objective != "residual":
        raw = raw | {"objective": objective}
    path = Path(store) / "spec.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "raysweep", "run", str(path), "--storage", store]
    subprocess.run(cli, env=env, check=True, stdout=subprocess.DEVNULL)
    return results.read(open_store(store), raw["name"])


def winners(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell of the table: the winner's setting, r on test (mean over its feasible confirm
    runs), runs feasible and indistinguishable of n."""
    t = results.table(df)
    t = t[t["source"] != "reference"]
    keep = ["method", "budget", "setting", "residual", "feasible", "indistinguishable", "n"]
    return t[keep + ["null_alpha"]].set_index(["method", "budget"])


def probe_cost(df: pd.DataFrame) -> dict:
    """The relearning probe's share of the sweep: its units (2 probes x relearn_budget x C_train
    per confirm row, and the same once per confirm seed for the retrain reference) against every
    row's unlearning units, and its seconds against the confirm rows' own."""
    ok = df[df["status"] == "ok"]
    confirm = ok[ok["phase"] == "confirm"]
    c_train = float((ok["budget_units"] / (ok["budget_used"] * ok["budget"])).median())
    per_model = 2 * confirm["relearn_budget"].max() * c_train
    probe = per_model * (len(confirm) + confirm["seed"].nunique())
    return {
        "probe_units_share": probe / float(ok["budget_units"].sum()),
        "probe_wall_share_of_confirm_rows": float(
            confirm["relearn_wall_s"].sum() / (confirm["relearn_wall_s"] + confirm["wall_s"]).sum()
        ),
    }


def line(c: dict) -> str:
    """One cell under both objectives, as one line of bench/results.md."""
    return "; ".join(
        f"{label}: {c[f'{o}_setting']}, r {float(c[f'{o}_residual']):.3f}, indistinguishable "
        f"{float(c[f'{o}_indistinguishable']):.0f}/{float(c[f'{o}_n']):.0f}"
        for label, o in (("|r|", "residual"), ("AD", "ad"))
    )


def main() -> dict:
    tables, out = {}, {}
    for objective in OBJECTIVES:
        with tempfile.TemporaryDirectory() as store:
            started = time.time()
            df = sweep(objective, store)
            out[f"{objective}_sweep_s"] = time.time() - started
        tables[objective] = winners(df)
        if objective == "residual":
            out |= probe_cost(df)
    a, b = tables["residual"], tables["anderson_darling"]
    cells = []
    for key in a.index:
        x, y = a.loc[key], b.loc[key]
        cells.append(
            {"method": key[0], "budget": key[1], "same_winner": x["setting"] == y["setting"]}
            | {f"residual_{k}": x[k] for k in SHOWN}
            | {f"ad_{k}": y[k] for k in SHOWN}
        )
        print(
            f"{key[0]:>13} {key[1]:4} | |r|: r {x['residual']:6.3f} indist {x['indistinguishable']:.0f}"
            f"/{x['n']:.0f} {x['setting']} | AD: r {y['residual']:6.3f} indist "
            f"{y['indistinguishable']:.0f}/{y['n']:.0f} {y['setting']}",
            flush=True,
        )
    indist = {o: int(t["indistinguishable"].sum()) for o, t in tables.items()}
    out |= {
        "cells": len(cells),
        "same_winner": sum(c["same_winner"] for c in cells),
        "indistinguishable_runs_residual": indist["residual"],
        "indistinguishable_runs_anderson_darling": indist["anderson_darling"],
        "confirm_runs": int(a["n"].sum()),
        "null_alpha": float(a["null_alpha"].dropna().iloc[0]),
        # the cells whose winner changed, and the four methods that come close by r
        **{
            f"{c['method']}@{c['budget']:g}": line(c)
            for c in cells
            if not c["same_winner"] or c["method"] in NEAR
        },
        "per_cell": cells,
    }
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1, default=str))
