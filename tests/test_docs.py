"""The README documents what the code does: every Parquet column and every table entry."""

from __future__ import annotations

from pathlib import Path

from raysweep.analysis import results

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_parquet_column_is_documented():
    for column in list(results.COLUMNS) + list(results.METRICS):
        assert f"`{column}`" in README, column


def test_readme_shows_the_two_commands():
    assert "make quickstart" in README and "make test" in README
