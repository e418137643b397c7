"""Stops the local Ray a driver started when the driver dies without stopping it.

``ray.shutdown()`` stops what ``ray.init`` started, but a driver killed with SIGKILL (or
an out-of-memory kill) runs no clean-up, and Ray's GCS, raylet, dashboard agent and
runtime-env agent outlive it. :class:`~stepsal_lens.eval.scale.RayPool` starts this
script beside a local Ray, in a session of its own (Ctrl-C in the terminal does not
reach it), with a pipe on its standard input. Every half second it records the
driver's descendants (pid and start time, from ``/proc``); when the pipe closes
without ``stop`` (the driver is gone), it sends SIGKILL to each recorded process that is
still the same process. ``stop`` (a clean shutdown) ends it without killing anything.

Run as a plain script (``python -I _reaper.py PID``): it imports nothing of the package,
so it starts in milliseconds. Linux only (``/proc``); elsewhere it is not started.
"""

from __future__ import annotations

import os
import select
import signal
import sys


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[19]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(root: int) -> dict[int, str]:
    """``pid -> start time`` of every process below ``root``."""
    kids, found, todo = _children(), {}, [root]
    while todo:
        for pid in kids.get(todo.pop(), []):
            start = _start_time(pid)
            if pid not in found and start is not None:
                found[pid] = start
                todo.append(pid)
    return found


def watch(driver: int, period: float = 0.5) -> None:
    """Track ``driver``'s descendants until standard input closes; kill them unless the
    driver said ``stop``."""
    me, tracked = os.getpid(), {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], period)
        if ready:
            line = sys.stdin.readline()
            if line.strip() == "stop":
                return
            if line == "":  # the driver is gone: nothing will stop its Ray
                break
        tracked.update({p: s for p, s in descendants(driver).items() if p != me})
    for pid, start in tracked.items():
        if _start_time(pid) == start:  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
