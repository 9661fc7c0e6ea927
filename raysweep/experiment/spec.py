"""Sweep specs: YAML in, a validated `Spec` out, or one `SpecError` line naming file, key and fix.

The binder between a spec and the registries: every section that configures a function
(dataset, model, attack, train, each method) is bound to that function's keyword-only
signature, and each value checked against the domain its parameter declares (domains.py), so a
typo or an out-of-range value fails here in a second instead of inside a trial on a cluster two
hours later. specfile.py reads the file; base/config.py holds the typed, torch-free `Spec` this
returns, its train settings filled here from train.train's signature.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Interval

from raysweep.base.config import WRITTEN, Spec, default, parse
from raysweep.base.domains import (
    EXACT_INT,
    Fraction,
    Probability,
    base,
    column_kind,
    describe,
    kind,
    refusal,
    resolve,
    typed,
)
from raysweep.base.specfile import MAX_DEPTH, SpecError, read_yaml
from raysweep.base.specfile import show as _show
from raysweep.poisoning.attacks import ATTACKS
from raysweep.poisoning.records import RECORDS
from raysweep.science.data import DATASETS
from raysweep.science.models import MODELS
from raysweep.science.train import train
from raysweep.unlearning.unlearners import UNLEARNERS

from . import footprint
from .metrics import OBJECTIVES

TOP_KEYS = {
    "name": "a name for the experiment (1-100 letters, digits, '-', '_')",
    "dataset": "{name, ...kwargs}",
    "model": "{name, ...kwargs}",
    "attack": "{name, ...kwargs}",
    "train": "kwargs of raysweep.science.train.train",
    "methods": "{method: {hyperparameter: value | {low, high[, log][, int]} | {choices}}}",
    "budgets": "list of compute fractions in (0, 1]",
    "trials_per_cell": "int >= 1, or {min: int >= 1, max: int >= min}: more only where not converged",
    "delta": "utility tolerance on clean accuracy, in [0, 1]",
    "seed": "int: poisons, checkpoints and trials of the tuning phase",
    "forget": "{known_fraction: (0, 1]}",
    "resources": "{cpu: > 0, gpu: >= 0} per trial",
    "sampler": "tpe | random",
    "confirm": "{seeds: [int, ...], oracles: int >= 2}: fresh seeds on which each cell's best "
    "setting is re-run; oracles: retrain models per seed to judge them against (optional)",
    "tried_first": "{method: [{hyperparameter: value}, ...]}: settings each study tries first",
    "objective": "what each study minimises on val: "
    + " | ".join(f"{k} ({o.doc})" for k, o in OBJECTIVES.items()),
}
REQUIRED = ("name", "dataset", "model", "attack", "train", "methods", "budgets")
# The domains of the spec's own values, declared as the functions' parameters declare theirs.
DOMAINS = {
    "trials_per_cell": Annotated[int, Interval(ge=1, le=10**6)],
    "delta": Probability,
    "seed": Annotated[int, Interval(ge=0, le=2**31 - 1)],
    "sampler": Literal["tpe", "random"],
    "budgets": Fraction,
    "forget.known_fraction": Fraction,
    "resources.cpu": Annotated[float, Interval(gt=0, le=1024)],
    "resources.gpu": Annotated[float, Interval(ge=0, le=1024)],
    "confirm.seeds": Annotated[int, Interval(ge=0, le=2**31 - 1)],
    # Retrain oracles per confirm seed (trial.prepare). At least 2: one oracle has no spread.
    "confirm.oracles": Annotated[int, Interval(ge=2, le=1000)],
}
SPACE_KEYS = ({"low", "high", "log", "int"}, {"choices"})
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")
# The most memory of any one machine for rent (AWS u7in-32tb: 32 TiB, 2025): a trial whose
# tensors need more cannot run on any machine, whatever the cluster; what this machine or a
# cluster's nodes hold is checked by the driver (preflight.check_machine, check_cluster).
MAX_NODE_BYTES = 32 * 2**40
# Cells (methods x budgets), one Optuna study each. Optuna 5.1's journal checks each new study's
# name against every study's, so a start costs time quadratic in the cells: 1.6 s for 1,000,
# 7 s for 2,000 on a busy 2-core machine (20,000 would take over ten minutes before a trial).
MAX_CELLS = 1000


def _join(key: str, name: str) -> str:
    shown = name if re.fullmatch(r"[\w-]{1,60}", name) else f"[{_show(name)}]"
    return f"{key}.{shown}" if key and shown[0] != "[" else f"{key}{shown}"


def _plain(src: str, value: Any, key: str = "", depth: int = 0) -> Any:
    """A copy of the YAML data with exponents read as floats (PyYAML reads 1e-5, no dot, as a
    string; users write it that way). Refuses what no spec holds: keys that are not strings,
    non-finite numbers, dates and other YAML types, nesting deeper than MAX_DEPTH."""
    where = key or "spec"
    if depth > MAX_DEPTH:
        raise SpecError(f"{src}: {where}: nested deeper than {MAX_DEPTH} levels; allowed: a spec")
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise SpecError(f"{src}: {where}: key {_show(k)} is not a string; allowed: names")
        return {k: _plain(src, v, _join(key, k), depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(src, v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, str) and _FLOAT.match(value):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{src}: {where}: {value} is not finite; allowed: finite numbers")
    if value is None or isinstance(value, (str, int, float)):  # bool is an int
        return value
    raise SpecError(
        f"{src}: {where}: {_show(value)} is a YAML {type(value).__name__}; allowed: numbers, "
        "strings, true/false, null, lists and mappings (quote a date to make it a string)"
    )


def _allowed(names) -> str:
    return ", ".join(sorted(names))


def _unknown(src: str, key: str, name: str, allowed) -> SpecError:
    near = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return SpecError(f"{src}: {key}: unknown key {_show(name)}{hint}; allowed: {_allowed(allowed)}")


def _check(src: str, key: str, value: Any, domain: Any) -> None:
    why = refusal(value, domain)
    if why:
        raise SpecError(f"{src}: {key}: {_show(value)} {why}; allowed: {describe(domain)}")


def keyword_params(fn) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def domain(fn, param: inspect.Parameter) -> Any:
    """The domain a parameter declares by its annotation (domains.py)."""
    return resolve(param.annotation, inspect.unwrap(fn).__globals__)  # a wrapper: its target


def _bind(src: str, key: str, fn, kwargs: dict) -> None:
    """Check every key of `kwargs` is a keyword-only parameter of `fn`, its value in the domain
    the parameter declares."""
    params = keyword_params(fn)
    for name, value in kwargs.items():
        if name not in params:
            raise _unknown(src, key, name, params)
        _check(src, f"{key}.{name}", value, domain(fn, params[name]))


def _named_section(src: str, key: str, section: Any, table: dict) -> None:
    if not isinstance(section, dict) or "name" not in section:
        raise SpecError(
            f"{src}: {key}: must be a mapping with 'name'; allowed names: {_allowed(table)}"
        )
    name = section["name"]
    if not isinstance(name, str) or name not in table:
        raise SpecError(
            f"{src}: {key}.name: unknown {key} {_show(name)}; allowed: {_allowed(table)}"
        )
    _bind(src, key, table[name], {k: v for k, v in section.items() if k != "name"})


def _held_out(src: str, section: dict) -> None:
    """A dataset's `*_fraction` parameters are shares held out of the same rows: what is left
    for training must be some (one relation between parameters, which no annotation states)."""
    params = keyword_params(DATASETS[section["name"]])
    shares = {k: section.get(k, p.default) for k, p in params.items() if k.endswith("_fraction")}
    if sum(shares.values()) >= 1:
        shown = " + ".join(f"{k}={v}" for k, v in shares.items())
        raise SpecError(f"{src}: dataset: {shown} leaves no training rows; allowed: a sum < 1")


def _space(src: str, key: str, value: Any, dom: Any) -> None:
    """A hyperparameter is a constant, a {low, high[, log][, int]} range or {choices: [...]},
    every value in the parameter's domain."""
    if not isinstance(value, dict):
        return _check(src, key, value, dom)
    if not any(set(value) <= keys and value for keys in SPACE_KEYS):
        allowed = "{low, high[, log][, int]} or {choices: [...]}"
        raise SpecError(f"{src}: {key}: bad search space keys {sorted(value)}; allowed: {allowed}")
    if "choices" in value:
        options = value["choices"]
        if not isinstance(options, list) or not options:
            raise SpecError(f"{src}: {key}.choices: {_show(options)}; allowed: a non-empty list")
        for i, c in enumerate(options):
            _check(src, f"{key}.choices[{i}]", c, dom)
        if len({json.dumps(c) for c in options}) < len(options):
            raise SpecError(f"{src}: {key}.choices: {_show(options)} repeats a value")
        return None
    if base(dom) not in (int, float):
        raise SpecError(
            f"{src}: {key}: a range over {describe(dom)}; allowed: a constant or {{choices: [...]}}"
        )
    for flag in ("log", "int"):
        _check(src, f"{key}.{flag}", value.get(flag, False), bool)
    if value.get("int") and base(dom) is not int:
        # Optuna would hand the parameter ints, which it does not take and its column records
        # as floats: what ran and what is recorded would differ in kind.
        raise SpecError(
            f"{src}: {key}.int: true on a {describe(dom)} parameter; allowed: false (a float "
            "range is sampled as floats), or {choices: [...]}"
        )
    for end in ("low", "high"):
        if value.get(end) is None:
            raise SpecError(f"{src}: {key}.{end}: missing; allowed: {describe(dom)}")
        _check(src, f"{key}.{end}", value[end], dom)
    low, high = value["low"], value["high"]
    if not low < high:
        raise SpecError(f"{src}: {key}: low={low} must be < high={high}; allowed: low < high")
    if value.get("log") and low <= 0:
        raise SpecError(f"{src}: {key}.low: {low} with log: true; allowed: low > 0")
    if _is_int(value, dom) and not (isinstance(low, int) and isinstance(high, int)):
        raise SpecError(
            f"{src}: {key}: integer parameter needs integer low/high; allowed: integers"
        )
    return None


def _is_int(space: dict, dom: Any) -> bool:
    return base(dom) is int  # `int: true` is refused on any other parameter (`_space`)


def distributions(method: str, space: dict) -> tuple[dict, dict]:
    """Split a method's validated space into Optuna distributions and constants."""
    import optuna.distributions as od

    fn = UNLEARNERS[method]
    params = keyword_params(fn)
    dists, fixed = {}, {}
    for name, value in (space or {}).items():
        dom = domain(fn, params[name])
        # Typed here, not in the spec (whose hash a resume compares): `lr: 1` runs as 1.0.
        if not isinstance(value, dict):
            fixed[name] = typed(value, dom)
        elif "choices" in value:
            dists[name] = od.CategoricalDistribution([typed(c, dom) for c in value["choices"]])
        elif _is_int(value, dom):
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
        key = _join("methods", method)
        if method not in UNLEARNERS:
            raise SpecError(f"{src}: {key}: unknown method; allowed: {_allowed(UNLEARNERS)}")
        fn = UNLEARNERS[method]
        params = keyword_params(fn)
        if not isinstance(space, (dict, type(None))):
            raise SpecError(
                f"{src}: {key}: {_show(space)}; allowed: a mapping of its hyperparameters "
                f"({_allowed(params)}), or nothing for the defaults"
            )
        for name, value in (space or {}).items():
            if name not in params:
                raise _unknown(src, key, name, params)
            _space(src, f"{key}.{name}", value, domain(fn, params[name]))
    hyperparameter_kinds(methods, src)


def hyperparameter_kinds(methods: dict, src: str = "<spec>") -> dict[str, type]:
    """The one kind of each hp_<name> column, from the domain that every method naming <name>
    declares (never the spec's literal, nor which method is listed last): ints and floats share a
    float column; any other mix, or a domain of several kinds, is refused."""
    named: dict[str, dict[str, tuple[type, Any]]] = {}  # name -> {method's key: (kind, space)}
    for method, space in methods.items():
        fn = UNLEARNERS[method]
        params = keyword_params(fn)
        for name, value in (space or {}).items():
            key, dom = f"{_join('methods', method)}.{name}", domain(fn, params[name])
            if kind(dom) is None:
                raise SpecError(
                    f"{src}: {key}: its parameter takes {describe(dom)}, values of several kinds "
                    f"that one hp_{name} column cannot hold; allowed: bool, int, float or str"
                )
            named.setdefault(name, {})[key] = (kind(dom), value)
    out = {}
    for name, by_key in named.items():
        kinds = {key: k for key, (k, _) in by_key.items()}
        out[name] = column_kind(set(kinds.values()))
        if out[name] is None:
            (a, ka), *rest = kinds.items()
            b, kb = next((key, k) for key, k in rest if column_kind({ka, k}) is None)
            raise SpecError(
                f"{src}: {b}: takes {kb.__name__} but {a} takes {ka.__name__}, and both are "
                f"recorded in column hp_{name}; allowed: one kind per hyperparameter name "
                "(int and float share a float column)"
            )
        for key, (k, value) in by_key.items():
            if k is int and out[name] is float:
                _exact(src, key, name, value)
    return dict(sorted(out.items()))


def _exact(src: str, key: str, name: str, space: Any) -> None:
    """An int parameter whose column is float (another method's <name> takes floats): each of
    its values (a range's are between its ends) must be exact as a float."""
    values = [space]
    if isinstance(space, dict):
        values = space["choices"] if "choices" in space else [space["low"], space["high"]]
    for v in values:
        if v is not None and abs(v) > EXACT_INT:
            raise SpecError(
                f"{src}: {key}: {v} is not exact as a float, and hp_{name} is a float column "
                f"(another method's {name} takes floats); allowed: int in [-2^53, 2^53] here"
            )


def _settings(src: str, raw: dict, key: str) -> dict:
    """A mapping of the spec's own (forget, resources): known keys, each value in its domain."""
    defaults = WRITTEN[key]
    section = raw.setdefault(key, default(key))
    if not isinstance(section, dict):
        raise SpecError(
            f"{src}: {key}: {_show(section)}; allowed: a mapping of {_allowed(defaults)}"
        )
    for k, v in section.items():
        if k not in defaults:
            raise _unknown(src, key, k, defaults)
        _check(src, f"{key}.{k}", v, DOMAINS[f"{key}.{k}"])
    return section


def validate(raw: Any, src: str = "<spec>") -> Spec:
    """Check a whole spec; return it as a `Spec` or raise `SpecError`."""
    if not isinstance(raw, dict):
        raise SpecError(f"{src}: top level must be a mapping; allowed keys: {_allowed(TOP_KEYS)}")
    raw = _plain(src, raw)
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown(src, "spec", key, TOP_KEYS)
    for key in REQUIRED:
        if key not in raw:
            raise SpecError(f"{src}: {key}: missing; expected {TOP_KEYS[key]}")
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", name):
        raise SpecError(f"{src}: name: {_show(name)}; allowed: 1-100 letters, digits, '-', '_'")
    _named_section(src, "dataset", raw["dataset"], DATASETS)
    _held_out(src, raw["dataset"])
    _named_section(src, "model", raw["model"], MODELS)
    _named_section(src, "attack", raw["attack"], ATTACKS)
    if not isinstance(raw["train"], dict):
        raise SpecError(
            f"{src}: train: must be a mapping; allowed: {_allowed(keyword_params(train))}"
        )
    _bind(src, "train", train, raw["train"])
    _methods(src, raw["methods"])
    budgets = raw["budgets"]
    if not isinstance(budgets, list) or not budgets:
        raise SpecError(f"{src}: budgets: must be a non-empty list; allowed: fractions in (0, 1]")
    for i, b in enumerate(budgets):
        _check(src, f"budgets[{i}]", b, DOMAINS["budgets"])
    if len(set(budgets)) < len(budgets):
        raise SpecError(f"{src}: budgets: {_show(budgets)} repeats a budget; allowed: distinct")
    if len(budgets) * len(raw["methods"]) > MAX_CELLS:
        raise SpecError(
            f"{src}: budgets: {len(budgets)} budgets x {len(raw['methods'])} methods = "
            f"{len(budgets) * len(raw['methods'])} cells; allowed: at most {MAX_CELLS} cells "
            "(one Optuna study each)"
        )
    # The spec's own defaults (config.WRITTEN) are written into its data, as they always were:
    # its hash and the stored spec.json hold them.
    for key in ("delta", "seed", "sampler"):
        _check(src, key, raw.setdefault(key, default(key)), DOMAINS[key])
    _trials_per_cell(src, raw.setdefault("trials_per_cell", default("trials_per_cell")))
    forget = _settings(src, raw, "forget")
    forget.setdefault("known_fraction", default("forget")["known_fraction"])
    _settings(src, raw, "resources")
    raw.setdefault("confirm", default("confirm"))
    _confirm(src, raw["confirm"], raw["seed"])
    # config.UNWRITTEN: no default written, specs without the key keep their hash (and resume).
    _tried_first(src, raw.get("tried_first", default("tried_first")), raw["methods"])
    spec = parse(raw, src, train_defaults())
    _objective(src, spec)
    _fits_a_machine(spec)
    return spec


def _objective(src: str, spec: Spec) -> None:
    """The objective exists and is defined for the spec's attack (anderson_darling needs
    per-poison scores: `Attack.scores` in the attack's record)."""
    name, attack = spec.objective, spec.attack["name"]
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise SpecError(
            f"{src}: objective: unknown objective {_show(name)}; allowed: {_allowed(OBJECTIVES)}"
        )
    scores = attack in RECORDS and RECORDS[attack].scores  # an unknown attack fails elsewhere
    allowed = [k for k, o in OBJECTIVES.items() if scores or not o.needs_scores]
    if name not in allowed:
        raise SpecError(
            f"{src}: objective: {_show(name)} is not defined for attack {_show(attack)}; "
            f"allowed: {_allowed(allowed)}"
        )


def train_defaults() -> dict[str, Any]:
    """train.train's keyword defaults: what a spec's train section leaves out runs as."""
    return {name: p.default for name, p in keyword_params(train).items()}


def _trials_per_cell(src: str, value: Any) -> None:
    if not isinstance(value, dict):
        _check(src, "trials_per_cell", value, DOMAINS["trials_per_cell"])
        return
    if set(value) != {"min", "max"}:
        raise SpecError(
            f"{src}: trials_per_cell: {_show(value)}; allowed: an int >= 1, or a mapping of "
            "exactly min and max"
        )
    for k in ("min", "max"):
        _check(src, f"trials_per_cell.{k}", value[k], DOMAINS["trials_per_cell"])
    if value["max"] < value["min"]:
        raise SpecError(
            f"{src}: trials_per_cell: max {value['max']} < min {value['min']}; allowed: max >= min"
        )


def _fits_a_machine(spec: Spec) -> None:
    """One trial's tensors, counted on meta tensors, fit in the largest machine there is."""
    try:
        fp = footprint.trial(spec)
    except (footprint.Uncountable, MemoryError):  # a list of 2**40 layers fails to allocate
        raise SpecError(
            f"{spec.source}: model: {_show(spec.model)} has more than "
            f"{footprint.MAX_MODULES} modules; allowed: at most that (what can be counted "
            "before anything runs)"
        ) from None
    except (ValueError, AssertionError, RuntimeError):
        return  # a model that cannot be built for its inputs: preflight.check_fits says why
    if fp.peak > MAX_NODE_BYTES:
        key, value, needs = footprint.culprit(spec, fp)
        raise SpecError(
            f"{spec.source}: {key}: {_show(value)}: {needs}; allowed: at most "
            f"{footprint.show(MAX_NODE_BYTES)} per trial, the most memory of any machine for rent"
        )


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
        fn = UNLEARNERS[method]
        params = keyword_params(fn)
        for i, setting in enumerate(settings):
            if not isinstance(setting, dict) or not setting:
                raise SpecError(
                    f"{src}: {key}[{i}]: {setting!r}; allowed: a mapping of {_allowed(space)}"
                )
            for name, value in setting.items():
                if name not in space:
                    raise _unknown(src, f"{key}[{i}]", name, space)
                _inside(src, f"{key}[{i}].{name}", value, space[name], domain(fn, params[name]))


def _inside(src: str, key: str, value: Any, space: dict, dom: Any) -> None:
    """`value` is one a study could sample from `space` (a {low, high} range or {choices}), of
    the kind its parameter takes: Optuna hands an enqueued value to its trial as written (True
    for 1, 1 for 1.0) but records it in the journal as sampled, and the two must not differ."""
    if "choices" in space:
        choices = [typed(c, dom) for c in space["choices"]]
        allowed = _show(choices)
    else:
        inside = Annotated[kind(dom), Interval(ge=space["low"], le=space["high"])]
        allowed = describe(inside)
    if value is not None and type(value) is not kind(dom):
        written = f" (write {float(value)!r})" if kind(dom) is float and type(value) is int else ""
        raise SpecError(
            f"{src}: {key}: {_show(value)} is {type(value).__name__}; allowed: {allowed}{written}"
        )
    if "choices" not in space:
        return _check(src, key, value, inside)
    if value not in choices:
        raise SpecError(f"{src}: {key}: {_show(value)}; allowed: {allowed}")
    return None


def _confirm(src: str, confirm: Any, seed: int) -> None:
    """Confirmation seeds must be fresh: distinct, and not the tuning seed (new poisons, new models).
    `oracles` (optional, no default written: specs without it keep their hash) is checked
    against its domain."""
    if not isinstance(confirm, dict):
        raise SpecError(f"{src}: confirm: must be a mapping; allowed keys: seeds, oracles")
    for k in confirm:
        if k not in ("seeds", "oracles"):
            raise _unknown(src, "confirm", k, ["seeds", "oracles"])
    if "oracles" in confirm:
        _check(src, "confirm.oracles", confirm["oracles"], DOMAINS["confirm.oracles"])
    seeds = confirm.setdefault("seeds", default("confirm")["seeds"])
    if not isinstance(seeds, list):
        raise SpecError(f"{src}: confirm.seeds: {_show(seeds)}; allowed: a list of ints")
    for i, s in enumerate(seeds):
        _check(src, f"confirm.seeds[{i}]", s, DOMAINS["confirm.seeds"])
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{src}: confirm.seeds: {seeds} repeats a seed; allowed: distinct seeds")
    if seed in seeds:
        raise SpecError(
            f"{src}: confirm.seeds: {seed} is the tuning seed; allowed: seeds other than {seed}"
        )


def load(path: str | Path) -> Spec:
    """Read and validate a spec file."""
    return validate(read_yaml(Path(path)), str(path))
