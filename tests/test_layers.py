"""Imports go one way, down the layers of pyproject.toml's import-linter contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_imports_follow_the_layers():
    lint = Path(sys.executable).with_name("lint-imports")  # installed by the dev extra
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
