"""`raysweep doctor`: is this cluster and this storage fit for a sweep? One table, exit 1 if not.

Checks: the cluster's alive nodes and their CPUs/GPUs; that every node runs the driver's
versions of raysweep (and the same code), torch, ray, optuna, pyarrow and Python; and that the
storage can be written, read and deleted, from the driver and from every node, and is shared:
each node reads the driver's probe object and the driver reads each node's.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raysweep.analysis import results
from raysweep.base.storage import open_store

from .cluster import start_ray

NODE_TIMEOUT_S = 120.0  # a node that answers no probe in this time counts as a problem
PROBE_DIR = "_doctor"  # '_' hides it from Store.list, so no experiment ever reads it


def installed() -> dict[str, str]:
    """This process's versions, plus a hash of raysweep's source (equal versions, other commit)."""
    files = sorted(Path(__file__).parent.glob("*.py"))
    code = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    return json.loads(results.versions()) | {"code": code}


def probe_storage(uri: str, read_rel: str | None, write_rel: str) -> str:
    """Read `read_rel` back if given, write+read+delete a scratch object, leave `write_rel`."""
    try:
        store = open_store(uri)
        if read_rel is not None and store.read(read_rel) != read_rel.encode():
            return f"error: {read_rel} has other content"
        scratch = f"{PROBE_DIR}/scratch-{uuid.uuid4().hex}"
        store.write(scratch, scratch.encode())
        if store.read(scratch) != scratch.encode():
            return "error: read back other bytes than written"
        store.delete(scratch)
        if store.exists(scratch):
            return "error: delete did not remove the object"
        store.write(write_rel, write_rel.encode())
        return "ok"
    except Exception as e:  # any failure is a finding to print, not a crash
        return f"error: {type(e).__name__}: {e}"


def _on_node(storage: str | None, driver_rel: str | None) -> dict:
    node_id = ray.get_runtime_context().get_node_id()
    report = installed()
    if storage is not None:
        rel = f"{PROBE_DIR}/node-{node_id[:12]}-{uuid.uuid4().hex[:6]}"
        report |= {"storage": probe_storage(storage, driver_rel, rel), "probe": rel}
    return report


def probe_nodes(storage: str | None, driver_rel: str | None) -> tuple[list[dict], list[str]]:
    """One row per alive node (resources, versions, storage), and the problems found."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    on_node = ray.remote(num_cpus=0)(_on_node)
    refs = {
        on_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(storage, driver_rel): n
        for n in nodes
    }
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=NODE_TIMEOUT_S)
    mine, rows, problems = installed(), [], []
    for ref, node in refs.items():
        res = node["Resources"]
        row = {
            "node": node["NodeID"][:12],
            "ip": node["NodeManagerAddress"],
            "CPU": res.get("CPU", 0),
            "GPU": res.get("GPU", 0),
        }
        if ref not in ready:
            problems.append(f"node {row['node']}: no answer in {NODE_TIMEOUT_S:.0f}s")
            rows.append(row)
            continue
        try:
            report = ray.get(ref)
        except Exception as e:  # e.g. raysweep not importable there
            problems.append(f"node {row['node']}: {type(e).__name__}: {str(e)[:200]}")
            rows.append(row)
            continue
        differ = [k for k in mine if report.get(k) != mine[k]]
        problems += [f"node {row['node']}: {k} {report[k]} != driver's {mine[k]}" for k in differ]
        if storage is not None and report["storage"] != "ok":
            problems.append(f"node {row['node']}: storage {report['storage']}")
        row |= {k: report[k] for k in (*mine, "probe") if k in report}
        if storage is not None:
            row["storage"] = "ok" if report["storage"] == "ok" else "error (below)"
        rows.append(row)
    if not nodes:
        problems.append("no alive nodes")
    return rows, problems


def main(address: str | None = None, storage: str | None = None) -> int:
    problems: list[str] = []
    driver_rel = None
    if storage is not None:
        driver_rel = f"{PROBE_DIR}/driver-{uuid.uuid4().hex}"
        status = probe_storage(storage, None, driver_rel)
        print(f"storage  {storage}: write+read+delete from the driver: {status}")
        if status != "ok":
            problems.append(f"driver: storage {status}")
            driver_rel = None
    try:
        start_ray(address)
    except Exception as e:  # wrong address, missing auth token, ...
        problems.append(f"cannot connect to Ray at {address or 'local'}: {e}")
        return _finish(problems)
    rows, found = probe_nodes(storage, driver_rel)
    problems += found
    if storage is not None and driver_rel is not None:
        problems += _collect_probes(storage, driver_rel, rows)
    total = ray.cluster_resources()
    print(
        f"ray      {len(rows)} node{'s' * (len(rows) != 1)}, {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"
    )
    print(f"driver   {json.dumps(installed())}\n")
    print(_table([{k: v for k, v in r.items() if k != "probe"} for r in rows]))
    return _finish(problems)


def _collect_probes(storage: str, driver_rel: str, rows: list[dict]) -> list[str]:
    """Read each node's probe back on the driver (the storage is shared), then delete all."""
    store, problems = open_store(storage), []
    for row in rows:
        rel = row.get("probe")
        if rel is None:
            continue
        if not store.exists(rel):
            problems.append(f"node {row['node']}: its probe is not visible to the driver")
            continue
        store.delete(rel)
    store.delete(driver_rel)
    return problems


def _table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "-")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _finish(problems: list[str]) -> int:
    if not problems:
        print("\nok: no problems found")
        return 0
    print(f"\n{len(problems)} problem(s):")
    for p in problems:
        print(f"  - {p}")
    return 1
