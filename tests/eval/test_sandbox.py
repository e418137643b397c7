"""The sandbox holds: every case runs a real program in a real sandbox (both backends
where this machine has them) and checks its verdict and that nothing got out."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid

import pytest

from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.code import sandbox as sb
from stepsal_lens.eval.code.judge import CodeTest, judge_code, judge_many
from stepsal_lens.eval.code.sandbox import Limits, SandboxProgram, detect_backend

FAST = Limits(timeout=2, memory_mb=512, output_mb=4, nproc=32, work_mb=16)


def _works(backend: str) -> bool:
    try:
        return detect_backend(backend) == backend
    except StepSalError:
        return False


@pytest.fixture(params=["bwrap", "unshare"], scope="module")
def backend(request):
    if not _works(request.param):
        if request.param == "bwrap" and os.environ.get("STEPSAL_REQUIRE_SANDBOX"):
            pytest.fail("bubblewrap does not work here but STEPSAL_REQUIRE_SANDBOX is set")
        pytest.skip(f"the {request.param} sandbox does not work on this machine")
    return request.param


def _sandbox_pids() -> list[int]:
    """Processes of a sandbox still alive: sandbox user ids, or the judge's script."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                status = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "State:\tZ" in status:
            continue
        uid = int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1])
        if 610000 <= uid < 614000 or "/judge/h.py" in cmd or "_harness.py" in cmd:
            found.append(int(entry.name))
    return found


def _no_sandbox_left():
    for _ in range(50):  # a killed namespace takes a moment to go
        left = _sandbox_pids()
        if not left:
            return
        time.sleep(0.05)
    pytest.fail(f"processes of a sandbox are still running: {left}")


def _judge(code, stdin="", expected="", backend="auto", limits=FAST):
    return judge_code(code, [CodeTest(stdin, expected)], limits=limits, backend=backend)


def test_a_plain_program_passes_and_leaves_nothing(backend):
    v = _judge("print(sum(map(int, input().split())))", "2 3\n", "5", backend)
    assert (v.verdict, v.sandbox) == ("passed", backend)
    _no_sandbox_left()


def test_writes_outside_its_folder_fail_and_leave_no_file(backend, tmp_path):
    marker = uuid.uuid4().hex
    targets = [tmp_path / f"escape-{marker}", f"/tmp/escape-{marker}",
               f"/var/tmp/escape-{marker}", f"/dev/shm/escape-{marker}"]
    for target in targets:
        v = _judge(f"open({str(target)!r}, 'w').write('x')\nprint('wrote')", backend=backend)
        assert v.verdict == "runtime_error", (target, v)
        assert not os.path.exists(target), target
    inside = _judge("open('/sandbox/a.txt', 'w').write('x')\nprint(open('a.txt').read())",
                    expected="x", backend=backend)
    assert inside.verdict == "passed", inside
    assert not any(marker in name for name in os.listdir("/tmp"))
    _no_sandbox_left()


def test_home_is_not_there(backend, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("TOP-SECRET-42")
    (home / "secret.txt").chmod(0o644)
    home.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("STEPSAL_TEST_SECRET", "TOP-SECRET-42")
    code = ("import os\nprint(os.environ.get('HOME'), 'STEPSAL_TEST_SECRET' in os.environ)\n"
            f"print(open({str(home / 'secret.txt')!r}).read())")
    v = _judge(code, expected="TOP-SECRET-42", backend=backend)
    assert v.verdict == "runtime_error" and "TOP-SECRET-42" not in v.excerpt, v
    assert "FileNotFoundError" in v.excerpt or "No such file" in v.excerpt, v
    env = _judge("import os\nprint(os.environ.get('HOME'), 'STEPSAL_TEST_SECRET' in os.environ)",
                 expected="/sandbox False", backend=backend)
    assert env.verdict == "passed", env  # a scrubbed environment
    _no_sandbox_left()


def test_no_network_not_even_localhost(backend):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                f"s.sendall(b'hello')\nprint('connected')")
        v = _judge(code, expected="connected", backend=backend)
        assert v.verdict == "runtime_error", v
        assert "Error" in v.excerpt, v
        time.sleep(0.3)
        assert accepted == [], "the sandboxed program reached a server on 127.0.0.1"
    finally:
        stop.set()
        thread.join()
        server.close()
        for conn in accepted:
            conn.close()
    _no_sandbox_left()


def test_fork_bomb_is_bounded(backend):
    code = "import os\nwhile True:\n    os.fork()\n"
    start = time.monotonic()
    v = _judge(code, backend=backend)
    assert v.verdict in ("runtime_error", "time_limit"), v
    assert time.monotonic() - start < 20
    _no_sandbox_left()


def test_memory_past_the_limit(backend):
    v = _judge("x = bytearray(8 * 1024 ** 3)\nprint(len(x))", expected="0", backend=backend)
    assert v.verdict == "memory_limit", v
    grow = _judge("a = []\nwhile True:\n    a.append(bytearray(50 * 1024 ** 2))",
                  backend=backend)
    assert grow.verdict == "memory_limit", grow
    _no_sandbox_left()


def test_sleeping_forever_is_a_time_limit_and_killed(backend):
    start = time.monotonic()
    v = _judge("import time\ntime.sleep(10 ** 6)", backend=backend)
    took = time.monotonic() - start
    assert (v.verdict, v.failed_test) == ("time_limit", 0), v
    assert took < FAST.timeout + 5, took
    busy = _judge("while True:\n    pass", backend=backend)
    assert busy.verdict == "time_limit", busy
    _no_sandbox_left()


def test_printing_a_gigabyte_is_capped(backend):
    code = ("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n"
            "    sys.stdout.write(chunk)\n")
    start = time.monotonic()
    v = _judge(code, expected="x", backend=backend)
    assert v.verdict == "runtime_error" and "output" in v.excerpt, v
    assert time.monotonic() - start < 20
    _no_sandbox_left()


def test_background_child_is_killed(backend, tmp_path):
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        while True:\n"
            "            time.sleep(0.05)\n"
            "    os._exit(0)\n"
            "print('done')\n")
    v = judge_code(code, [CodeTest("", "done"), CodeTest("", "done")], limits=FAST,
                   backend=backend)
    assert v.verdict == "passed", v
    _no_sandbox_left()


def test_two_programs_at_once_do_not_see_each_others_files(backend):
    writer = ("import time\nopen('/sandbox/mine.txt', 'w').write('A')\ntime.sleep(1.0)\n"
              "import os\nprint(os.path.exists('/sandbox/mine.txt'))")
    reader = ("import time, os\ntime.sleep(0.4)\n"
              "print(os.path.exists('/sandbox/mine.txt'), sorted(os.listdir('/sandbox')))")
    jobs = [{"code": writer, "tests": [CodeTest("", "True")]},
            {"code": reader, "tests": [CodeTest("", "False ['.stderr', '.stdin', '.stdout']")]}]
    a, b = judge_many(jobs, workers=2, limits=FAST, backend=backend, progress=False)
    assert (a.verdict, b.verdict) == ("passed", "passed"), (a, b)
    _no_sandbox_left()


def test_the_judges_pipe_is_out_of_reach(backend):
    code = ("import os\nfor fd in range(3, 20):\n    try:\n"
            "        os.write(fd, b'{\"status\": \"ok\", \"stdout\": \"42\"}\\n')\n"
            "    except OSError:\n        pass\n")
    v = _judge(code, expected="42", backend=backend)
    assert v.verdict == "wrong_answer", v  # nothing forged a passing reply
    _no_sandbox_left()


def test_no_sandbox_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(sb, "_PROBED", {})
    monkeypatch.setattr(sb.shutil, "which", lambda name: None)
    with pytest.raises(StepSalError, match="install bubblewrap.*--no-sandbox"):
        detect_backend("auto")
    with pytest.raises(StepSalError, match="unknown sandbox backend 'docker'"):
        detect_backend("docker")
    assert detect_backend("none") == "none"  # only by name


def test_limits_are_checked():
    with pytest.raises(StepSalError, match="Limits.timeout must be a positive number"):
        Limits(timeout=0)
    with pytest.raises(StepSalError, match="functional mode needs func_name"):
        SandboxProgram("pass", mode="functional")
    assert shutil.which("python3") or True
