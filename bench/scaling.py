"""Scaling: the same sweep on two loopback nodes of 1 CPU each vs one node of 1 CPU.

Both runs use one real multi-node Ray cluster (raysweep.loopback): first with only the head,
then after a worker node joins. Checkpoints are trained in a warm-up run before either, so
the ratio is about spreading trials, not about who trains them. Ideal: 2.0.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time

import ray

from raysweep import sweep
from raysweep.loopback import LoopbackCluster
from raysweep.spec import validate

from .sweep_efficiency import SPEC


def _wait_cpus(n: float, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while ray.cluster_resources().get("CPU", 0) < n:
        if time.time() > deadline:
            raise TimeoutError(f"cluster did not reach {n} CPUs")
        time.sleep(0.5)


def main() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cluster = LoopbackCluster(env | {"RAY_USAGE_STATS_ENABLED": "0"})
    spec = copy.deepcopy(SPEC) | {"trials_per_cell": 2}
    try:
        cluster.add_node()
        # The driver presents the cluster's token, as every client of an auth-on cluster must.
        os.environ.update({k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
        ray.init(address=cluster.address, log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            warm = copy.deepcopy(spec) | {"name": "warmup", "trials_per_cell": 1}
            warm["methods"] = {"gd": spec["methods"]["gd"]}
            sweep.run(validate(warm), tmp, address=cluster.address)

            t = time.perf_counter()
            one = sweep.run(validate(spec | {"name": "one-node"}), tmp, address=cluster.address)
            one_s = time.perf_counter() - t

            cluster.add_node()
            _wait_cpus(2)
            t = time.perf_counter()
            two = sweep.run(validate(spec | {"name": "two-nodes"}), tmp, address=cluster.address)
            two_s = time.perf_counter() - t
    finally:
        ray.shutdown()
        for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            os.environ.pop(k, None)
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
