"""The docs' optuna-dashboard command (docs/reports.md), run as written over a finished run's
journal, on loopback:
every cell's study is there, through the dashboard's own HTTP API."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

README = (Path(__file__).parent.parent / "docs" / "reports.md").read_text()
BIN = Path(sys.executable).parent


def readme_command() -> str:
    """The one optuna-dashboard command line in the docs' instructions (docs/reports.md)."""
    lines = [ln for ln in README.splitlines() if ln.startswith(".venv/bin/optuna-dashboard ")]
    assert len(lines) == 1, lines
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture
def dashboard(finished_run, tmp_path):
    """The docs' command with the run's journal and a free port: the dashboard's URL."""
    if not (BIN / "optuna-dashboard").exists():
        pytest.skip("optuna-dashboard is not installed (`make test` installs it: dev extra)")
    port = free_port()
    command = readme_command().replace("runs/quickstart", finished_run)
    command = command.replace("--port 8080", f"--port {port}")
    command = command.replace(".venv/bin/", f"{BIN}/")
    assert "--host 127.0.0.1" in command  # loopback only
    log = tmp_path / "dashboard.log"  # a file, not a pipe: its request log never blocks it
    with open(log, "w") as out:
        proc = subprocess.Popen(shlex.split(command), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                get(f"{url}/api/studies")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"optuna-dashboard did not start: {log.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_readme_dashboard_shows_every_cells_study(dashboard, finished_run):
    df = pd.read_parquet(os.path.join(finished_run, "results"))
    tuned = df[df["phase"] == "tune"]
    studies = {
        s["study_name"]: s["study_id"] for s in get(f"{dashboard}/api/studies")["study_summaries"]
    }
    assert sorted(studies) == sorted(tuned["cell"].unique())
    for cell, rows in tuned.groupby("cell"):
        trials = get(f"{dashboard}/api/studies/{studies[cell]}?after=0")["trials"]
        got = {t["number"]: t["values"][0] for t in trials if t["state"] == "Complete"}
        ok = rows[rows["status"] == "ok"]
        assert got == pytest.approx(dict(zip(ok["trial_number"], ok["objective"])))
