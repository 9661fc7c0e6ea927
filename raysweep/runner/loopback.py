"""Ray clusters of several nodes on one machine, for the integration tests and benchmarks (and
for trying cluster behaviour on a laptop).

`LoopbackCluster`: a head and worker raylets on 127.0.0.2, each started by `ray start` with 1
CPU, its own ports (several raylets on one host need distinct ports) and a temp dir of its own.
`AutoscalingCluster`: cluster.yaml's node types on 127.0.0.1, whose workers Ray's autoscaler
launches and releases through Ray's fake multi-node provider.

Both are stopped by killing exactly the processes under their temp dir and what those started,
never with a global `ray stop` (it kills every Ray process on the machine).
"""

from __future__ import annotations

import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import (
    FAKE_HEAD_NODE_ID,
    FAKE_HEAD_NODE_TYPE,
    FakeMultiNodeProvider,
)

# isort: split
import psutil  # Ray ships it (ray/thirdparty_files): importable once ray is

NODE_IP = "127.0.0.2"
LOCAL_SINK = "http://127.0.0.1:9/"  # the discard port: nothing listens, nothing leaves


def _free(port: int) -> bool:
    # Ray's servers bind the wildcard address, so a port is free only if "::" binds.
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            s.bind(("::", port))
        except OSError:
            return False
    return True


NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
HEAD_PORTS = ("port", "dashboard-port")
WORKER_PORTS = 30  # per node: Ray's worker processes each take one


def _ports(head: bool) -> dict[str, int]:
    """`ray start` port options for one node, on a free span of ports."""
    names = (*HEAD_PORTS, *NODE_PORTS) if head else NODE_PORTS
    while True:
        base = random.randrange(20000, 60000 - 100)
        span = range(base, base + len(names) + WORKER_PORTS)
        if all(_free(p) for p in span):
            break
    ports = dict(zip(names, span))
    ports["min-worker-port"] = base + len(names)
    ports["max-worker-port"] = base + len(names) + WORKER_PORTS - 1
    return ports


def _cluster_env(env: dict[str, str], temp: str) -> dict[str, str]:
    """`env` with token auth (a token of the cluster's own) and usage statistics off."""
    # Nodes and drivers must all present the token.
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    # Usage statistics off on every node; a head started by `ray start` would still send Ray a
    # "disabled" notice, which a closed loopback port keeps on this machine.
    return env | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": LOCAL_SINK}


def _processes(needle: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if needle in " ".join(p.info["cmdline"] or ()):
            found.append(p)
    return found


def _running_trial(raylet: psutil.Process) -> bool:
    """Whether a Tune trial is executing under the raylet (its actor's title while in train())."""
    titles = [" ".join(p.cmdline()) for p in raylet.children(recursive=True)]
    return any(t.startswith("ray::ImplicitFunc.train") for t in titles)


def _kill_all(temp: str) -> None:
    """SIGKILL the processes under `temp` and what they started, then remove `temp`."""
    for _ in range(3):  # a dying raylet may still spawn a worker or two
        procs = _processes(temp)
        for p in list(procs):
            try:
                # Ray's agents and workers retitle themselves ("ray::IDLE"): their command
                # lines no longer name the temp dir, their parents do.
                procs += p.children(recursive=True)
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.5)
    shutil.rmtree(temp, ignore_errors=True)


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--disable-usage-stats", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


class LoopbackCluster:
    """A head and worker raylets on 127.0.0.2, 1 CPU each, ports and temp dir of their own."""

    def __init__(self, env: dict[str, str]):
        self.temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: sockets live here
        self.env = _cluster_env(env, self.temp)
        self.nodes: list[dict[str, int]] = []
        self.address = ""

    def add_node(self) -> None:
        head = not self.nodes
        ports = _ports(head)
        args = [f"--node-ip-address={NODE_IP}", "--num-cpus=1"]
        args += [f"--{k}={v}" for k, v in ports.items()]
        if head:
            args += ["--head", f"--temp-dir={self.temp}", "--include-dashboard=false"]
            self.address = f"{NODE_IP}:{ports['port']}"
        else:
            args += [f"--address={self.address}"]
        _ray_start(args, self.env)
        self.nodes.append(ports)

    def processes(self, needle: str | None = None) -> list[psutil.Process]:
        return _processes(needle or self.temp)

    def raylet(self, index: int) -> psutil.Process:
        port = self.nodes[index]["node-manager-port"]
        (raylet,) = self.processes(f"--node_manager_port={port}")
        return raylet

    def running_trial(self, index: int) -> bool:
        """Whether a Tune trial is executing on the node."""
        return _running_trial(self.raylet(index))

    def kill_node(self, index: int) -> None:
        """SIGKILL a worker node's raylet and everything it started (its Ray workers, agents),
        as when a spot instance is reclaimed: the raylet alone would let a running trial end."""
        raylet = self.raylet(index)
        for p in [*raylet.children(recursive=True), raylet]:
            p.kill()

    def stop(self) -> None:
        _kill_all(self.temp)


# ---------------------------------------------------------------- autoscaling


# Ray's cluster mode off in every process of the cluster and its drivers: otherwise Ray swaps
# 127.0.0.1 for the machine's address (in `ray.init(address)` and where the fake provider
# points new nodes at the head). With the node IP exactly 127.0.0.1, Ray's gRPC servers listen
# on loopback only (raysweep.runner.cluster.LOCAL_IP).
LOCAL_IP = "127.0.0.1"
CLUSTER_MODE_OFF = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Fake workers pass trials small objects only; Ray's default store (30 % of RAM) per fake node
# would be counted once per node against this one machine's shared memory.
OBJECT_STORE = 200 * 2**20  # bytes
# The sections a `ray up` config must have; nothing is set up or run on a fake node.
NO_COMMANDS = {
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


class ReclaimableProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider, which also terminates a worker when a file named after
    it appears in `reclaim_dir`: a spot node reclaimed under the autoscaler, by its provider."""

    def non_terminated_nodes(self, tag_filters):
        # The autoscaler calls this on every update (1 s): the provider's only clock.
        for request in Path(self.provider_config["reclaim_dir"]).iterdir():
            if request.name in self._nodes:
                self.terminate_node(request.name)
            request.unlink()
        return super().non_terminated_nodes(tag_filters)


def fake_config(config: dict, idle_timeout_s: float, provider: dict) -> dict:
    """A `ray up` config (cluster.yaml) for Ray's fake provider: its node types, min and max
    workers and upscaling speed, the head as "ray.head.default" (the fake provider's name)."""
    types = config["available_node_types"]
    head = {"resources": types[config["head_node_type"]]["resources"], "max_workers": 0}
    workers = {
        name: {
            "resources": t["resources"] | {"object_store_memory": OBJECT_STORE},
            "min_workers": t.get("min_workers", 0),
            "max_workers": t["max_workers"],
        }
        for name, t in types.items()
        if name != config["head_node_type"]
    }
    return {
        "cluster_name": config["cluster_name"],
        "max_workers": config["max_workers"],
        "upscaling_speed": config.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": provider,
        "auth": {},
        "available_node_types": {
            name: t | {"node_config": {}}
            for name, t in {FAKE_HEAD_NODE_TYPE: head, **workers}.items()
        },
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        **NO_COMMANDS,
    }


class AutoscalingCluster:
    """A `ray up` config's node types on 127.0.0.1: a head started by `ray start`, whose
    autoscaler (v2, as `ray up` runs it since Ray 2.50) launches and releases worker raylets."""

    def __init__(self, env: dict[str, str], config: dict, idle_timeout_s: float):
        self.temp = tempfile.mkdtemp(prefix="rsa-", dir="/tmp")  # short: sockets live here
        self.env = _cluster_env(env, self.temp) | CLUSTER_MODE_OFF
        self.ports = _ports(head=True)
        self.address = f"{LOCAL_IP}:{self.ports['port']}"
        self.reclaim_dir = Path(self.temp) / "reclaim"
        self.reclaim_dir.mkdir()
        provider = {
            # `external`: the `fake_multinode` type needs an example.yaml the wheel lacks.
            "type": "external",
            "module": f"{__name__}.ReclaimableProvider",
            "gcs_address": self.address,
            "head_node_id": FAKE_HEAD_NODE_ID,
            "launch_multiple": True,
            "reclaim_dir": str(self.reclaim_dir),
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        }
        self.config = fake_config(config, idle_timeout_s, provider)

    def start(self) -> None:
        # As `ray up` does: the autoscaler's config in the head's home, where drivers run
        # (preflight.cluster_nodes reads the node types there).
        path = Path(self.temp) / "ray_bootstrap_config.yaml"
        path.write_text(yaml.safe_dump(self.config))
        self.env["HOME"] = self.temp
        head = self.config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]
        args = [f"--node-ip-address={LOCAL_IP}", "--head", f"--temp-dir={self.temp}"]
        args += [f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}"]
        args += [f"--object-store-memory={OBJECT_STORE}", "--include-dashboard=false"]
        args += [f"--{k}={v}" for k, v in self.ports.items()]
        args += [f"--autoscaling-config={path}"]
        # What Ray's own AutoscalingCluster sets for autoscaler v2 on the fake provider, and
        # `ray up` for v2 on a real head (the head's instance id and node type).
        _ray_start(
            args,
            self.env
            | {
                "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_NODE_TYPE_NAME": FAKE_HEAD_NODE_TYPE,
            },
        )

    def workers(self) -> dict[str, psutil.Process]:
        """The live worker nodes: Ray node id -> raylet process."""
        found = {}
        for p in _processes(self.temp):
            try:
                if p.name() == "raylet":
                    # The fake provider fixes each node's id this way (the raylet keeps it).
                    found[p.environ()["RAY_OVERRIDE_NODE_ID_FOR_TESTING"]] = p
            except (psutil.Error, KeyError):
                continue
        found.pop(FAKE_HEAD_NODE_ID, None)
        return found

    def running_trial(self, node_id: str) -> bool:
        """Whether a Tune trial is executing on the worker node."""
        return _running_trial(self.workers()[node_id])

    def reclaim(self, node_id: str, timeout: float = 30) -> None:
        """Terminate a worker through the autoscaler's provider, as when a spot node is
        reclaimed; returns once its raylet is gone."""
        raylet = self.workers()[node_id]
        (self.reclaim_dir / node_id).touch()
        raylet.wait(timeout)

    def stop(self) -> None:
        _kill_all(self.temp)


def peak_trials(df) -> dict[str, int]:
    """Most trials running at once on each node, from the rows' node_id, started_at and
    finished_at (a row's end before another's start at the same instant)."""
    peaks = {}
    for node, rows in df.groupby("node_id"):
        edges = [(t, 1) for t in rows["started_at"]] + [(t, -1) for t in rows["finished_at"]]
        running = 0
        for _, step in sorted(edges):  # at one instant, -1 sorts first: an end, then a start
            running += step
            peaks[node] = max(peaks.get(node, 0), running)
    return peaks
