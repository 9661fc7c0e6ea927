"""A sweep spec as typed, frozen data: what a run was asked to do, readable without torch.

`parse` turns a spec's plain data (a validated YAML file, or the `spec` of a run's stored
spec.json) into a `Spec`. It checks nothing: experiment/spec.py validates the data against the
registries' signatures first, and hands `parse` the defaults it reads from them (train.train's
keyword defaults), so no module restates a default. The spec's own defaults are stated here,
once (`WRITTEN`, `UNWRITTEN`).

Sections bound to a registry entry (dataset, model, attack: `{name, ...kwargs}`; methods' search
spaces; tried_first) stay plain dicts as written: their keys are the entry's parameters.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

# The spec's own defaults that validation writes into the spec's data, as it always has: the
# spec hash and the stored spec.json hold them.
WRITTEN: dict[str, Any] = {
    "delta": 0.02,
    "seed": 0,
    "sampler": "tpe",
    "trials_per_cell": 8,
    "forget": {"known_fraction": 1.0},
    "resources": {"cpu": 1, "gpu": 0},
    "confirm": {"seeds": []},
}
# Defaults that only the typed view holds: a spec without these keys keeps its hash (and a run
# started before the key existed stays resumable). confirm.oracles 0: no retrain oracles.
UNWRITTEN: dict[str, Any] = {"objective": "residual", "tried_first": {}, "confirm.oracles": 0}


def default(key: str) -> Any:
    """A fresh copy of `key`'s default (a spec must not share a default's list with another)."""
    return copy.deepcopy(WRITTEN[key] if key in WRITTEN else UNWRITTEN[key])


@dataclass(frozen=True)
class Train:
    """train.train's keyword arguments, each as the spec wrote it or as its signature defaults
    (experiment/spec.py fills them; tests/test_spec.py checks the fields are its parameters)."""

    epochs: int
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    optimizer: str
    precision: str
    accumulate: int
    shift: int
    flip: bool

    def kwargs(self) -> dict[str, Any]:
        """As keyword arguments of train.train."""
        return asdict(self)


@dataclass(frozen=True)
class Forget:
    known_fraction: float  # of the poisons, known to the unlearner (S_f): partial discovery


@dataclass(frozen=True)
class Resources:
    """What one trial asks Ray for."""

    cpu: float
    gpu: float


@dataclass(frozen=True)
class Confirm:
    seeds: tuple[int, ...]  # fresh seeds each cell's best setting is re-run on
    oracles: int  # retrain oracles per confirm seed to judge it against; 0: none


@dataclass(frozen=True)
class Spec:
    """A validated spec: its sections typed, every default filled, `raw` the data as validated."""

    source: str  # the file (or '<trial>', '<spec>') errors name
    raw: dict  # the validated data: what is hashed, stored as spec.json, and sent to workers
    name: str
    dataset: dict  # {name, ...its keyword params as written}
    model: dict
    attack: dict
    # None only where the spec was read without the registries (`parse` with no train
    # defaults: a report reading spec.json); experiment.spec.validate and load always fill it.
    train: Train | None
    methods: dict  # {method: {hyperparameter: constant | {low, high[, log][, int]} | {choices}}}
    budgets: tuple[float, ...]
    trials_per_cell: int | dict  # as written: n, or {min, max} (see `trials_range`)
    delta: float
    seed: int
    sampler: str
    forget: Forget
    resources: Resources
    confirm: Confirm
    tried_first: dict  # {method: [{hyperparameter: value}, ...]}
    objective: str  # experiment.metrics.OBJECTIVES' name

    @property
    def hash(self) -> str:
        blob = json.dumps(self.raw, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def cells(self) -> list[tuple[str, float]]:
        """(method, budget) pairs: one Optuna study each."""
        return [(m, b) for m in self.methods for b in self.budgets]

    def trials_range(self) -> tuple[int, int]:
        """(min, max) settings each cell observes: a plain int n is (n, n), a fixed budget.
        Between the two, a cell gets trials only until convergence.STOP_RULE lets it stop
        (searcher.CellSearcher)."""
        n = self.trials_per_cell
        return (n["min"], n["max"]) if isinstance(n, dict) else (n, n)


def parse(raw: dict, source: str = "<spec>", train_defaults: Mapping | None = None) -> Spec:
    """`raw`, a validated spec's data, as a `Spec` (holding `raw` itself); `train_defaults`:
    train.train's keyword defaults (experiment.spec passes them; without, `Spec.train` is None).
    Checks nothing."""
    confirm = raw.get("confirm", {})
    return Spec(
        source=source,
        raw=raw,
        name=raw["name"],
        dataset=raw["dataset"],
        model=raw["model"],
        attack=raw["attack"],
        train=None if train_defaults is None else Train(**{**train_defaults, **raw["train"]}),
        methods=raw["methods"],
        budgets=tuple(raw["budgets"]),
        trials_per_cell=raw.get("trials_per_cell", default("trials_per_cell")),
        delta=raw.get("delta", default("delta")),
        seed=raw.get("seed", default("seed")),
        sampler=raw.get("sampler", default("sampler")),
        forget=Forget(**{**default("forget"), **raw.get("forget", {})}),
        resources=Resources(**{**default("resources"), **raw.get("resources", {})}),
        confirm=Confirm(
            seeds=tuple(confirm.get("seeds", default("confirm")["seeds"])),
            oracles=confirm.get("oracles", default("confirm.oracles")),
        ),
        tried_first=raw.get("tried_first", default("tried_first")),
        objective=raw.get("objective", default("objective")),
    )
