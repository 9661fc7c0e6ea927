"""A multi-node Ray cluster on one machine: a head and worker raylets on 127.0.0.2.

For the integration tests and benchmarks (and for trying cluster behaviour on a laptop):
`ray start` per node, each with 1 CPU, its own ports (several raylets on one host need
distinct ports) and a temp dir of its own, stopped by killing exactly the processes under
that temp dir, never with a global `ray stop`.
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


class LoopbackCluster:
    """A head and worker raylets on 127.0.0.2, 1 CPU each, ports and temp dir of their own."""

    def __init__(self, env: dict[str, str]):
        self.temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: sockets live here
        # Token auth on, with a token of our own: nodes and drivers must all present it.
        token = Path(self.temp) / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        # Usage statistics off on every node; a head started by `ray start` would still send
        # Ray a "disabled" notice, which a closed loopback port keeps on this machine.
        self.env |= {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": LOCAL_SINK}
        self.nodes: list[dict[str, int]] = []
        self.address = ""

    def _ports(self, head: bool) -> dict[str, int]:
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

    def add_node(self) -> None:
        head = not self.nodes
        ports = self._ports(head)
        cmd = [str(Path(sys.executable).parent / "ray"), "start", f"--node-ip-address={NODE_IP}"]
        cmd += ["--num-cpus=1", "--disable-usage-stats"]
        cmd += [f"--{k}={v}" for k, v in ports.items()]
        if head:
            cmd += ["--head", f"--temp-dir={self.temp}", "--include-dashboard=false"]
            self.address = f"{NODE_IP}:{ports['port']}"
        else:
            cmd += [f"--address={self.address}"]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        self.nodes.append(ports)

    def processes(self, needle: str | None = None) -> list:
        import psutil  # ray ships it; importable once ray is

        needle = needle or self.temp
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if needle in " ".join(p.info["cmdline"] or ()):
                found.append(p)
        return found

    def raylet(self, index: int):
        port = self.nodes[index]["node-manager-port"]
        (raylet,) = self.processes(f"--node_manager_port={port}")
        return raylet

    def running_trial(self, index: int) -> bool:
        """Whether a Tune trial is executing on the node (its actor's title while in train())."""
        titles = [" ".join(p.cmdline()) for p in self.raylet(index).children(recursive=True)]
        return any(t.startswith("ray::ImplicitFunc.train") for t in titles)

    def kill_node(self, index: int) -> None:
        """SIGKILL a worker node's raylet and everything it started (its Ray workers, agents),
        as when a spot instance is reclaimed: the raylet alone would let a running trial end."""
        raylet = self.raylet(index)
        for p in [*raylet.children(recursive=True), raylet]:
            p.kill()

    def stop(self) -> None:
        for _ in range(3):  # a dying raylet may still spawn a worker or two
            for p in self.processes():
                try:
                    p.kill()
                except Exception:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)
