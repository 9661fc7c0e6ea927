"""One look for every figure of the report: a fixed style per method, grids, legends, titles.

Each method keeps one colour, marker and line style in every figure and every run (`style`);
small multiples sit in rows of at most four panels; the legend sits outside the axes, under the
title; every figure is at most `WIDTH` wide, so the docs show it at about 0.8x.
"""

from __future__ import annotations

import io
import math
import zlib

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# The UNLEARNERS table's names in its order when each got its look (tests/test_figures.py checks
# they are still its first entries): the report stays torch-free by not importing the table.
# An unlearner not listed yet gets a look of its own from its name (`_slot`); listing it here
# (at the end, as the table appends) gives it the next fixed one.
METHODS = (
    "gd",
    "ngd",
    "ga",
    "euk",
    "cfk",
    "scrub",
    "neggrad_plus",
    "ssd",
    "salun",
    "l1_sparse",
    "bad_teacher",
    "random_label",
    "newton",
)
# Tableau's ten without red and grey, which mark the poisoned and retrain references.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "*", "X")
LINES = ("-", "--", ":", "-.")
POISONED, RETRAIN, CONTROL = "#d62728", "#555555", "#17becf"
WIDTH = 9.0  # inches: 1080 px at the PNGs' 120 dpi
NCOLS = 4


def _slot(method: str) -> int:
    if method in METHODS:
        return METHODS.index(method)
    # a method an older run still has, or one added since METHODS was last extended
    return len(METHODS) + zlib.crc32(method.encode()) % 32


def ordered(methods) -> list[str]:
    """Methods in their fixed order (METHODS: the UNLEARNERS table's), so every legend reads the
    same."""
    return sorted(set(methods), key=lambda m: (_slot(m), m))


def style(method: str) -> dict:
    """The method's colour, marker and line style, fixed by its place in METHODS (the UNLEARNERS
    table's order; new methods are appended), the same in every figure and every run."""
    return look(_slot(method))


def look(i: int) -> dict:
    """The i-th look: the first 8 differ in colour and marker; each further 8 reuse the colours
    with shifted markers and another line style. 64 distinct (colour, marker) pairs."""
    k = i // len(COLOURS)
    return {
        "color": COLOURS[i % len(COLOURS)],
        "marker": MARKERS[(i + k) % len(MARKERS)],
        "linestyle": LINES[k % len(LINES)],
    }


def handle(method: str) -> Line2D:
    """The method's legend entry: its line and marker."""
    return Line2D([], [], label=method, ms=6, **style(method))


def grid(n: int, height: float = 2.0, **kw) -> tuple[Figure, list]:
    """A figure WIDTH wide (room for its title) of n panels in rows of at most NCOLS, each row
    `height` inches high."""
    ncols = min(NCOLS, max(n, 1))
    nrows = math.ceil(max(n, 1) / ncols)
    fig = Figure(
        figsize=(WIDTH, height * nrows + 1.6),
        layout="constrained",
    )
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def finish(fig: Figure, title: str, handles: list, ncols: int = 4) -> Figure:
    """The title (what to conclude) over one legend for the whole figure, above the axes.

    The title is the legend's own title: constrained layout makes room for an outside legend
    but not for a suptitle next to it, which it would draw over.
    """
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncols=ncols,
        frameon=False,
        fontsize=8,
        title=title,
        title_fontproperties={"size": 10.5},
    )
    return fig


def pct(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def mean_std(mean: float, std: float, digits: int = 3) -> str:
    """`mean ± std` to `digits` decimals, for tables and titles: "-" without a mean, the mean
    alone without a std (one seed has no spread)."""
    if pd.isna(mean):
        return "-"
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def png(fig: Figure) -> bytes:
    """The figure as the PNG every report and study writes (120 dpi: WIDTH is 1080 px)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()
