"""Where a sweep runs and what survives it: Ray (local on loopback, or a cluster), the run's
durable state in storage (the spec it started with, the Optuna journal), the resume rules.

`sweep.run` reconciles the studies with the Parquet rows on every start, so continuing an
interrupted run is the same code path as starting one; `check_resume` adds the CLI's rule on
top (a new run must not exist yet, `--resume` needs one with the same spec).
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from unittest import mock

import pandas as pd
import ray
import ray._private.ray_constants as ray_constants
from optuna.storages.journal import JournalFileBackend, JournalStorage

from raysweep.analysis.convergence import finished
from raysweep.base.storage import CorruptStorage, RunStateError, Store, write_failed
from raysweep.experiment.spec import Spec

from . import reaper

# Ray's gRPC servers (GCS, raylet, workers) listen on loopback only when the node IP is exactly
# 127.0.0.1; any other address, 127.0.0.2 included, makes them listen on every interface.
LOCAL_IP = "127.0.0.1"


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`address`, else $RAY_ADDRESS), or start a local Ray on loopback.

    `ray job submit` sets RAY_ADDRESS for the driver it runs, so a submitted `raysweep run`
    joins its cluster. A local Ray is started even if `ray start` left a cluster running here
    (address="local"); it listens on 127.0.0.1 only, which needs Ray's cluster mode off while
    it starts, or ray.init swaps 127.0.0.1 for the machine's network address.
    """
    if ray.is_initialized():
        return
    # Nothing leaves the machine: usage statistics off in every Ray process started from here
    # (they inherit this environment; Ray's release wheels turn them off in ray.init, nightly
    # ones do not), and no dashboard web UI on a local Ray.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Quiet: the driver connects before its one-line checks (resources, lease), whose
        # refusals must stay the only line it prints.
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return
    # Every process of this Ray inherits the mark its reaper ends them by (`reap_with_driver`);
    # set only while Ray starts, so what the driver starts later is not marked.
    env = {reaper.ENV: reap_with_driver()} if os.path.isdir("/proc") else {}
    with (
        mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False),
        mock.patch.dict(os.environ, env),
    ):
        ray.init(
            address="local",
            _node_ip_address=LOCAL_IP,
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
        )


_reaper: dict[str, object] = {}  # this driver's reaper, once started: its mark and process


def reap_with_driver() -> str:
    """Start this driver's reaper once (reaper.py), and return the mark it ends processes by.

    It gets the read end of a pipe whose write end only this process holds (not inherited:
    Ray's processes are exec'd), in a session of its own (a Ctrl-C or a kill of the driver's
    process group leaves it to do its job); when the driver ends, however, it kills the
    processes carrying the mark, which `start_ray` gives the local Ray's processes.
    """
    if not _reaper:
        mark = f"{os.getpid()}-{secrets.token_hex(8)}"
        read, write = os.pipe()  # `write` is never closed: the driver's end closes it
        # -I -S: the standard library alone (reaper.py imports nothing else), started fast.
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", reaper.__file__, mark, str(read)],
            pass_fds=(read,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(read)
        _reaper.update(mark=mark, process=process)
    return str(_reaper["mark"])


def slots(spec: Spec, max_concurrent: int | None) -> int:
    """How many trials may run at once: `max_concurrent`, else what the cluster fits now.

    An autoscaling cluster whose workers are not up yet fits little now: set `max_concurrent`
    there, or the sweep never asks for more than what is already running.
    """
    if max_concurrent:
        return max_concurrent
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    cluster = ray.cluster_resources()
    n = cluster.get("CPU", 1) / cpu
    if gpu:
        n = min(n, cluster.get("GPU", 0) / gpu)
    return max(1, int(n))


# ---------------------------------------------------------------- the run's record


# Spec keys a resumed run may change: how many trials, confirm seeds, per-trial resources.
# Any other change would make new rows incomparable with the recorded ones.
RESUMABLE_CHANGES = {"trials_per_cell", "confirm", "resources"}


def check_resume(spec: Spec, store: Store, resume: bool | None, df: pd.DataFrame) -> None:
    """Refuse to start over an existing experiment, to resume a missing one, or to change spec;
    `df`: the experiment's rows (`results.read`), which say whether it is complete.

    Re-running an identical spec whose experiment is complete is allowed (it only reprints).

    `resume=None` (library use) starts or continues, whichever applies; it still refuses a
    spec changed beyond RESUMABLE_CHANGES.
    """
    where, recorded = store.path(spec.name), recorded_spec(spec, store)
    if recorded is None:
        if resume:
            raise RunStateError(
                f"{where}: nothing to resume: no experiment '{spec.name}' there; "
                "run without --resume to start it"
            )
        return
    current = json.loads(json.dumps(spec.raw))
    changed = sorted(k for k in {*recorded, *current} if recorded.get(k) != current.get(k))
    if set(changed) - RESUMABLE_CHANGES:
        raise RunStateError(
            f"{where}: the spec changed since experiment '{spec.name}' started "
            f"(differs in: {', '.join(changed)}); a resume may change only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))}; give the new spec another name"
        )
    if resume is False:
        n = int((df["phase"] == "tune").sum()) if len(df) else 0
        low, high = spec.trials_range()
        total = len(spec.cells()) * high  # a range's cells may stop before, converged
        if not changed and finished(df, spec.cells(), low, high):
            return  # the same spec, already complete: nothing runs, the table is shown again
        raise RunStateError(
            f"{where}: experiment '{spec.name}' already exists ({n}/{total} tuning trials "
            "recorded); pass --resume to continue it, or choose another name or --storage"
        )


def recorded_spec(spec: Spec, store: Store) -> dict | None:
    """The spec the experiment was started with, or None if it was never started;
    CorruptStorage (one line) if its spec.json does not hold one."""
    rel = f"{spec.name}/spec.json"
    if not store.exists(rel):
        return None
    try:
        recorded = json.loads(store.read(rel))["spec"]
        if not isinstance(recorded, dict):
            raise TypeError("its spec is not a mapping")
    except (ValueError, KeyError, TypeError) as e:  # not JSON, not UTF-8, `{}`, a list
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise CorruptStorage(
            f"{store.path(rel)}: not a recorded spec ({why}); delete it, then `raysweep repair "
            f"SPEC --storage {store.uri}` records SPEC there again"
        ) from None
    return recorded


def record_spec(spec: Spec, store: Store) -> None:
    """Keep <experiment>/spec.json at the spec of the latest start (what resumes compare to)."""
    rel = f"{spec.name}/spec.json"
    old = json.loads(store.read(rel)) if store.exists(rel) else {}
    if old.get("spec_hash") != spec.hash:
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        record = {"spec": spec.raw, "spec_hash": spec.hash, "spec_since": now}
        record["started_at"] = old.get("started_at", now)  # the experiment's first start
        store.write(rel, json.dumps(record, indent=1).encode())


def open_journal(spec: Spec, store: Store) -> tuple[JournalStorage, Callable[[], None]]:
    """The run's Optuna journal and a `sync()` that makes its latest state durable.

    On local (or NFS) storage the journal is <storage>/<experiment>/optuna.journal itself and
    sync() does nothing. An object store cannot append, so the driver keeps a local copy,
    restored from the store on start, and sync() uploads it whole (it is small: a few hundred
    bytes per trial). The searcher syncs after every ask and tell.
    """
    rel = f"{spec.name}/optuna.journal"
    if store.local:
        path = store.path(rel)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return JournalStorage(JournalFile(path)), lambda: None
        except OSError as e:  # creating the file
            raise write_failed(path, e) from None
    local = tempfile.mkdtemp(prefix="raysweep-journal-")
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    path = os.path.join(local, "optuna.journal")
    uploaded = [store.read(rel) if store.exists(rel) else b""]
    with open(path, "wb") as f:
        f.write(uploaded[0])

    def sync() -> None:
        with open(path, "rb") as f:
            data = f.read()
        if data != uploaded[0]:  # a start with nothing to do writes nothing
            store.write(rel, data)
            uploaded[0] = data

    return JournalStorage(JournalFileBackend(path)), sync


class JournalFile(JournalFileBackend):
    """Optuna's journal file, whose appends the storage refuses raise WriteFailed (one line),
    as every other write of the sweep does (storage.Store.write)."""

    def append_logs(self, logs: list[dict]) -> None:
        try:
            super().append_logs(logs)
        except OSError as e:
            raise write_failed(self._file_path, e) from None
