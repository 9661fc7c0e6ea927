"""Value domains, declared on the parameter itself: `epochs: PosInt = 30`.

A domain is a type, optionally `Annotated` with annotated_types bounds (`Gt`, `Ge`, `Lt`, `Le`,
`Interval`, `MinLen`), a `Literal[...]`, or either of those `| None`. spec.py binds each spec
section to its function's signature and checks every value with `refusal`, so a value outside
its parameter's domain fails in `raysweep validate`, before any compute, and the domain lives in
one place: the signature (no second table to keep in step with it).
"""

from __future__ import annotations

import math
import types
import typing
from typing import Annotated, Any, Literal

from annotated_types import Ge, GroupedMetadata, Gt, Interval, Le, Lt, MinLen

# Integers end up in torch (int64): a larger one would fail inside a trial, not here.
INT64 = 2**63
# Every int up to this size is exact as a float64 (an int parameter sharing a float column).
EXACT_INT = 2**53

PosInt = Annotated[int, Ge(1)]  # counts and sizes
NonNegInt = Annotated[int, Ge(0)]
PosFloat = Annotated[float, Gt(0)]  # learning rates, scales, temperatures
NonNegFloat = Annotated[float, Ge(0)]  # penalty weights, weight decay, noise variances
Fraction = Annotated[float, Interval(gt=0, le=1)]  # a share that keeps at least something
Probability = Annotated[float, Interval(ge=0, le=1)]
OpenFraction = Annotated[float, Interval(gt=0, lt=1)]  # e.g. rows held out: some, never all
Momentum = Annotated[float, Interval(ge=0, lt=1)]
Seed = Annotated[int, Interval(ge=0, lt=INT64)]
Text = Annotated[str, MinLen(1)]

# bound -> (bracket, operator, attribute): Gt(0) reads "> 0", or "(0" in an interval
_LOWER = {Gt: ("(", ">", "gt"), Ge: ("[", ">=", "ge")}
_UPPER = {Lt: (")", "<", "lt"), Le: ("]", "<=", "le")}


def resolve(annotation: Any, namespace: dict) -> Any:
    """An annotation as an object: postponed (string) annotations are evaluated in the namespace
    of the function's module (our source, never user input)."""
    return eval(annotation, namespace) if isinstance(annotation, str) else annotation


def _parts(domain: Any) -> tuple[Any, list, bool]:
    """(base type or Literal, bound metadata, None allowed) of a domain."""
    nullable = False
    if typing.get_origin(domain) in (typing.Union, types.UnionType):
        args = typing.get_args(domain)
        nullable = type(None) in args
        (domain,) = [a for a in args if a is not type(None)]
    metadata = []
    if typing.get_origin(domain) is Annotated:
        domain, *extra = typing.get_args(domain)
        for m in extra:
            metadata.extend(m if isinstance(m, GroupedMetadata) else [m])
    return domain, metadata, nullable


def base(domain: Any) -> Any:
    """The domain's type (int, float, bool, str) or its `Literal[...]`."""
    return _parts(domain)[0]


def kind(domain: Any) -> type | None:
    """The one type a domain's values have (bool, int, float, str; a `Literal`'s by its
    choices), or None where they have several or none of these: no one column holds them."""
    kind = base(domain)
    if typing.get_origin(kind) is Literal:
        kinds = {type(c) for c in typing.get_args(kind)}
        kind = kinds.pop() if len(kinds) == 1 else None
    return kind if kind in (bool, int, float, str) else None


def column_kind(kinds: set[type]) -> type | None:
    """The kind of one column holding values of all `kinds`: ints and floats share a float column
    (exact up to 2^53, EXACT_INT); any other mix has none (a bool is no number here)."""
    if kinds == {int, float}:
        return float
    return next(iter(kinds)) if len(kinds) == 1 else None


def typed(value: Any, domain: Any) -> Any:
    """`value` as its parameter takes it: an int written for a float parameter becomes that float
    (YAML writes 1 for 1.0), so the unlearner, the journal and the row all see 1.0."""
    return float(value) if kind(domain) is float and type(value) is int else value


def _num(x: Any) -> str:
    return "2^63" if x == INT64 else f"{x:g}" if isinstance(x, float) else str(x)


def _bound(metadata: list, table: dict) -> tuple | None:
    """(bracket, operator, value) of the first bound in `metadata` of a kind in `table`."""
    for m in metadata:
        if type(m) in table:
            bracket, op, attr = table[type(m)]
            return bracket, op, getattr(m, attr)
    return None


def describe(domain: Any) -> str:
    """The domain in words, as the 'allowed:' part of an error: 'int >= 1', 'float in (0, 1]'."""
    kind, metadata, nullable = _parts(domain)
    if typing.get_origin(kind) is Literal:
        words = ", ".join(map(str, typing.get_args(kind)))
    else:
        words = kind.__name__
        lo, hi = _bound(metadata, _LOWER), _bound(metadata, _UPPER)
        if lo and hi:
            words += f" in {lo[0]}{_num(lo[2])}, {_num(hi[2])}{hi[0]}"
        elif lo or hi:
            _, op, x = lo or hi
            words += f" {op} {_num(x)}"
        if any(isinstance(m, MinLen) for m in metadata):
            words = f"non-empty {words}"
    return f"{words} or null" if nullable else words


def _is(value: Any, kind: type) -> bool:
    """isinstance, where a bool is no number and an int is a float (YAML writes 1 for 1.0)."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def refusal(value: Any, domain: Any) -> str | None:
    """None if `value` lies in `domain`; else why not: 'is not int' or 'out of range'."""
    kind, metadata, nullable = _parts(domain)
    if value is None and nullable:
        return None
    if typing.get_origin(kind) is Literal:
        # type and value: `True` must not pass for a literal 1, nor 1 for "1"
        ok = any(type(value) is type(c) and value == c for c in typing.get_args(kind))
        return None if ok else "is not a choice"
    if not _is(value, kind):
        return f"is not {kind.__name__}"
    if kind is int and not -INT64 <= value < INT64:
        return "out of range (past 64 bits)"
    checks = {
        Gt: lambda m: value > m.gt,
        Ge: lambda m: value >= m.ge,
        Lt: lambda m: value < m.lt,
        Le: lambda m: value <= m.le,
        MinLen: lambda m: len(value) >= m.min_length,
    }
    return None if all(checks[type(m)](m) for m in metadata) else "out of range"
