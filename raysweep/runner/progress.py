"""The live progress view of a sweep: a Tune callback that prints per-cell counts and best r."""

from __future__ import annotations

import time

import pandas as pd
from ray import tune


def cell_key(name: str, cell: str) -> str:
    """A trial's result key for `name` of its row in `cell` (a run has a row per budget)."""
    return f"{name}@{cell}"


class Progress(tune.Callback):
    """A compact live view of one phase: a line per finished trial, a per-cell table now and then.

    Tuning shows each cell's best feasible r on val so far (the objective it minimises);
    confirmation shows the mean r on test over the seeds done so far.
    """

    def __init__(
        self,
        phase: str,
        planned: dict[str, int],
        rows: pd.DataFrame | None = None,
        every_s: float = 30.0,
    ):
        """`planned`: trials per cell this phase; `rows`: the run's rows so far (on resume)."""
        self.phase, self.planned, self.every_s = phase, planned, every_s
        self.done = dict.fromkeys(planned, 0)
        self.failed = dict.fromkeys(planned, 0)
        self.r: dict[str, list[float]] = {c: [] for c in planned}
        self.t0 = self.last = time.time()
        if rows is not None and len(rows):  # a resumed run starts from the rows it has
            for row in rows[(rows["phase"] == phase) & rows["cell"].isin(planned)].itertuples():
                self._count(row.cell, row.status == "ok", row.feasible, row.residual_val)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        for cell in _cells(trial.config):
            r = result.get(cell_key("r_val" if self.phase == "tune" else "r", cell))
            ok, feasible = (result.get(cell_key(k, cell), False) for k in ("ok", "feasible"))
            self._count(cell, ok, feasible, r)
            print(self.line(cell), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        for cell in _cells(trial.config):
            self._count(cell, False, False, None)
            print(self.line(cell), flush=True)

    def on_step(self, iteration, trials, **info):
        if time.time() - self.last >= self.every_s:
            self.last = time.time()
            print(self.table(), flush=True)

    def on_experiment_end(self, trials, **info):
        print(self.table(), flush=True)

    def _count(self, cell: str, ok: bool, feasible: bool, r: float | None) -> None:
        self.done[cell] += 1
        if not ok:
            self.failed[cell] += 1
        elif feasible or self.phase == "confirm":  # only feasible trials compete on r
            self.r[cell].append(r)

    def _r(self, cell: str) -> str:
        if not self.r[cell]:
            return "-" if self.done[cell] == self.failed[cell] else "infeasible"
        agg = min(self.r[cell]) if self.phase == "tune" else sum(self.r[cell]) / len(self.r[cell])
        return f"{agg:.3f}"

    def line(self, cell: str) -> str:
        """One finished trial: phase progress, then its cell's done/planned, r, failures."""
        done, total = sum(self.done.values()), sum(self.planned.values())
        return (
            f"[{time.time() - self.t0:7.1f}s] {self.phase} {done}/{total} | {cell} "
            f"{self.done[cell]}/{self.planned[cell]} {self.label} {self._r(cell)} "
            f"failed {self.failed[cell]}"
        )

    @property
    def label(self) -> str:
        return "best r_val" if self.phase == "tune" else "mean r"

    def table(self) -> str:
        """Every cell at once: done/planned, r so far, failures."""
        width = max(len(c) for c in self.planned)
        head = f"  {'cell':<{width}}  {'done':>9}  {self.label:>10}  {'failed':>6}"
        lines = [f"[{time.time() - self.t0:7.1f}s] {self.phase} progress", head]
        for c in self.planned:
            done = f"{self.done[c]}/{self.planned[c]}"
            lines.append(f"  {c:<{width}}  {done:>9}  {self._r(c):>10}  {self.failed[c]:>6}")
        return "\n".join(lines)


def _cells(config: dict) -> list[str]:
    """The cells a trial has rows in: its stops' (anytime budgets), then its own."""
    return [c for c, _, _ in config.get("stops", [])] + [config["cell"]]
