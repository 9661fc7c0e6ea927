"""Writing a trial's row: its Parquet schema for the spec, typed by what every method declares,
and its hyperparameters read back as the method takes them.

The writer's side of results.py (analysis/results.py reads rows and needs no spec): typing an
hp_<name> column takes the unlearners' signatures, so this side imports the unlearner table, and
with it torch, which the report never needs.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.analysis.results import COLUMNS, SCORES, measured_columns, row_name
from raysweep.base.domains import kind
from raysweep.base.storage import Store
from raysweep.experiment.spec import Spec, domain, hyperparameter_kinds, keyword_params
from raysweep.unlearning.unlearners import UNLEARNERS


def hyperparameter_types(spec: Spec) -> dict[str, pa.DataType]:
    """hp_<name> columns for the union of all methods' hyperparameters in the spec, each typed by
    what every method naming it declares (spec.hyperparameter_kinds), not by the spec's values."""
    kinds = hyperparameter_kinds(spec.methods, spec.source)
    return {f"hp_{name}": _arrow_type(k) for name, k in kinds.items()}


def _arrow_type(kind: type) -> pa.DataType:
    return {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}[kind]


def schema(spec: Spec) -> pa.Schema:
    fixed = {name: column.type for name, column in COLUMNS.items()}
    return pa.schema({**fixed, **hyperparameter_types(spec), **measured_columns(), **SCORES})


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
