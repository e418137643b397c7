"""The judge's program inside the sandbox: standard library only, run as ``python -I``.

Not imported by stepsal_lens: :mod:`stepsal_lens.eval.code.sandbox` starts it by path in
a sandbox and talks to it over its stdin/stdout, one JSON object a line:

1. the host sends the setup ``{"code", "mode", "func_name", "limits", "uid", "root"}``;
   the harness (re)builds its filesystem view when ``root`` is given (the ``unshare``
   backend: a private root of read-only binds, then ``chroot``), sets its resource
   limits, drops privileges (to ``uid`` when it may, else all capabilities), forbids new
   privileges and stops being dumpable, so the programs it runs can neither trace it
   nor read its memory; then it compiles the code and answers ``{"ready": true}`` or
   ``{"compile_error": "..."}``;
2. for each ``{"input": "..."}`` the host sends, it forks one child that runs the
   program on that input (stdin tests: as ``__main__`` with the input on fd 0;
   functional tests: ``Solution().func_name(*json-decoded lines)``), waits at most
   ``timeout`` seconds, kills every other process of the sandbox (``kill(-1)``: stray
   background children included), and answers ``{"status", "stdout" | "result",
   "error", "seconds"}``.

The children never see the protocol's pipes (closed before the program runs), and the
expected outputs never enter the sandbox: the host compares.
"""

import ctypes
import errno
import io
import json
import os
import resource
import select
import signal
import sys
import time
import traceback

# What LiveCodeBench puts before every program (its ``import_string``): programs may use
# these names without importing them.
PRELUDE = (
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
    "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\n"
    "from random import *\nfrom statistics import *\nfrom itertools import *\n"
    "from functools import *\nfrom operator import *\nfrom io import *\nfrom sys import *\n"
    "from json import *\nfrom builtins import *\nfrom typing import *\nimport string\nimport re\n"
    "import datetime\nimport collections\nimport heapq\nimport bisect\nimport copy\n"
    "import math\nimport random\nimport statistics\nimport itertools\nimport functools\n"
    "import operator\nimport io\nimport sys\nimport json\nsys.setrecursionlimit(50000)\n")

WORK = "/sandbox"  # the program's folder (the "none" backend passes its own)
EXIT_MEMORY, EXIT_ERROR, EXIT_OUTPUT, EXIT_NOFUNC = 70, 71, 72, 73

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option, arg):
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def _mount(src, target, fstype, flags, data=None):
    if _libc.mount(src.encode() if src else None, target.encode(),
                   fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {target}: {os.strerror(err)}")


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 32, 4096, 16384, 1 << 18)


def build_root(root):
    """The ``unshare`` backend: a fresh root of read-only binds, then chroot into it."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    new = root["staging"]
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path in root["ro"]:
        if not os.path.exists(path):
            continue
        target = new + path
        if os.path.isdir(path):
            os.makedirs(target, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            open(target, "a").close()
        _mount(path, target, None, MS_BIND | MS_REC)
        keep = os.statvfs(path).f_flag & (MS_NODEV | 8 | 1024 | 2048 | 4096)  # locked flags
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)
    os.makedirs(new + "/dev", mode=0o755, exist_ok=True)
    for dev in ("null", "zero", "urandom", "random"):
        open(new + "/dev/" + dev, "a").close()
        _mount("/dev/" + dev, new + "/dev/" + dev, None, MS_BIND)
    os.makedirs(new + "/proc", mode=0o555, exist_ok=True)
    _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV)
    os.makedirs(new + WORK, exist_ok=True)
    _mount("tmpfs", new + WORK, "tmpfs", MS_NOSUID | MS_NODEV,
           f"mode=0777,size={root['work_bytes']}")
    _mount(None, new, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    os.chroot(new)
    os.chdir(WORK)


def drop_privileges(uid):
    """To ``uid`` when we are real root (capabilities go with it), else drop every
    capability; then no new privileges and no dumping (children cannot trace us)."""
    if os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        except (OSError, TypeError):
            # root only inside a user namespace: clear every capability set
            class Header(ctypes.Structure):
                _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

            class Data(ctypes.Structure):
                _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                            ("inheritable", ctypes.c_uint32)]

            for cap in range(64):  # the bounding set, so nothing comes back
                _libc.prctl(24, ctypes.c_ulong(cap), 0, 0, 0)  # PR_CAPBSET_DROP
            if _libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
                raise OSError(ctypes.get_errno(), "capset failed")
    _prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
    _prctl(4, 0)  # PR_SET_DUMPABLE


def set_limits(limits):
    def lim(kind, value):
        value = int(value)
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):  # above the hard limit we were given: keep that one
            hard = resource.getrlimit(kind)[1]
            resource.setrlimit(kind, (min(value, hard), hard) if hard >= 0 else (value, value))

    lim(resource.RLIMIT_AS, limits["memory_bytes"])
    lim(resource.RLIMIT_FSIZE, limits["output_bytes"])
    lim(resource.RLIMIT_NPROC, limits["nproc"])
    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_NOFILE, 256)


def run_child(state, data):
    """In the forked child: the program on one input; never returns."""
    try:
        os.setpgid(0, 0)
        fd_in = os.open(WORK + "/.stdin", os.O_RDONLY)
        fd_out = os.open(WORK + "/.stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fd_err = os.open(WORK + "/.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd_in, 0)
        os.dup2(fd_out, 1)
        os.dup2(fd_err, 2)
        os.closerange(3, 1 << 16)  # the protocol pipes and everything else
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        cpu = int(state["limits"]["timeout"]) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False))
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        sys.set_int_max_str_digits(50000)
    except BaseException:
        os._exit(EXIT_ERROR)
    code = EXIT_ERROR
    try:
        if state["mode"] == "stdin":
            g = {"__name__": "__main__", "__builtins__": __builtins__}
            exec(state["prelude"], g)
            try:
                exec(state["compiled"], g)
            except SystemExit:
                pass  # LiveCodeBench lets a program end with exit()
        else:
            g = {"__name__": "tmp_sol", "__builtins__": __builtins__}
            exec(state["prelude"], g)
            exec(state["compiled"], g)
            owner = g["Solution"]() if "Solution" in g else None
            fn = getattr(owner, state["func_name"], None) if owner is not None else g.get(
                state["func_name"])
            if not callable(fn):
                sys.stderr.write(f"no Solution.{state['func_name']} (nor a function "
                                 f"{state['func_name']}) is defined\n")
                sys.stderr.flush()
                os._exit(EXIT_NOFUNC)
            args = [json.loads(line) for line in data.split("\n")]
            value = fn(*args)
            try:
                encoded = json.dumps({"value": freeze(value, True)})
            except Unequal as err:
                encoded = json.dumps({"unequal": str(err), "repr": repr(value)[:200]})
            with open(WORK + "/.result", "w") as f:
                f.write(encoded)
        sys.stdout.flush()
        code = 0
    except MemoryError:
        code = EXIT_MEMORY
    except OSError as err:
        code = EXIT_OUTPUT if err.errno == errno.EFBIG else EXIT_ERROR
        if code == EXIT_ERROR:
            traceback.print_exc()
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        code = EXIT_ERROR
    try:
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(code)


class Unequal(Exception):
    """A value no JSON-decoded expected output can equal (as in LiveCodeBench's ``==``)."""


def freeze(value, top=False):
    """A JSON value equal (after decoding) to what LiveCodeBench's ``==`` compares:
    a returned tuple becomes a list (only at the top, as it does); sets, nested tuples,
    dicts with non-string keys and objects can equal no JSON value."""
    if isinstance(value, tuple) and top:
        value = list(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [freeze(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: freeze(v) for k, v in value.items()}
    raise Unequal(type(value).__name__)


def wait_child(pid, timeout):
    """(status, seconds): ``None`` status when it ran past ``timeout``."""
    start = time.monotonic()
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            if fd is not None:
                if left > 0:
                    select.select([fd], [], [], left)
            elif left > 0:
                time.sleep(min(0.002, left))
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, time.monotonic() - start
            if left <= 0:
                return None, time.monotonic() - start
    finally:
        if fd is not None:
            os.close(fd)


def reap_all(state, pid):
    """Kill every process of the sandbox but us (and its init) and reap our children.

    ``kill(-1)`` only where we run in our own PID namespace (we are its process 1 or
    2): outside one it would reach every process of the user. Else the child's group."""
    if state.get("pidns") and os.getpid() <= 3:
        targets = (-1,)
    else:
        targets = (-pid,)
    for target in targets:
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    while True:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            return
        if pid == 0:
            return


def read_capped(path, cap):
    try:
        with open(path, "rb") as f:
            return f.read(cap).decode("utf-8", "replace")
    except OSError:
        return ""


def run_test(state, data):
    with open(WORK + "/.stdin", "w") as f:
        f.write(data if state["mode"] == "stdin" else "")
    for name in (".result",):
        try:
            os.unlink(WORK + "/" + name)
        except OSError:
            pass
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        run_child(state, data)
    status, seconds = wait_child(pid, state["limits"]["timeout"])
    reap_all(state, pid)
    limits = state["limits"]
    err = read_capped(WORK + "/.stderr", 4000)
    out = {"seconds": round(seconds, 4)}
    if status is None:
        out.update(status="time_limit", error=f"ran past {limits['timeout']:g} s")
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGXCPU, signal.SIGKILL) and seconds >= limits["timeout"] * 0.9:
            out.update(status="time_limit", error=f"CPU time past {limits['timeout']:g} s")
        else:
            out.update(status="runtime_error",
                       error=f"killed by signal {signal.Signals(sig).name}\n{err}")
    else:
        code = os.WEXITSTATUS(status)
        if code == EXIT_MEMORY:
            out.update(status="memory_limit",
                       error=f"MemoryError (limit {limits['memory_bytes'] >> 20} MiB)\n{err}")
        elif code == EXIT_OUTPUT:
            out.update(status="output_limit",
                       error=f"output past the limit of {limits['output_bytes'] >> 20} MiB")
        elif code == EXIT_NOFUNC:
            out.update(status="no_function", error=err)
        elif code != 0:
            status_name = "memory_limit" if "MemoryError" in err else "runtime_error"
            out.update(status=status_name, error=err or f"exit status {code}")
        else:
            out["status"] = "ok"
    if out["status"] == "ok":
        if state["mode"] == "stdin":
            out["stdout"] = read_capped(WORK + "/.stdout", limits["output_bytes"])
        else:
            out["result"] = read_capped(WORK + "/.result", limits["output_bytes"])
    else:
        out["stdout"] = read_capped(WORK + "/.stdout", 2000)
    return out


def main():
    # the protocol gets its own descriptors; 0 and 1 point nowhere useful
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)

    def send(obj):
        proto_out.write(json.dumps(obj) + "\n")
        proto_out.flush()

    setup = json.loads(proto_in.readline())
    sys.path.extend(p for p in setup.get("sys_path", []) if p not in sys.path)
    global WORK
    WORK = setup.get("work") or WORK
    try:
        if setup.get("root"):
            build_root(setup["root"])
        else:
            os.chdir(WORK)
        set_limits(setup["limits"])
        if setup.get("drop", True):
            drop_privileges(setup.get("uid") or 65534)
    except Exception as err:  # the host reports it: the sandbox is not safe to use
        send({"setup_error": f"{type(err).__name__}: {err}"})
        return
    state = dict(setup, prelude=compile(PRELUDE, "<prelude>", "exec"))
    try:
        state["compiled"] = compile(setup["code"], "solution.py", "exec")
    except (SyntaxError, ValueError) as err:
        where = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
        send({"compile_error": f"{type(err).__name__}: {getattr(err, 'msg', None) or err}"
                               f"{where}"})
        return
    exec(state["prelude"], {})  # import the prelude's modules once, before forking
    send({"ready": True, "uid": os.getuid(), "pid": os.getpid()})
    for line in proto_in:
        request = json.loads(line)
        if "input" not in request:
            break
        send(run_test(state, request["input"]))


if __name__ == "__main__":
    main()
