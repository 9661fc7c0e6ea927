"""Scaling: the same sweep on two loopback nodes of 1 CPU each vs one node of 1 CPU.

Both runs use one real multi-node Ray cluster (raysweep.runner.loopback): first with only the head,
then after a worker node joins. Checkpoints are trained in a warm-up run before either, so
the ratio is about spreading trials, not about who trains them. Ideal: 2.0.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time

import yaml

from raysweep.analysis import results
from raysweep.base.storage import open_store
from raysweep.runner.loopback import LoopbackCluster

from .sweep_efficiency import SPEC


def _run(spec: dict, storage: str, cluster: LoopbackCluster) -> float:
    """`raysweep run` as a user submits it to the cluster (a driver process with its token)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(spec, f)
    cmd = [sys.executable, "-m", "raysweep", "run", f.name, "--storage", storage]
    t = time.perf_counter()
    out = subprocess.run(
        [*cmd, "--address", cluster.address], env=cluster.env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    return wall


def main() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cluster = LoopbackCluster(env | {"RAY_USAGE_STATS_ENABLED": "0"})
    spec = copy.deepcopy(SPEC)
    try:
        cluster.add_node()
        with tempfile.TemporaryDirectory() as tmp:
            warm = copy.deepcopy(spec) | {"name": "warmup", "trials_per_cell": 1}
            warm["methods"] = {"gd": spec["methods"]["gd"]}
            _run(warm, tmp, cluster)
            one_s = _run(spec | {"name": "one-node"}, tmp, cluster)
            cluster.add_node()
            two_s = _run(spec | {"name": "two-nodes"}, tmp, cluster)
            store = open_store(tmp)
            one, two = results.read(store, "one-node"), results.read(store, "two-nodes")
    finally:
        cluster.stop()
    out = {
        "trials": len(one),
        "one_node_s": one_s,
        "two_nodes_s": two_s,
        "nodes_used_two": int(two["node_id"].nunique()),
        "speedup": one_s / two_s,
    }
    print(
        f"scaling: {out['trials']} trials on 1 node x 1 CPU {one_s:.1f}s vs 2 nodes x 1 CPU "
        f"{two_s:.1f}s ({out['nodes_used_two']} nodes used) -> {out['speedup']:.2f}x (ideal 2)"
    )
    return out


if __name__ == "__main__":
    main()
