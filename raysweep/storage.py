"""One storage code path for local directories and object-store URIs (s3://, gs://) via pyarrow.fs.

A URI may carry pyarrow's filesystem options as query parameters, e.g.
`s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http` for an S3-compatible server;
credentials come from the usual environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...)
and never from the URI, which is printed and recorded.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

# Lease timing for object-store locks: a holder renews every LEASE_S / 4 seconds, so a lease
# outlives a stalled renewal or two, and a dead holder's lease frees within LEASE_S.
LEASE_S = 60.0
POLL_S = 0.5


@dataclass(frozen=True)
class Store:
    """A filesystem and a root path on it; all paths below are relative to the root."""

    uri: str
    fs: pafs.FileSystem
    root: str

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write(self, rel: str, data: bytes) -> None:
        """Write atomically: readers see the old content or the new, never a part of it.

        Locally: write a hidden temporary name, then rename (readers skip '.' names). An object
        store's PUT is already atomic, and its rename is a copy, so there we write in place.
        """
        final = self.path(rel)
        if not self.local:
            with self.fs.open_output_stream(final) as f:
                f.write(data)
            return
        parent, name = final.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def list(self, rel: str) -> list[str]:
        """Names (not paths) of the visible entries directly under `rel`; [] if it does not exist."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        names = [info.base_name for info in self.fs.get_file_info(selector)]
        return sorted(n for n in names if not n.startswith((".", "_")))

    def lock(self, rel: str) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock across processes and nodes, released if its holder dies.

        Local paths (NFS included): flock on a file. Object stores offer no compare-and-swap
        through pyarrow, so there a lease held in the Ray cluster serialises the holders
        (see `Leases`); outside Ray, one process is the only writer and a thread lock suffices.
        """
        if self.local:
            return _flock(self.path(rel))
        import ray  # here, not at the top: reading results and checkpoints needs no Ray

        if ray.is_initialized():
            return _lease(f"{self.uri}#{rel}")
        return _THREAD_LOCKS.setdefault(f"{self.uri}#{rel}", threading.Lock())


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_THREAD_LOCKS: dict[str, threading.Lock] = {}


class Leases:
    """A table of expiring leases, one per name: the Ray actor behind object-store locks.

    One detached actor per cluster, pinned to the head node (spot workers come and go; the
    head outlives the run). A holder renews its lease while it works; a holder that dies
    stops renewing, and its lease passes to the next caller after LEASE_S.
    """

    def __init__(self):
        self.leases: dict[str, tuple[str, float]] = {}

    def acquire(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew `name` for `holder` if it is free, expired or already theirs."""
        now = time.monotonic()
        current = self.leases.get(name)
        if current is None or current[0] == holder or current[1] < now:
            self.leases[name] = (holder, now + ttl)
            return True
        return False

    def release(self, name: str, holder: str) -> None:
        if self.leases.get(name, ("",))[0] == holder:
            del self.leases[name]


LEASES_ACTOR = "raysweep-leases"


def leases_actor():
    """The cluster's lease table, created on first use (on the head node, using no CPU)."""
    import ray

    return (
        ray.remote(Leases)
        .options(
            name=LEASES_ACTOR,
            namespace="raysweep",
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
            # Outside the caller's placement group: Tune runs trials in one, and Ray would
            # otherwise try to fit this actor into the trial's bundle.
            scheduling_strategy="DEFAULT",
        )
        .remote()
    )


@contextlib.contextmanager
def _lease(name: str, ttl: float = LEASE_S) -> Iterator[None]:
    import ray

    table, holder = leases_actor(), uuid.uuid4().hex
    while not ray.get(table.acquire.remote(name, holder, ttl)):
        time.sleep(POLL_S)
    stop = threading.Event()

    def renew():
        while not stop.wait(ttl / 4):
            if not ray.get(table.acquire.remote(name, holder, ttl)):  # stalled past the ttl
                print(f"warning: lost the lease on {name}; its work may be repeated", flush=True)

    renewer = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        ray.get(table.release.remote(name, holder))


def open_store(uri: str) -> Store:
    """A Store for a local path (created if missing) or a pyarrow-supported URI."""
    if "://" in uri and not uri.startswith("file://"):
        fs, root = pafs.FileSystem.from_uri(uri)
        return Store(uri, fs, root)
    # Absolute, so the same Store means the same place in Ray workers, whose cwd differs.
    root = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    os.makedirs(root, exist_ok=True)
    return Store(root, pafs.LocalFileSystem(), root)
