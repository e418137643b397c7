"""Run one untrusted program in its own sandbox: no network, a fresh empty folder, limits.

Every program (one model answer) runs in its own sandboxed process tree:

* its own network namespace (only a loopback device that is down: no connection to
  anything, the machine's ``127.0.0.1`` included), PID, IPC and UTS namespaces;
* a filesystem of read-only binds of the system and Python folders only: ``$HOME``,
  ``/tmp``, the project and every other folder are not there; its working folder
  ``/sandbox`` is a fresh, empty, size-capped ``tmpfs`` of its own that vanishes with it,
  so two programs never see each other's files;
* an unprivileged user (real root hands the sandbox to a user id of its own; elsewhere
  every capability is dropped), no new privileges;
* limits on memory (``RLIMIT_AS``), output and file size (``RLIMIT_FSIZE``), processes
  (``RLIMIT_NPROC``), CPU time (``RLIMIT_CPU``, per test) and wall time (per test, in the
  sandbox; and for the whole program, outside it), a scrubbed environment;
* after every test and at the end, every process of the sandbox is killed (a PID
  namespace dies with its first process).

Two backends build it: ``bwrap`` (Debian's ``bubblewrap``, preferred) and ``unshare``
(util-linux ``unshare`` plus a private root that the judge builds from read-only binds
and ``chroot``\\ s into). ``backend="auto"`` takes the first that works on this machine and
refuses, naming the fix, when neither does. ``"none"`` runs the judge unsandboxed (the
limits only); it must be asked for by name (``stepsal eval --no-sandbox``) and is recorded.

The judge itself (:mod:`stepsal_lens.eval.code._harness`) runs inside and talks to this
process over a pipe; programs never see that pipe, and the expected outputs never enter
the sandbox.

Examples
--------
>>> from stepsal_lens.eval.code.sandbox import Limits, SandboxProgram
>>> with SandboxProgram("print(int(input()) * 2)", limits=Limits(timeout=5)) as prog:
...     prog.run("21")["stdout"]
'42\\n'
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stepsal_lens.errors import StepSalError

__all__ = ["BACKENDS", "Limits", "SandboxProgram", "detect_backend", "sandbox_info"]

#: The sandbox backends, most preferred first ("none" only when asked for by name).
BACKENDS = ("bwrap", "unshare", "none")

_HARNESS = Path(__file__).with_name("_harness.py")
_NO_SANDBOX_FIX = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) on a kernel that allows "
    "user namespaces, or run as root where `unshare` works; to run model code WITHOUT a "
    "sandbox at your own risk, pass backend='none' (stepsal eval --no-sandbox)")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed program.

    Parameters
    ----------
    timeout
        Wall seconds per test (LiveCodeBench's default: 6); CPU seconds per test are
        ``timeout + 1``. The whole program gets ``(timeout + 1) * tests + 5`` seconds,
        LiveCodeBench's global limit.
    memory_mb
        Address space per process (``RLIMIT_AS``), MiB.
    output_mb
        Largest file (``RLIMIT_FSIZE``), so also the largest output of one test, MiB.
    nproc
        Processes and threads of the sandbox's user (``RLIMIT_NPROC``), beyond those the
        user already runs.
    work_mb
        Size of the program's working folder (a ``tmpfs``), MiB.
    """

    timeout: float | int = 6.0
    memory_mb: int = 4096
    output_mb: int = 32
    nproc: int = 64
    work_mb: int = 128

    def __post_init__(self) -> None:
        for name in ("timeout", "memory_mb", "output_mb", "nproc", "work_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise StepSalError(f"Limits.{name} must be a positive number; got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_PROBED: dict[str, str | None] = {}  # backend -> None (works) or why not; a per-process cache
_PROBE_LOCK = threading.Lock()


def _is_root() -> bool:
    return os.geteuid() == 0


def _python() -> str:
    return sys.executable


def _ro_paths() -> list[str]:
    """Host paths the sandbox sees read-only: the system and this Python."""
    paths = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
             "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
             "/etc/alternatives"]
    real = os.path.realpath(_python())
    for p in (sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(real)):
        p = os.path.realpath(p)
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in paths):
            paths.append(p)
    return [p for p in paths if os.path.lexists(p)]


def _site_paths() -> list[str]:
    import sysconfig

    paths = sysconfig.get_paths()
    return list(dict.fromkeys(p for p in (paths.get("purelib"), paths.get("platlib")) if p))


def _bwrap_argv(limits: Limits) -> list[str]:
    argv = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv"]
    if not _is_root():
        argv.append("--unshare-user")
    for k, v in _env("/sandbox").items():
        argv += ["--setenv", k, v]
    made: set[str] = set()
    for path in _ro_paths():
        parent = os.path.dirname(path)
        chain = []
        while parent not in ("/", "") and parent not in made:
            chain.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(chain):  # 0755 parents, so the dropped user can walk to Python
            argv += ["--perms", "0755", "--dir", d]
            made.add(d)
        target = path
        if os.path.islink(path) and not path.startswith(("/usr", "/etc")):
            argv += ["--symlink", os.readlink(path), path]  # /bin -> usr/bin (merged /usr)
        else:
            argv += ["--ro-bind", path, target]
        made.add(path)
    argv += ["--perms", "0755", "--dir", "/judge", "--ro-bind", str(_HARNESS), "/judge/h.py",
             "--proc", "/proc", "--dev", "/dev",
             "--perms", "0777", "--size", str(limits.work_mb << 20), "--tmpfs", "/sandbox",
             "--chdir", "/sandbox", "--cap-drop", "ALL"]
    if _is_root():
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return argv + [_python(), "-I", "-S", "-B", "/judge/h.py"]


def _env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONIOENCODING": "utf-8"}


def _unshare_argv() -> list[str]:
    argv = ["unshare", "--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child"]
    if not _is_root():
        argv.append("--map-root-user")
    return argv + [_python(), "-I", "-S", "-B", str(_HARNESS)]


def _user_processes(uid: int) -> int:
    """How many processes (threads count too) user ``uid`` runs now, from /proc."""
    n = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                status = f.read()
        except OSError:
            continue
        uid_line = next((x for x in status.splitlines() if x.startswith("Uid:")), "")
        thr_line = next((x for x in status.splitlines() if x.startswith("Threads:")), "")
        if uid_line.split()[1:2] == [str(uid)]:
            n += int(thr_line.split()[1]) if thr_line else 1
    return n


def _probe(backend: str) -> str | None:
    """None when ``backend`` runs a sandboxed program here, else why not (cached)."""
    with _PROBE_LOCK:
        if backend not in _PROBED:
            reason = None
            tool = {"bwrap": "bwrap", "unshare": "unshare"}.get(backend)
            if tool and shutil.which(tool) is None:
                reason = f"`{tool}` is not installed"
            else:
                try:
                    with SandboxProgram("print(6 * 7)", backend=backend, _probing=True,
                                        limits=Limits(timeout=20, memory_mb=1024)) as prog:
                        got = prog.run("")
                    if got.get("stdout") != "42\n":
                        reason = f"a test program gave {got!r}"
                except StepSalError as err:
                    reason = str(err)
            _PROBED[backend] = reason
        return _PROBED[backend]


def detect_backend(backend: str = "auto") -> str:
    """The sandbox backend to use: ``backend`` itself once checked to work here, or for
    ``"auto"`` the first of ``bwrap``, ``unshare`` that works.

    Raises :class:`~stepsal_lens.errors.StepSalError` naming the fix when none works
    (never falls back to running unsandboxed).

    Examples
    --------
    >>> from stepsal_lens.eval.code.sandbox import detect_backend
    >>> detect_backend() in ("bwrap", "unshare")
    True
    """
    if backend not in ("auto",) + BACKENDS:
        raise StepSalError(f"unknown sandbox backend {backend!r}; use 'auto', 'bwrap', "
                           f"'unshare' or 'none' (no sandbox)")
    if backend == "none":
        return "none"
    tried = {}
    for name in (("bwrap", "unshare") if backend == "auto" else (backend,)):
        why = _probe(name)
        if why is None:
            return name
        tried[name] = why
    raise StepSalError(f"no sandbox works on this machine ({'; '.join(f'{k}: {v}' for k, v in tried.items())}); "
                       f"{_NO_SANDBOX_FIX}")


def sandbox_info(backend: str, limits: Limits | None = None) -> dict[str, Any]:
    """What ``run.json`` records about the sandbox that ran the programs.

    Examples
    --------
    >>> from stepsal_lens.eval.code.sandbox import sandbox_info
    >>> sandbox_info("none")["isolation"]
    'none: programs ran unsandboxed (asked for with --no-sandbox); limits only'
    """
    version = None
    tool = {"bwrap": "bwrap", "unshare": "unshare"}.get(backend)
    if tool and shutil.which(tool):
        try:
            out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10)
            version = (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            version = None
    isolation = {
        "bwrap": "bubblewrap: own network, PID, IPC, UTS namespaces; read-only system and "
                 "Python binds only; private tmpfs working folder; unprivileged user; rlimits",
        "unshare": "unshare + chroot: own network, PID, mount, IPC, UTS namespaces; private "
                   "root of read-only system and Python binds; private tmpfs working folder; "
                   "unprivileged user; rlimits",
        "none": "none: programs ran unsandboxed (asked for with --no-sandbox); limits only",
    }[backend]
    info: dict[str, Any] = {"backend": backend, "version": version, "isolation": isolation,
                            "user": "root -> own uid" if _is_root() else "caller, no capabilities"}
    if limits is not None:
        info["limits"] = limits.to_dict()
    return info


_UID_LOCK = threading.Lock()
_NEXT_UID = [random.Random(os.getpid()).randrange(1000)]


def _sandbox_uid() -> int:
    """A user id of its own for each sandbox run by root (so RLIMIT_NPROC is its own)."""
    with _UID_LOCK:
        _NEXT_UID[0] = (_NEXT_UID[0] + 1) % 4000
        return 610000 + _NEXT_UID[0]


@dataclass
class SandboxProgram:
    """One program in its own sandbox, run on test inputs one at a time.

    A context manager: entering starts the sandbox and compiles the program (``ready``,
    or ``compile_error`` holding the message); :meth:`run` runs it on one input; leaving
    kills the sandbox and everything in it.

    Parameters
    ----------
    code
        Python source of the program.
    mode
        ``"stdin"`` (the input on stdin, the output read from stdout) or ``"functional"``
        (``Solution().func_name(*json-decoded input lines)``; the result as JSON).
    func_name
        The method to call in functional mode.
    limits
        :class:`Limits`.
    backend
        ``"auto"``, ``"bwrap"``, ``"unshare"`` or ``"none"`` (unsandboxed: only by name).

    Examples
    --------
    >>> from stepsal_lens.eval.code.sandbox import SandboxProgram
    >>> code = "class Solution:\\n    def add(self, a, b):\\n        return a + b\\n"
    >>> with SandboxProgram(code, mode="functional", func_name="add") as prog:
    ...     prog.run("1\\n2")["result"]
    '{"value": 3}'
    """

    code: str
    mode: str = "stdin"
    func_name: str | None = None
    limits: Limits = field(default_factory=Limits)
    backend: str = "auto"
    _probing: bool = False
    compile_error: str | None = field(default=None, init=False)
    backend_used: str = field(default="", init=False)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _buffer: bytes = field(default=b"", init=False, repr=False)
    _temp: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("stdin", "functional"):
            raise StepSalError(f"mode must be 'stdin' or 'functional'; got {self.mode!r}")
        if self.mode == "functional" and not self.func_name:
            raise StepSalError("functional mode needs func_name (the Solution method to call)")
        if not isinstance(self.limits, Limits):
            raise StepSalError(f"limits must be a Limits; got {self.limits!r}")

    # ---- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> "SandboxProgram":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Start the sandbox and compile; sets ``compile_error`` when the code does not."""
        backend = self.backend if self._probing else detect_backend(self.backend)
        self.backend_used = backend
        limits = self.limits
        setup: dict[str, Any] = {
            "code": self.code, "mode": self.mode, "func_name": self.func_name,
            "limits": {"timeout": float(limits.timeout),
                       "memory_bytes": int(limits.memory_mb) << 20,
                       "output_bytes": int(limits.output_mb) << 20},
            "pidns": backend != "none", "drop": backend != "none",
            # site-packages without running site (its .pth hooks cost ~25 ms a start)
            "sys_path": _site_paths()}
        uid = _sandbox_uid() if _is_root() else os.getuid()
        setup["uid"] = uid
        # the user's processes count against RLIMIT_NPROC: a sandbox uid of its own runs
        # none yet; the caller's own uid (not root) runs some already
        base = 0 if backend == "none" or _is_root() else _user_processes(uid)
        setup["limits"]["nproc"] = base + int(limits.nproc) + 4
        env = _env("/sandbox")
        if backend == "bwrap":
            argv = _bwrap_argv(limits)
        elif backend == "unshare":
            argv = _unshare_argv()
            staging = tempfile.mkdtemp(prefix="stepsal-root-")
            os.chmod(staging, 0o755)
            self._temp.append(staging)
            setup["root"] = {"staging": staging, "ro": _ro_paths(),
                             "work_bytes": int(limits.work_mb) << 20}
        else:
            work = tempfile.mkdtemp(prefix="stepsal-code-")
            self._temp.append(work)
            setup["work"] = work
            env = _env(work)
            argv = [_python(), "-I", "-S", "-B", str(_HARNESS)]
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=env,
                                          start_new_session=True, cwd="/")
        except OSError as err:
            self.close()
            raise StepSalError(f"cannot start the {backend} sandbox ({err}); "
                               f"{_NO_SANDBOX_FIX}") from None
        reply = self._ask(setup, time.monotonic() + 60)
        if reply is None or "setup_error" in reply:
            why = reply["setup_error"] if reply else self._stderr_tail()
            self.close()
            raise StepSalError(f"the {backend} sandbox did not start ({why}); {_NO_SANDBOX_FIX}")
        if "compile_error" in reply:
            self.compile_error = reply["compile_error"]

    def run(self, data: str, *, deadline: float | None = None) -> dict[str, Any]:
        """Run the program on one test input.

        Returns the judge's answer: ``status`` (``ok``, ``runtime_error``,
        ``time_limit``, ``memory_limit``, ``output_limit``, ``no_function``), ``stdout``
        (stdin mode) or ``result`` (functional mode: ``{"value": ...}`` as JSON, or
        ``{"unequal": type}`` for a value no JSON equals), ``error`` and ``seconds``.
        """
        if self._proc is None:
            raise StepSalError("the sandbox is not running: use `with SandboxProgram(...)`")
        if self.compile_error is not None:
            raise StepSalError("the program did not compile; read .compile_error")
        if not isinstance(data, str):
            raise StepSalError(f"a test input must be a string; got {type(data).__name__}")
        limit = time.monotonic() + self.limits.timeout + 10
        reply = self._ask({"input": data}, min(limit, deadline) if deadline else limit)
        if reply is None:
            timed_out = deadline is not None and time.monotonic() >= deadline - 0.05
            why = self._stderr_tail()
            self.close()
            if timed_out:
                return {"status": "time_limit", "error": "the whole program ran past its "
                        "time limit", "seconds": None}
            return {"status": "runtime_error", "seconds": None,
                    "error": "the judge in the sandbox stopped answering" + (
                        f": {why}" if why else " (a program may have killed it)")}
        return reply

    def close(self) -> None:
        """Kill the sandbox and everything in it; remove its temporary folders."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for path in self._temp:
            shutil.rmtree(path, ignore_errors=True)
        self._temp.clear()

    # ---- the pipe -----------------------------------------------------------------------

    def _stderr_tail(self) -> str:
        proc = self._proc
        if proc is None or proc.stderr is None:
            return ""
        fd = proc.stderr.fileno()
        data = b""
        while select.select([fd], [], [], 0.05)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            if len(data) > 1 << 16:
                break
        return data.decode("utf-8", "replace").strip()[-500:]

    def _ask(self, message: dict[str, Any], deadline: float) -> dict[str, Any] | None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            return None
        try:
            proc.stdin.write((json.dumps(message) + "\n").encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        fd = proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return None
