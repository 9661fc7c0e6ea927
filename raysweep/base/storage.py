"""One storage code path for local directories and object-store URIs (s3://, gs://) via pyarrow.fs.

A URI may carry pyarrow's filesystem options as query parameters, e.g.
`s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http` for an S3-compatible server;
credentials come from the usual environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...)
and never from the URI, which is printed and recorded.

Also here: the locks that serialise makers of one artifact, the lease that keeps one driver per
experiment (`driver_lease`), and the one-line errors a storage's state raises (RunStateError).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

# Lease timing for object-store locks: a holder renews every LEASE_S / 4 seconds, so a lease
# outlives a stalled renewal or two, and a dead holder's lease frees within LEASE_S.
LEASE_S = 60.0
POLL_S = 0.5
# An object store has no compare-and-swap through pyarrow: a driver writes its lease, waits this
# long, and holds it only if it reads its own lease back (the last of racing writers wins).
SETTLE_S = 1.0


class RunStateError(RuntimeError):
    """The storage's state does not allow what was asked (start, resume), said in one line."""


class CorruptStorage(RunStateError):
    """A damaged file in the storage, as one line naming it and the fix."""


class WriteFailed(CorruptStorage):
    """A write the storage refused (permission, disk full, an object-store error after its
    retries), as one line naming the path, the cause and the fix. A CorruptStorage, so it
    stops a sweep the way a damaged checkpoint does (sweep.StopOnCorrupt)."""


# What fixes a refused write; the trials whose writes were lost run again on resume.
WRITE_FIX = (
    "make the storage writable (permissions, free space, credentials), then "
    "`raysweep run SPEC --resume` runs the lost trials again"
)


def write_failed(path: str, error: OSError) -> WriteFailed:
    """The one line for a write to `path` that the storage refused with `error`."""
    why = str(error).splitlines()[0] if str(error) else ""
    return WriteFailed(f"{path}: cannot be written ({type(error).__name__}: {why}); {WRITE_FIX}")


class LeaseHeld(RunStateError):
    """Another driver is running the experiment, as one line naming its host and start time."""


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
        WriteFailed (one line) if the storage refuses it: every write point of a sweep (rows,
        checkpoints, poisons, the journal's upload, the lease) stops the sweep the same way.
        """
        final = self.path(rel)
        parent, name = final.rsplit("/", 1)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            if not self.local:
                with self.fs.open_output_stream(final) as f:
                    f.write(data)
                return
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, final)
        except OSError as e:  # pyarrow raises OSError for local and object-store failures alike
            if self.local:
                with contextlib.suppress(OSError):  # the temporary of a refused rename, if any
                    self.fs.delete_file(tmp)
            raise write_failed(final, e) from None

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

    def try_lock(self, rel: str) -> contextlib.AbstractContextManager[bool]:
        """`lock` without waiting: yields True while holding it, or False at once if another
        holder has it (checkpoints.ensure_each: processes share out the artifacts to make)."""
        if self.local:
            return _flock(self.path(rel), wait=False)
        import ray

        if ray.is_initialized():
            return _lease(f"{self.uri}#{rel}", wait=False)
        return _try_thread_lock(_THREAD_LOCKS.setdefault(f"{self.uri}#{rel}", threading.Lock()))


@contextlib.contextmanager
def _flock(path: str, wait: bool = True) -> Iterator[bool]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _try_thread_lock(lock: threading.Lock) -> Iterator[bool]:
    if not lock.acquire(blocking=False):
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


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
def _lease(name: str, ttl: float = LEASE_S, wait: bool = True) -> Iterator[bool]:
    import ray

    table, holder = leases_actor(), uuid.uuid4().hex
    while not ray.get(table.acquire.remote(name, holder, ttl)):
        if not wait:
            yield False
            return
        time.sleep(POLL_S)

    def renew() -> bool:
        if not ray.get(table.acquire.remote(name, holder, ttl)):  # stalled past the ttl
            print(f"warning: lost the lease on {name}; its work may be repeated", flush=True)
        return True  # and keep asking: a lapsed lease is taken back if nobody else took it

    try:
        with _renewing(renew, ttl / 4, f"lease-{name}"):
            yield True
    finally:
        ray.get(table.release.remote(name, holder))


@contextlib.contextmanager
def _renewing(renew: Callable[[], bool], every_s: float, name: str) -> Iterator[None]:
    """Run the block while a daemon thread calls `renew` every `every_s` seconds, until the
    block ends or `renew` returns False (the lease is lost for good): both kinds of lease."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s) and renew():
            pass

    renewer = threading.Thread(target=loop, name=name, daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


def open_store(uri: str, create: bool = True) -> Store:
    """A Store for a local path (created if missing, unless `create` is False) or a
    pyarrow-supported URI; RunStateError for a local path that is missing and not created."""
    if "://" in uri and not uri.startswith("file://"):
        fs, root = pafs.FileSystem.from_uri(uri)
        return Store(uri, fs, root)
    # Absolute, so the same Store means the same place in Ray workers, whose cwd differs.
    root = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    if create:
        os.makedirs(root, exist_ok=True)
    elif not os.path.isdir(root):
        raise RunStateError(f"{uri}: no such directory")
    return Store(root, pafs.LocalFileSystem(), root)


# ---------------------------------------------------------------- one driver per experiment

LEASES_DIR = ".leases"  # beside the experiments (not in them), hidden from Store.list


@contextlib.contextmanager
def driver_lease(store: Store, experiment: str) -> Iterator[None]:
    """Hold the right to drive `experiment` while the block runs, or raise LeaseHeld at once.

    Two drivers of one experiment would tell each other's Optuna trials and overwrite each
    other's rows. Local paths (NFS included): a non-blocking flock, which the kernel frees when
    its holder dies. Object stores: an expiring lease object renewed every LEASE_S / 4, as the
    checkpoint leases are, but in the store itself, so it binds drivers of any cluster and is
    taken before Ray starts; a holder that died on this host is taken over at once, one
    elsewhere once its lease expires (by the hosts' clocks, so they must agree within LEASE_S).
    """
    me = {
        "holder": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pidns": _pid_namespace(),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    hold = _flock_lease if store.local else _object_lease
    with hold(store, f"{LEASES_DIR}/{experiment}", me, store.path(experiment)):
        yield


def _held(where: str, holder: dict, expires: bool) -> LeaseHeld:
    who = ", ".join(f"{k} {holder.get(k, '?')}" for k in ("host", "pid"))
    wait = f"; a killed driver's lease expires within {LEASE_S:.0f} s" if expires else ""
    return LeaseHeld(
        f"{where}: another driver is running this experiment ({who}, since "
        f"{holder.get('started_at', '?')}); wait for it to finish or stop it{wait}"
    )


@contextlib.contextmanager
def _flock_lease(store: Store, rel: str, me: dict, where: str) -> Iterator[None]:
    path = store.path(rel)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a+b")  # append mode: after truncate(0) the write lands at 0
    except OSError as e:
        raise write_failed(path, e) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _held(where, _flock_holder(f), expires=False) from None
        f.truncate(0)
        f.write(json.dumps(me).encode())
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _flock_holder(f) -> dict:
    for _ in range(10):  # the holder may have locked the file and not yet written itself in
        f.seek(0)
        try:
            return json.loads(f.read())
        except ValueError:
            time.sleep(0.1)
    return {}


@contextlib.contextmanager
def _object_lease(store: Store, rel: str, me: dict, where: str) -> Iterator[None]:
    current = _read_lease(store, rel)
    if current and not _stale(current):
        raise _held(where, current, expires=True)
    _write_lease(store, rel, me)
    time.sleep(SETTLE_S)
    current = _read_lease(store, rel)
    if current.get("holder") != me["holder"]:
        raise _held(where, current, expires=True)

    def renew() -> bool:
        if _read_lease(store, rel).get("holder") != me["holder"]:  # stalled past LEASE_S
            print(f"warning: {where}: another driver took over the lease", flush=True)
            return False
        _write_lease(store, rel, me)
        return True

    try:
        with _renewing(renew, LEASE_S / 4, f"lease-{rel}"):
            yield
    finally:
        if _read_lease(store, rel).get("holder") == me["holder"]:
            store.delete(rel)


def _read_lease(store: Store, rel: str) -> dict:
    try:
        return json.loads(store.read(rel))
    except FileNotFoundError:
        return {}
    except ValueError:  # a torn or foreign object: nobody's lease
        return {"expires": 0}


def _write_lease(store: Store, rel: str, me: dict) -> None:
    store.write(rel, json.dumps(me | {"expires": time.time() + LEASE_S}).encode())


def _stale(lease: dict) -> bool:
    """Expired, or its holder was a process on this host (same pid namespace) that is gone."""
    if lease.get("expires", 0) < time.time():
        return True
    here = (socket.gethostname(), _pid_namespace())
    return (lease.get("host"), lease.get("pidns")) == here and not _alive(lease.get("pid"))


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def _pid_namespace() -> int | None:
    # Containers can share a hostname; a pid means something only in its own pid namespace.
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
