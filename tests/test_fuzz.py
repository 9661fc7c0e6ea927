"""Fuzzed specs (issue 17): mutants of every shipped spec are refused in one line (exit 2 from
`raysweep validate`), or they validate and are then valid: every value in its parameter's
declared domain as pydantic (a second reader of the annotations) sees it, Optuna accepts every
search space, and validated mutants of quickstart run one trial. Each test has a fixed @seed:
every run tests the same specs.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import math
import resource
import signal
import tempfile
import time
import typing
from collections import Counter
from pathlib import Path

import pytest
import yaml
from annotated_types import Ge, GroupedMetadata, Gt, Le, Lt
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from raysweep import cli
from raysweep.base.storage import open_store
from raysweep.experiment.spec import DOMAINS, distributions, domain, keyword_params, load, validate
from raysweep.experiment.trial import run_trial
from raysweep.poisoning.attacks import ATTACKS
from raysweep.science.data import DATASETS
from raysweep.science.models import MODELS
from raysweep.science.train import train
from raysweep.unlearning.unlearners import UNLEARNERS

pydantic = pytest.importorskip("pydantic")

ROOT = Path(__file__).parent.parent
SPECS = sorted(ROOT.glob("search_spaces/*.yaml"))
PER_SPEC = 25  # x 13 shipped specs: 325 generated specs in plain `pytest`
TRIALS = 30
SEEDED = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
COUNTS: Counter = Counter()  # over this module's tests, for the summary line they print


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # the C emitter: 10x faster
    def ignore_aliases(self, data):
        return True  # a value shared by two places is written twice: aliases are tested apart


NAN, INF = float("nan"), float("inf")
DEEP = json.loads("[" * 40 + "0" + "]" * 40)  # nested 40 levels deep
BAD = [
    None, True, False, 0, -1, -60, 1, 2, 1.5, 0.0, 1e-300, 10**30, 2**63, -(10**30), 1e308,
    NAN, INF, -INF, "", "abc", "no", "1e999", "1e5", [], [1, 2], {}, {"a": 1}, {5: 1},
    {"low": -1, "high": 0.1, "log": True}, {"low": 1, "high": 1}, {"low": 0.5, "high": 0.1},
    {"low": 1, "high": 3, "log": "no"}, {"low": 0.1, "high": 3, "int": True}, {"choices": []},
    {"choices": [NAN]}, {"choices": [1, 1]}, datetime.date(2024, 1, 1), "x" * 10_000,
    DEEP, ["mlp"],
]  # fmt: skip
ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)

# ------------------------------------------------------------------ domains, read a second way


def _bounds(dom):
    """(kind, low, low closed, high, high closed) of a declared domain (None: unbounded)."""
    if typing.get_origin(dom) is typing.Union:
        dom = typing.get_args(dom)[0]
    if typing.get_origin(dom) is not typing.Annotated:
        return dom, None, False, None, False
    kind, *meta = typing.get_args(dom)
    meta = [m for g in meta for m in (g if isinstance(g, GroupedMetadata) else [g])]
    lo = [(m.gt, False) for m in meta if isinstance(m, Gt)]
    lo += [(m.ge, True) for m in meta if isinstance(m, Ge)]
    hi = [(m.lt, False) for m in meta if isinstance(m, Lt)]
    hi += [(m.le, True) for m in meta if isinstance(m, Le)]
    return kind, *(lo[0] if lo else (None, False)), *(hi[0] if hi else (None, False))


def _edges(dom, default) -> list:
    """In-domain values at or near the domain's edges, and a moderate one."""
    kind, lo, lo_closed, hi, hi_closed = _bounds(dom)
    if typing.get_origin(kind) is typing.Literal:
        return list(typing.get_args(kind))
    if kind is bool:
        return [not default]
    if kind is int:
        start = lo if lo_closed else (lo + 1 if lo is not None else default - 1)
        return [start, start + 1, max(default or start, start) * 2]
    if kind is float and lo is not None and hi is not None:
        span = hi - lo
        top = hi if hi_closed else hi - span / 100
        return [lo if lo_closed else lo + span / 100, lo + span / 2, top]
    if kind is float:
        return [0.0 if lo_closed else default / 1000, default, default * 10]
    return [default]


def _outside(dom) -> list:
    """Values just outside the domain: past each bound, and of the wrong type."""
    kind, lo, lo_closed, hi, hi_closed = _bounds(dom)
    step = 1 if kind is int else 1e-9
    out = [] if lo is None else [lo - step if lo_closed else lo]
    out += [] if hi is None else [hi + step if hi_closed else hi]
    return out + [{int: 1.5, float: "0.5", bool: 1, str: 7}.get(kind, None)]


_ADAPTERS: dict = {}


def _in_domain(value, dom) -> None:
    """pydantic's reading of the declared domain (strict types, finite floats) accepts `value`."""
    key = repr(dom)
    if key not in _ADAPTERS:
        config = pydantic.ConfigDict(strict=True, allow_inf_nan=False)
        _ADAPTERS[key] = pydantic.TypeAdapter(dom, config=config)
    _ADAPTERS[key].validate_python(value)


# ------------------------------------------------------------------ mutations


def _sections(tree: dict) -> dict:
    """The spec's sections bound to a function: path -> function."""
    found = {}
    for key, table in (("dataset", DATASETS), ("model", MODELS), ("attack", ATTACKS)):
        section = tree.get(key)
        if isinstance(section, dict) and str(section.get("name")) in table:
            found[(key,)] = table[section["name"]]
    if isinstance(tree.get("train"), dict):
        found[("train",)] = train
    methods = tree.get("methods")
    for method, space in (methods if isinstance(methods, dict) else {}).items():
        if method in UNLEARNERS and isinstance(space, dict):
            found[("methods", method)] = UNLEARNERS[method]
    return found


def _paths(tree, prefix=()):
    """Every place in the spec: (path to the container, key or index)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        yield prefix, k
        if isinstance(v, (dict, list)) and v:
            yield from _paths(v, (*prefix, k))


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# Declared keys (spec.DOMAINS) no shipped spec writes, with their default: the path mutations
# below never reach them, so "optional" adds one at or past its domain's edge.
OPTIONAL = {"confirm.oracles": 2}


@st.composite
def _tree_mutation(draw, tree: dict) -> str:
    """Change the spec in place: a parameter at or past its domain's edge, an optional key added
    at or past its edge, a value replaced or transformed, a key deleted, an unknown key added."""
    kinds = ["edge", "edge", "optional", "replace", "any", "transform", "delete", "add"]
    kind = draw(st.sampled_from(kinds))
    if kind == "optional":
        key = draw(st.sampled_from(sorted(OPTIONAL)))
        *where, name = key.split(".")
        parent = tree
        for k in where:  # a section a previous mutation replaced by a non-mapping stays so
            parent = parent.get(k) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            dom = DOMAINS[key]
            parent[name] = draw(st.sampled_from(_edges(dom, OPTIONAL[key]) + _outside(dom)))
        return kind
    sections = _sections(tree)
    if kind == "edge" and sections:
        where = draw(st.sampled_from(sorted(sections)))
        params = keyword_params(sections[where])
        name = draw(st.sampled_from(sorted(params)))
        dom = domain(sections[where], params[name])
        _at(tree, where)[name] = draw(
            st.sampled_from(_edges(dom, params[name].default) + _outside(dom))
        )
        return kind
    where, key = draw(st.sampled_from(list(_paths(tree))))
    parent = _at(tree, where)
    old = parent[key]
    if kind == "replace":
        parent[key] = copy.deepcopy(draw(st.sampled_from(BAD)))
    elif kind == "any":
        parent[key] = draw(ANY)
    elif kind == "transform":  # near the old value: many of these are still valid
        options = [[old], {"low": old, "high": old}, str(old), {"choices": [old, old]}]
        if isinstance(old, (int, float)) and not isinstance(old, bool) and math.isfinite(old):
            options += [old * 2, old // 2, old / 2, old + 1, old - 1, -old, 0 * old, old + 0.5]
            options += [old * 10**6, old * 1e300, round(old)]
        parent[key] = draw(st.sampled_from(options))
    elif kind == "delete":
        del parent[key]
    else:  # an unknown key (no mapping of a spec is open), or a key that is no string
        target = old if isinstance(old, dict) else parent if isinstance(parent, dict) else None
        if target is not None:
            target[draw(st.sampled_from(["zz_" + draw(st.text(max_size=6)), 5, None, 1.5]))] = 1
    return kind


@st.composite
def _text_mutation(draw, text: str, tree: dict) -> tuple[bytes, str]:
    """What only the file's text can carry: repeated keys, aliases, bad bytes, truncation."""
    kinds = ["none"] * 5 + ["dup", "alias", "bytes", "cut", "control"]
    kind = draw(st.sampled_from(kinds))
    at = draw(st.integers(0, len(text)))
    if kind == "dup" and tree:
        key = draw(st.sampled_from(sorted(tree, key=str)))
        text += yaml.dump({key: tree[key]}, Dumper=_Dumper)
    elif kind == "alias":
        text = "zz_anchor: &a [1, 2]\n" + text + "zz_alias: *a\n"
    elif kind == "bytes":
        return text[:at].encode() + b"\xff\xfe" + text[at:].encode(), kind
    elif kind == "cut":
        text = text[:at]
    elif kind == "control":
        text = text[:at] + "\x07" + text[at:]
    return text.encode(), kind


def _must_refuse(tree, depth=0) -> bool:
    """Values no spec may hold anywhere: non-finite numbers, dates, keys that are no strings,
    unknown keys (every mapping of a spec is closed), nesting past 16 levels."""
    if depth > 16:
        return True
    if isinstance(tree, dict):
        bad_key = any(not isinstance(k, str) or k.startswith("zz_") for k in tree)
        return bad_key or any(_must_refuse(v, depth + 1) for v in tree.values())
    if isinstance(tree, list):
        return any(_must_refuse(v, depth + 1) for v in tree)
    if isinstance(tree, float):
        return not math.isfinite(tree)
    return isinstance(tree, (datetime.date, datetime.datetime))


# ------------------------------------------------------------------ checks


@contextlib.contextmanager
def _time_limit(seconds: int):
    """No hang: SIGALRM interrupts whatever runs past `seconds`."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _validate(path: Path) -> tuple[int, str, str]:
    """`raysweep validate PATH` in this process, in bounded time: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _time_limit(20):
        rc = cli.main(["validate", str(path)])
    return rc, out.getvalue(), err.getvalue()


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak so far (KiB)


def _assert_valid(spec) -> None:
    """What a validated spec promises, checked by other readers than the validator."""
    raw = json.loads(json.dumps(spec.raw, allow_nan=False))  # plain, finite JSON
    assert raw == spec.raw and spec.cells()
    assert validate(raw, "<trial>").hash == spec.hash  # each trial validates it again
    for where, fn in _sections(raw).items():
        section, params = _at(raw, where), keyword_params(fn)
        assert set(section) - {"name"} <= set(params)
        for name, value in section.items():
            if name == "name" and where[0] != "methods":
                continue
            dom = domain(fn, params[name])
            if where[0] != "methods" or not isinstance(value, dict):
                _in_domain(value, dom)
            else:  # a search space: its ends or its choices
                for v in value.get("choices") or [value["low"], value["high"]]:
                    _in_domain(v, dom)
    assert set(raw["methods"]) <= set(UNLEARNERS)
    for method, space in raw["methods"].items():
        distributions(method, space)  # Optuna's own checks: low < high, log with low > 0
    top = [(b, "budgets") for b in raw["budgets"]]
    top += [(s, "confirm.seeds") for s in raw["confirm"]["seeds"]]
    if "oracles" in raw["confirm"]:
        top += [(raw["confirm"]["oracles"], "confirm.oracles")]
    top += [(raw[k], k) for k in ("trials_per_cell", "delta", "seed", "sampler")]
    top += [(raw["forget"]["known_fraction"], "forget.known_fraction")]
    top += [(v, f"resources.{k}") for k, v in raw["resources"].items()]
    for value, key in top:
        _in_domain(value, DOMAINS[key])


@pytest.mark.parametrize("shipped", SPECS, ids=[p.stem for p in SPECS])
def test_mutated_specs_are_refused_in_one_line_or_valid(shipped):
    original = yaml.safe_load(shipped.read_text())
    seen, rss, started = Counter(), _rss_gib(), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.yaml"

        @seed(SPECS.index(shipped))
        @settings(SEEDED, max_examples=PER_SPEC)
        @given(st.data())
        def check(data):
            tree = copy.deepcopy(original)
            for _ in range(data.draw(st.integers(1, 2))):
                data.draw(_tree_mutation(tree))
            text = yaml.dump(tree, Dumper=_Dumper, allow_unicode=True, sort_keys=False)
            blob, kind = data.draw(_text_mutation(text, tree))
            path.write_bytes(blob)
            rc, out, err = _validate(path)
            seen["generated"] += 1
            if rc == 2:
                seen["refused"] += 1
                assert not out and err.startswith(f"error: {path}: ") and err.count("\n") == 1, err
                return
            seen["valid"] += 1
            assert rc == 0 and out.startswith(f"{path}: ok") and not err, (rc, out, err)
            # A cut blob is the part of the text before the cut: what it holds is its own tree.
            shown = tree if kind == "none" else yaml.safe_load(blob)
            assert not _must_refuse(shown) and kind in ("none", "cut"), blob[:300]
            spec = load(path)
            _assert_valid(spec)
            seen["valid with oracles"] += "oracles" in spec.raw["confirm"]  # OPTIONAL reached

        check()
    COUNTS.update(seen)
    COUNTS["seconds"] += round(time.time() - started)
    assert seen["generated"] == PER_SPEC and seen["refused"] + seen["valid"] == PER_SPEC
    assert _rss_gib() - rss < 0.5, "validating 25 specs grew the process by 0.5 GiB or more"
    print(f"{shipped.name}: {dict(seen)}; this module so far: {dict(COUNTS)}")


# ------------------------------------------------------------ validated mutants run one trial

SHRUNK = {  # quickstart at the cost of a unit test: 8x8 digits, a small MLP, one epoch
    "dataset": {"name": "digits", "size": 8},
    "model": {"name": "mlp", "width": 32, "depth": 1},
    "attack": {"name": "gaussian", "n": 30, "eps": 2.0},
    "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
    "budgets": [0.05],
    "trials_per_cell": 1,
    "confirm": {"seeds": []},
}


@st.composite
def _in_domain_mutant(draw, base: dict) -> tuple[dict, str, str]:
    """`base` with one parameter set to an edge of its domain, and the method to run."""
    tree = copy.deepcopy(base)
    method = draw(st.sampled_from(sorted(tree["methods"])))
    sections = {k: v for k, v in _sections(tree).items() if k[0] != "methods" or k[1] == method}
    where = draw(st.sampled_from(sorted(sections)))
    params = keyword_params(sections[where])
    name = draw(st.sampled_from(sorted(params)))
    value = draw(
        st.sampled_from(_edges(domain(sections[where], params[name]), params[name].default))
    )
    _at(tree, where)[name] = value
    return tree, method, f"{'.'.join(where)}.{name}={value!r}"


def test_validated_mutants_of_quickstart_run_one_trial(tmp_path):
    """No traceback, no hang, bounded memory: the trial runs as the sweep would run it."""
    base = {**yaml.safe_load((ROOT / "search_spaces/quickstart.yaml").read_text()), **SHRUNK}
    store, ran, refused, started = open_store(str(tmp_path / "store")), [], [], time.time()

    @seed(0)
    @settings(SEEDED, max_examples=TRIALS)
    @given(_in_domain_mutant(base), st.randoms(use_true_random=False))
    def check(mutant, rnd):
        tree, method, what = mutant
        path = tmp_path / "mutant.yaml"
        path.write_text(yaml.safe_dump(tree))
        rc, _, err = _validate(path)
        if rc == 2:  # a relation between parameters (dataset shares), or a plain refusal
            assert err.count("\n") == 1, err
            refused.append(f"{what}: {err.strip()}")
            return
        assert rc == 0, err
        spec = load(path)
        dists, params = distributions(method, spec.methods[method])
        for name, d in dists.items():  # an end of each search space, as a sampler may pick
            params[name] = rnd.choice(getattr(d, "choices", None) or [d.low, d.high])
        rows, t = [], time.time()
        with _time_limit(120):
            run_trial(spec, store, method, spec.budgets[0], params, 0, report=rows.append)
        assert len(rows) == 1 and 0 <= rows[0]["budget_used"] <= 1 + 1e-9, what
        ran.append(f"{method}: {what} ({time.time() - t:.1f} s)")

    check()
    peak = _rss_gib()
    assert len(ran) >= TRIALS // 2 and len(ran) + len(refused) == TRIALS and peak < 4, (ran, peak)
    took = time.time() - started
    print(f"{len(ran)} trials, {len(refused)} refused in {took:.0f} s, peak RSS {peak:.2f} GiB")
    print("\n".join(ran + refused))
