"""Ends the local Ray a driver started once that driver is gone, however it died (`kill -9`
included): `cluster.start_ray` runs it as `python reaper.py MARK FD`, standard library only.

Ray gives the processes the driver starts (GCS, raylet, monitors) a parent-death signal, but
the agents its raylet starts (ray::DashboardAgent, ray::RuntimeEnvAgent) notice the raylet's
death and then hang on their way out (ray-project/ray#52385, #59162): they outlived a killed
driver for good. So the reaper, a child of the driver in a session of its own, keeps a record
of that Ray's processes while the driver lives, and once the driver's end of a pipe closes
(its exit or its death) SIGKILLs exactly those, by id and start time (a reused id is not
theirs). That Ray's processes are the driver's descendants carrying `RAYSWEEP_RAY=MARK`, set in
the driver's environment only while `ray.init` starts them, and whatever those start: a process
Ray retitles ("ray::IDLE") may blank its /proc environment, so descent counts, not the mark
alone. Anything else the driver starts, and every other process on the machine, is left alone.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

ENV = "RAYSWEEP_RAY"
POLL_S = 0.5  # how often the record is brought up to date while the driver lives
ROUNDS = 50  # kill rounds 0.2 s apart: a raylet killed mid-round may have started a worker


def processes() -> dict[int, tuple[int, int]]:
    """Every live process: id -> (parent id, start time in clock ticks since boot)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # the name may hold spaces and ")"
        if fields[0] != b"Z":  # a zombie is dead already
            out[int(name)] = (int(fields[1]), int(fields[19]))
    return out


def _marked(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:  # ended meanwhile, or another user's
        return False


def record(roots: list[int], mark: str, known: dict[int, int]) -> None:
    """Add to `known` (id -> start time) the descendants of `roots` that carry the mark, and
    every descendant of a process in `known` (a root in it included)."""
    needle, procs = f"{ENV}={mark}".encode(), processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    todo = [(root, root in known) for root in roots]
    while todo:
        pid, ours = todo.pop()
        for child in children.get(pid, ()):
            if child == os.getpid():
                continue
            mine = ours or known.get(child) == procs[child][1] or _marked(child, needle)
            if mine:
                known[child] = procs[child][1]
            todo.append((child, mine))


def _alive(known: dict[int, int]) -> list[int]:
    procs = processes()
    return [pid for pid, start in known.items() if procs.get(pid, (0, None))[1] == start]


def end(known: dict[int, int], mark: str) -> set[int]:
    """SIGKILL the processes in `known` (same id, same start time), what they started, and any
    process still carrying the mark, until none is left; return the ids killed."""
    killed, needle = set(), f"{ENV}={mark}".encode()
    for _ in range(ROUNDS):
        record(_alive(known), mark, known)  # orphans are re-parented: trace from the living
        alive = _alive(known)
        alive += [p for p in processes() if p not in known and _marked(p, needle)]  # unseen
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:  # ended meanwhile
                pass
        time.sleep(0.2)
    return killed


def main(mark: str, fd: int) -> None:
    """Keep the record while the driver's end of the pipe is open; then end what it holds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver
    driver, known = os.getppid(), {}
    while True:
        record([driver], mark, known)
        if select.select([fd], [], [], POLL_S)[0] and not os.read(fd, 1):
            break  # end of file: the driver exited or died
    end(known, mark)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
