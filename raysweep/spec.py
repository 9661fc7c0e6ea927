"""Sweep specs: YAML in, a validated `Spec` out, or one `SpecError` line naming file, key and fix.

Every section that configures a function (dataset, model, attack, train, each method) is bound
to that function's keyword-only signature, so a typo fails here in a second instead of inside a
trial on a cluster two hours later.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .attacks import ATTACKS
from .data import DATASETS
from .models import MODELS
from .train import train
from .unlearners import UNLEARNERS

TOP_KEYS = {
    "name": "a name for the experiment (letters, digits, '-', '_')",
    "dataset": "{name, ...kwargs}",
    "model": "{name, ...kwargs}",
    "attack": "{name, ...kwargs}",
    "train": "kwargs of raysweep.train.train",
    "methods": "{method: {hyperparameter: value | {low, high[, log][, int]} | {choices}}}",
    "budgets": "list of compute fractions in (0, 1]",
    "trials_per_cell": "int >= 1",
    "delta": "utility tolerance on clean accuracy, in [0, 1]",
    "seed": "int: poisons, checkpoints and trials of the tuning phase",
    "forget": "{known_fraction: (0, 1]}",
    "resources": "{cpu: > 0, gpu: >= 0} per trial",
    "sampler": "tpe | random",
    "confirm": "{seeds: [int, ...]}: fresh seeds on which each cell's best setting is re-run",
    "tried_first": "{method: [{hyperparameter: value}, ...]}: settings each study tries first",
}
REQUIRED = ("name", "dataset", "model", "attack", "train", "methods", "budgets")
SAMPLERS = ("tpe", "random")
SPACE_KEYS = ({"low", "high", "log", "int"}, {"choices"})
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


class SpecError(ValueError):
    """A spec problem, as one line: '<file>: <key>: <what is wrong>; allowed: <values>'."""


@dataclass(frozen=True)
class Spec:
    source: str
    raw: dict  # the validated spec as plain data (what travels to Ray workers)

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def hash(self) -> str:
        blob = json.dumps(self.raw, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __getattr__(self, key: str) -> Any:
        # Sections read as attributes: spec.dataset, spec.methods, spec.budgets, ...
        try:
            return self.__dict__["raw"][key]
        except KeyError:
            raise AttributeError(key) from None

    def cells(self) -> list[tuple[str, float]]:
        """(method, budget) pairs: one Optuna study each."""
        return [(m, b) for m in self.raw["methods"] for b in self.raw["budgets"]]


def _coerce(value: Any) -> Any:
    # PyYAML reads 1e-5 (no dot) as a string; users write it that way, so read it as a float.
    if isinstance(value, dict):
        return {k: _coerce(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_coerce(v) for v in value]
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    return value


def _allowed(names) -> str:
    return ", ".join(sorted(names))


def _unknown(src: str, key: str, name: str, allowed) -> SpecError:
    near = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return SpecError(f"{src}: {key}: unknown key '{name}'{hint}; allowed: {_allowed(allowed)}")


def keyword_params(fn) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_type(src: str, key: str, value: Any, default: Any) -> None:
    """`value` must have the type of the parameter's default (an int is fine for a float)."""
    if default is None:
        return
    expected = type(default)
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise SpecError(
            f"{src}: {key}: {value!r} is not {expected.__name__}; allowed: {expected.__name__}"
        )


def choices(fn, param: inspect.Parameter) -> tuple | None:
    """The allowed values of a parameter annotated `Literal[...]`, else None.

    Annotations are strings here (postponed evaluation): evaluated in `fn`'s own module (our
    source, never user input); one naming what is imported for type checking alone is skipped.
    """
    ann = param.annotation
    if isinstance(ann, str):
        try:
            ann = eval(ann, fn.__globals__)
        except NameError:
            return None
    return typing.get_args(ann) if typing.get_origin(ann) is Literal else None


def _bind(src: str, key: str, fn, kwargs: dict) -> None:
    """Check every key of `kwargs` is a keyword-only parameter of `fn` of the default's type
    (and one of its values, where the parameter is annotated `Literal[...]`)."""
    params = keyword_params(fn)
    for name, value in kwargs.items():
        if name not in params:
            raise _unknown(src, key, name, params)
        _check_type(src, f"{key}.{name}", value, params[name].default)
        allowed = choices(fn, params[name])
        if allowed is not None and value not in allowed:
            shown = ", ".join(map(str, allowed))
            raise SpecError(f"{src}: {key}.{name}: {value!r}; allowed: {shown}")


def _named_section(src: str, key: str, section: Any, table: dict) -> None:
    if not isinstance(section, dict) or "name" not in section:
        raise SpecError(
            f"{src}: {key}: must be a mapping with 'name'; allowed names: {_allowed(table)}"
        )
    if section["name"] not in table:
        raise SpecError(
            f"{src}: {key}.name: unknown {key} '{section['name']}'; allowed: {_allowed(table)}"
        )
    _bind(src, key, table[section["name"]], {k: v for k, v in section.items() if k != "name"})


def _space(src: str, key: str, value: Any, default: Any) -> None:
    """A hyperparameter is a constant, a {low, high[, log][, int]} range or {choices: [...]}."""
    if not isinstance(value, dict):
        return _check_type(src, key, value, default)
    if not any(set(value) <= keys and value for keys in SPACE_KEYS):
        allowed = "{low, high[, log][, int]} or {choices: [...]}"
        raise SpecError(f"{src}: {key}: bad search space keys {sorted(value)}; allowed: {allowed}")
    if "choices" in value:
        if not isinstance(value["choices"], list) or not value["choices"]:
            raise SpecError(f"{src}: {key}.choices: must be a non-empty list")
        for c in value["choices"]:
            _check_type(src, f"{key}.choices", c, default)
        return None
    low, high = value.get("low"), value.get("high")
    for k, v in (("low", low), ("high", high)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise SpecError(f"{src}: {key}.{k}: {v!r} is not a number; allowed: a number")
    if not low < high:
        raise SpecError(f"{src}: {key}: low={low} must be < high={high}; allowed: low < high")
    if value.get("log") and low <= 0:
        raise SpecError(f"{src}: {key}.low: {low} with log: true; allowed: low > 0")
    if _is_int(value, default) and not (isinstance(low, int) and isinstance(high, int)):
        raise SpecError(
            f"{src}: {key}: integer parameter needs integer low/high; allowed: integers"
        )
    return None


def _is_int(space: dict, default: Any) -> bool:
    return bool(space.get("int")) or (isinstance(default, int) and not isinstance(default, bool))


def distributions(method: str, space: dict) -> tuple[dict, dict]:
    """Split a method's validated space into Optuna distributions and constants."""
    import optuna.distributions as od

    params = keyword_params(UNLEARNERS[method])
    dists, fixed = {}, {}
    for name, value in (space or {}).items():
        if not isinstance(value, dict):
            fixed[name] = value
        elif "choices" in value:
            dists[name] = od.CategoricalDistribution(value["choices"])
        elif _is_int(value, params[name].default):
            dists[name] = od.IntDistribution(
                value["low"], value["high"], log=bool(value.get("log"))
            )
        else:
            dists[name] = od.FloatDistribution(
                float(value["low"]), float(value["high"]), log=bool(value.get("log"))
            )
    return dists, fixed


def _methods(src: str, methods: Any) -> None:
    if not isinstance(methods, dict) or not methods:
        raise SpecError(
            f"{src}: methods: must be a non-empty mapping; allowed: {_allowed(UNLEARNERS)}"
        )
    for method, space in methods.items():
        if method not in UNLEARNERS:
            raise SpecError(
                f"{src}: methods.{method}: unknown method; allowed: {_allowed(UNLEARNERS)}"
            )
        params = keyword_params(UNLEARNERS[method])
        for name, value in (space or {}).items():
            if name not in params:
                raise _unknown(src, f"methods.{method}", name, params)
            _space(src, f"methods.{method}.{name}", value, params[name].default)


def _number(src: str, key: str, value: Any, lo: float, hi: float, lo_open: bool, kind=float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and isinstance(value, int)
    if ok and (value > lo if lo_open else value >= lo) and value <= hi:
        return
    bracket = "(" if lo_open else "["
    raise SpecError(
        f"{src}: {key}: {value!r} out of range; allowed: {kind.__name__} in {bracket}{lo}, {hi}]"
    )


def validate(raw: Any, src: str = "<spec>") -> Spec:
    """Check a whole spec; return it as a `Spec` or raise `SpecError`."""
    if not isinstance(raw, dict):
        raise SpecError(f"{src}: top level must be a mapping; allowed keys: {_allowed(TOP_KEYS)}")
    raw = _coerce(raw)
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown(src, "spec", key, TOP_KEYS)
    for key in REQUIRED:
        if key not in raw:
            raise SpecError(f"{src}: {key}: missing; expected {TOP_KEYS[key]}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", str(raw["name"])):
        raise SpecError(f"{src}: name: {raw['name']!r}; allowed: letters, digits, '-', '_'")
    _named_section(src, "dataset", raw["dataset"], DATASETS)
    _named_section(src, "model", raw["model"], MODELS)
    _named_section(src, "attack", raw["attack"], ATTACKS)
    if not isinstance(raw["train"], dict):
        raise SpecError(
            f"{src}: train: must be a mapping; allowed: {_allowed(keyword_params(train))}"
        )
    _bind(src, "train", train, raw["train"])
    _methods(src, raw["methods"])
    if not isinstance(raw["budgets"], list) or not raw["budgets"]:
        raise SpecError(f"{src}: budgets: must be a non-empty list; allowed: fractions in (0, 1]")
    for i, b in enumerate(raw["budgets"]):
        _number(src, f"budgets[{i}]", b, 0, 1, lo_open=True)
    raw.setdefault("trials_per_cell", 8)
    _number(src, "trials_per_cell", raw["trials_per_cell"], 1, 10**6, False, int)
    raw.setdefault("delta", 0.02)
    _number(src, "delta", raw["delta"], 0, 1, lo_open=False)
    raw.setdefault("seed", 0)
    _number(src, "seed", raw["seed"], 0, 2**31 - 1, False, int)
    raw.setdefault("forget", {"known_fraction": 1.0})
    for k in raw["forget"]:
        if k != "known_fraction":
            raise _unknown(src, "forget", k, ["known_fraction"])
    _number(src, "forget.known_fraction", raw["forget"].get("known_fraction", 1.0), 0, 1, True)
    raw.setdefault("resources", {"cpu": 1, "gpu": 0})
    for k, v in raw["resources"].items():
        if k not in ("cpu", "gpu"):
            raise _unknown(src, "resources", k, ["cpu", "gpu"])
        _number(src, f"resources.{k}", v, 0, 1024, lo_open=(k == "cpu"))
    raw.setdefault("sampler", "tpe")
    if raw["sampler"] not in SAMPLERS:
        raise SpecError(f"{src}: sampler: '{raw['sampler']}'; allowed: {_allowed(SAMPLERS)}")
    raw.setdefault("confirm", {"seeds": []})
    _confirm(src, raw["confirm"], raw["seed"])
    # No default written: specs without the key keep their hash (and stay resumable).
    _tried_first(src, raw.get("tried_first", {}), raw["methods"])
    return Spec(src, raw)


def _tried_first(src: str, tried: Any, methods: dict) -> None:
    """Published settings (the paper's grid, the method authors' defaults): each must name only
    the method's searched hyperparameters, each value inside its range or among its choices."""
    if not isinstance(tried, dict):
        raise SpecError(f"{src}: tried_first: must be a mapping; allowed keys: {_allowed(methods)}")
    for method, settings in tried.items():
        key = f"tried_first.{method}"
        if method not in methods:
            raise _unknown(src, "tried_first", method, methods)
        if not isinstance(settings, list):
            raise SpecError(f"{src}: {key}: {settings!r}; allowed: a list of mappings")
        space = {k: v for k, v in (methods[method] or {}).items() if isinstance(v, dict)}
        params = keyword_params(UNLEARNERS[method])
        for i, setting in enumerate(settings):
            if not isinstance(setting, dict) or not setting:
                raise SpecError(
                    f"{src}: {key}[{i}]: {setting!r}; allowed: a mapping of {_allowed(space)}"
                )
            for name, value in setting.items():
                if name not in space:
                    raise _unknown(src, f"{key}[{i}]", name, space)
                _inside(src, f"{key}[{i}].{name}", value, space[name], params[name].default)


def _inside(src: str, key: str, value: Any, space: dict, default: Any) -> None:
    """`value` is one a study could sample from `space` (a {low, high} range or {choices})."""
    if "choices" in space:
        if value not in space["choices"]:
            raise SpecError(f"{src}: {key}: {value!r}; allowed: {space['choices']}")
        return
    kind = int if _is_int(space, default) else float
    _number(src, key, value, space["low"], space["high"], lo_open=False, kind=kind)


def _confirm(src: str, confirm: Any, seed: int) -> None:
    """Confirmation seeds must be fresh: distinct, and not the tuning seed (new poisons, new models)."""
    if not isinstance(confirm, dict):
        raise SpecError(f"{src}: confirm: must be a mapping; allowed keys: seeds")
    for k in confirm:
        if k != "seeds":
            raise _unknown(src, "confirm", k, ["seeds"])
    seeds = confirm.setdefault("seeds", [])
    if not isinstance(seeds, list):
        raise SpecError(f"{src}: confirm.seeds: {seeds!r}; allowed: a list of ints")
    for i, s in enumerate(seeds):
        _number(src, f"confirm.seeds[{i}]", s, 0, 2**31 - 1, False, int)
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{src}: confirm.seeds: {seeds} repeats a seed; allowed: distinct seeds")
    if seed in seeds:
        raise SpecError(
            f"{src}: confirm.seeds: {seed} is the tuning seed; allowed: seeds other than {seed}"
        )


def load(path: str | Path) -> Spec:
    """Read and validate a spec file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return validate(raw, str(path))
