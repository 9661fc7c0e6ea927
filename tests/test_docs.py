"""The docs say what the code does: README fits two screens and its numbers are the report's, every
command in README and the docs runs as written, and the generated reference pages are current."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from raysweep import cli
from raysweep.analysis import results
from raysweep.experiment import spec

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def _generator():
    """docs/gen_reference.py as a module (docs/ is not a package)."""
    where = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(where)
    where.loader.exec_module(module)
    return module


GEN = _generator()


def test_readme_fits_two_screens():
    assert len(README.splitlines()) <= 150


def test_readme_shows_the_two_commands():
    assert "make quickstart" in README and "make test" in README


@pytest.mark.parametrize("name", sorted(GEN.PAGES))
def test_reference_page_is_current(name):
    """docs/reference/NAME equals what the code generates now."""
    committed = (DOCS / "reference" / name).read_text()
    assert committed == GEN.PAGES[name](), f"stale: run `python docs/gen_reference.py` ({name})"


def test_every_parquet_column_is_documented():
    columns = (DOCS / "reference" / "columns.md").read_text()
    measured = (DOCS / "reference" / "metrics.md").read_text()  # before_<m>, after_<m>, retrain_<m>
    for column in results.COLUMNS:
        assert f"`{column}`" in columns, column
    for m in results.MEASURED:
        assert f"`{m}`" in measured, m


def _table(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table whose header starts with `first_header`."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append(line)

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    header = cells(block[0])
    return [dict(zip(header, cells(ln))) for ln in block[2:]]


def test_readme_table_is_the_reports():
    """README's short table: the report's numbers (docs/figures/report.md) at its largest budget,
    cell for cell, and at most 8 columns."""
    short = _table(README, "method")
    assert short and len(short[0]) <= 8
    report = _table((DOCS / "figures" / "report.md").read_text(), "attack")
    largest = max(float(r["budget"]) for r in report if r["budget"])
    for row in short:
        match = [
            r
            for r in report
            if r["method"] == row["method"] and (not r["budget"] or float(r["budget"]) == largest)
        ]
        assert len(match) == 1, row["method"]
        assert {k: match[0][k] for k in row} == row
    methods = {r["method"] for r in report}
    assert {r["method"] for r in short} == methods  # every method, and both references


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target


# Where the docs' commands are checked: README and the quick start in full, every other page's
# raysweep and make lines (cluster setup's aws/ray lines are checked for shell syntax only).
FULL = [ROOT / "README.md", DOCS / "quickstart.md"]
PAGES = FULL + sorted(p for p in DOCS.glob("*.md") if p not in FULL)


def _shell_blocks(path: Path) -> list[str]:
    return re.findall(r"```(?:bash|sh)\n(.*?)```", path.read_text(), flags=re.S)


def _commands(block: str) -> list[tuple[list[str], Path]]:
    """Each simple command of a block as (words, the folder it runs in): continuations joined,
    comments dropped, split at `&&`, `;` and `|`; the words after `--` (a command another one
    runs, as `ray job submit --working-dir DIR -- raysweep run SPEC`) count as their own."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        workdir = ROOT
        for word in [*words, ";"]:
            if word in ("&&", ";", "|", "||", "--"):
                out += [(command, workdir)] if command else []
                workdir = ROOT
                if word == "--" and "--working-dir" in command:
                    workdir = ROOT / command[command.index("--working-dir") + 1]
                command = []
            else:
                command.append(word)
    return out


@cache
def _help(sub: str) -> str:
    """`raysweep SUB --help`, from the entry point `raysweep` runs (raysweep.cli:main)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main([sub, "--help"])
    return out.getvalue()


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def _check(words: list[str], workdir: Path) -> None:
    """A raysweep or make command refers to what exists: subcommand, flags, spec files, targets."""
    program = Path(words[0])
    if words[0].startswith(".venv/bin/"):
        assert (BIN / program.name).exists(), f"{words[0]}: not installed by `make`"
    if program.name == "make":
        assert set(words[1:]) <= _make_targets(), words
    if program.name != "raysweep":
        return
    sub = words[1]
    text = _help(sub)
    for word in words[2:]:
        flag = re.match(r"\[?(--[a-z][a-z0-9-]*)", word)
        if flag:
            assert flag.group(1) in text, f"raysweep {sub}: no flag {flag.group(1)}"
        elif word.strip("[]").endswith(".yaml"):
            path = word.strip("[]")
            assert (workdir / path).exists(), f"raysweep {sub}: no spec {workdir / path}"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_commands_run_as_written(path):
    """Every shell block parses (bash -n), and every raysweep / make command in it names a
    subcommand, flags, spec files and targets that exist."""
    blocks = _shell_blocks(path)
    if path in FULL:
        assert blocks, f"{path.name}: no commands"
    for block in blocks:
        syntax = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
        assert syntax.returncode == 0, f"{path.name}: {syntax.stderr}"
        for words, workdir in _commands(block):
            if path in FULL or Path(words[0]).name in ("raysweep", "make"):
                _check(words, workdir)


def test_the_spec_example_validates(tmp_path):
    """docs/spec.md's example spec, as written, passes `raysweep validate`."""
    example = re.search(r"```yaml\n(.*?)```", (DOCS / "spec.md").read_text(), flags=re.S)
    path = tmp_path / "spec.yaml"
    path.write_text(example.group(1))
    assert yaml.safe_load(path.read_text())["name"] == "quickstart"
    spec.load(path)  # raises SpecError naming the key if the example drifted from the code


def test_the_new_unlearner_recipe_runs_as_written(monkeypatch, tiny_spec_dict, tmp_path):
    """docs/extending.md's recipe, pasted as it stands: the function and its one table line make
    an unlearner that validates from its signature and runs a metered trial to a row."""
    from raysweep.base.storage import open_store
    from raysweep.experiment.trial import run_trial
    from raysweep.unlearning import unlearners

    page = (DOCS / "extending.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    definition, table_line = code.split("\nUNLEARNERS = ")
    assert (
        table_line.strip() == '{..., "my_method": my_method}'
    )  # the one line, as the docs show it
    namespace = dict(vars(unlearners))
    exec(definition, namespace)
    monkeypatch.setitem(unlearners.UNLEARNERS, "my_method", namespace["my_method"])

    with pytest.raises(spec.SpecError, match="my_method.*batch_size"):
        spec.validate({**tiny_spec_dict, "methods": {"my_method": {"batch_size": 0}}})
    valid = spec.validate({**tiny_spec_dict, "methods": {"my_method": {"lr": 1e-3}}})
    row = run_trial(valid, open_store(str(tmp_path)), "my_method", 0.05, {"lr": 1e-3}, 0, print)
    # it spent its budget (within the cap, as the meter grants) and moved the model
    assert 0.9 < row["budget_used"] <= 1 and row["after_gus"] != row["before_gus"]
