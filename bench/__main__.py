"""`make bench`: run every benchmark in one process, write bench/results.json and results.md."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from raysweep.analysis.results import versions

# Order: quick in-process ratios first, then the Ray sweeps. gpu skips itself without CUDA.
BENCHMARKS = [
    "score",
    "meter",
    "flops",
    "checkpoint_sharing",
    "unlearners",
    "sweep_efficiency",
    "scaling",
    "autoscaling",
    "tpe_vs_random",
    "anytime",
    "adaptive",
    "objective",
    "verdicts",
    "gpu",
]
HERE = Path(__file__).parent


def machine() -> dict:
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "versions": json.loads(versions()),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(report: dict) -> str:
    lines = [f"# Benchmarks ({report['machine']['date']}, {report['machine']['cpus']} CPUs)", ""]
    for name, res in report["results"].items():
        if "error" in res:
            lines.append(f"- **{name}**: failed: {res['error']}")
            continue
        scalars = {k: v for k, v in res.items() if isinstance(v, (int, float, str, bool))}
        shown = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items()
        )
        lines.append(f"- **{name}** ({res.get('_seconds', 0):.0f}s): {shown}")
    return "\n".join(lines) + "\n"


def main(names: list[str]) -> None:
    torch.set_num_threads(1)  # trials run one thread each; measure the same way
    report = {"machine": machine(), "results": {}}
    for name in names or BENCHMARKS:
        t = time.perf_counter()
        try:
            res = importlib.import_module(f"bench.{name}").main()
        except Exception as e:
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res["_seconds"] = time.perf_counter() - t
        res["_date"] = report["machine"]["date"]
        report = save(name, res, report["machine"], whole=not names)
    print("\n" + markdown(report))


def save(name: str, res: dict, machine: dict, whole: bool) -> dict:
    """Merge one benchmark's result into results.json/md as soon as it ends, read just before
    writing: a subset re-run replaces only its own entries, and two re-runs of different entries
    at once (each minutes long) do not drop each other's. A whole run drops entries of
    benchmarks that no longer exist."""
    path = HERE / "results.json"
    report = {"machine": machine, "results": {}}
    if path.is_file():
        report["results"] = json.loads(path.read_text())["results"]
    if whole:
        report["results"] = {k: v for k, v in report["results"].items() if k in BENCHMARKS}
    report["results"][name] = res
    tmp = path.with_suffix(".json.tmp")  # then rename: a reader never sees half a file
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)
    (HERE / "results.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
