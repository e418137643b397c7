"""Judge a program on its tests with LiveCodeBench's rules, in a sandbox, to one verdict.

Rules (LiveCodeBench's ``lcb_runner/evaluation/testing_util.py``, read 2026-12-05):

* **stdin tests**: the program reads the input on stdin; its output and the expected
  output are each stripped, split on ``"\\n"`` and every line stripped; the line counts
  must agree, and each pair of lines must be equal, or else both must be lists of
  numbers (split on whitespace, read as :class:`decimal.Decimal`) that are equal
  (``1.0`` = ``1`` = ``1.00``, ``1e3`` = ``1000``; ``0.333`` is not ``0.3333``: there is
  no tolerance). The program runs as ``__main__`` (so ``if __name__ == "__main__":``
  runs); ``exit()`` ends it normally.
* **functional tests**: each line of the input is one JSON-decoded argument;
  ``Solution().func_name(*args)`` is called (a module-level function when there is no
  ``Solution`` class) and its value must ``==`` the JSON-decoded expected output; a
  returned tuple counts as a list (only at the top level, as there); a set, a nested
  tuple or an object equals no JSON value.
* both: LiveCodeBench's ``import_string`` prelude (``from collections import *`` ...,
  ``sys.setrecursionlimit(50000)``) comes first; tests run in order and judging stops at
  the first failure; each test may take ``timeout`` seconds (6 by default) of wall time
  and ``timeout + 1`` of CPU time; the whole program ``(timeout + 1) * tests + 5``.

Verdicts (one per program, with the index of the failing test and a short excerpt):

========================  ===============================================================
``passed``                every test passed
``wrong_answer``          a test's output (or returned value) is not the expected one
``runtime_error``         the program raised, was killed by a signal, or wrote past the
                          output limit
``time_limit``            a test ran past its wall or CPU time limit (or the program past
                          its total)
``memory_limit``          the program ran out of its memory (``MemoryError`` under
                          ``RLIMIT_AS``)
``no_code``               the answer holds no code block
``compile_error``         the code does not compile (``SyntaxError``), or a functional
                          program defines no ``Solution.func_name`` (LiveCodeBench counts
                          both as runtime errors)
========================  ===============================================================

Examples
--------
>>> from stepsal_lens.eval.code.judge import CodeTest, judge_code
>>> tests = [CodeTest("1 2\\n", "3\\n"), CodeTest("5 5\\n", "10")]
>>> judge_code("a, b = map(int, input().split())\\nprint(a + b)", tests).verdict
'passed'
>>> v = judge_code("print(0)", tests)
>>> v.verdict, v.failed_test
('wrong_answer', 0)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.code.sandbox import Limits, SandboxProgram

__all__ = ["CodeVerdict", "CodeTest", "VERDICTS", "compare_functional", "compare_stdout",
           "judge_code", "judge_many"]

#: Every verdict, best first.
VERDICTS = ("passed", "wrong_answer", "runtime_error", "time_limit", "memory_limit",
            "no_code", "compile_error")

_EXCERPT = 200


@dataclass(frozen=True)
class CodeTest:
    """One test: ``input`` (stdin text, or one JSON argument a line), expected ``output``
    (stdout text, or the JSON of the returned value) and ``testtype``."""

    input: str
    output: str
    testtype: str = "stdin"

    def __post_init__(self) -> None:
        if self.testtype not in ("stdin", "functional"):
            raise StepSalError(f"testtype must be 'stdin' or 'functional'; got {self.testtype!r}")
        if not isinstance(self.input, str) or not isinstance(self.output, str):
            raise StepSalError(f"a test's input and output must be strings (JSON text for "
                               f"functional tests); got {type(self.input).__name__} and "
                               f"{type(self.output).__name__}")


@dataclass(frozen=True)
class CodeVerdict:
    """The judgement of one program: ``verdict`` (one of :data:`VERDICTS`), ``passed``,
    ``failed_test`` (index of the first failing test; None if passed or no test ran),
    ``excerpt`` (a short message), ``tests`` (per test run: index, status, seconds),
    ``n_tests`` and ``sandbox`` (the backend that ran it)."""

    verdict: str
    failed_test: int | None = None
    excerpt: str = ""
    tests: list[dict[str, Any]] = field(default_factory=list)
    n_tests: int = 0
    sandbox: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out


def _short(text: Any, n: int = _EXCERPT) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n // 2] + " ... " + text[-n // 2:]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(x) for x in line.split()]
    except (InvalidOperation, ValueError):
        return None


def compare_stdout(output: str, expected: str) -> tuple[bool, str]:
    """LiveCodeBench's stdin rule: (equal, why not).

    Examples
    --------
    >>> from stepsal_lens.eval.code.judge import compare_stdout
    >>> compare_stdout("3 \\n4\\n\\n", "3\\n4")[0], compare_stdout("1.50", "1.5")[0]
    (True, True)
    >>> compare_stdout("0.333", "0.3333")
    (False, "line 1: got '0.333', expected '0.3333'")
    """
    got, want = _lines(output), _lines(expected)
    if len(got) != len(want):
        return False, f"got {len(got)} lines, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a == b:
            continue
        da, db = _decimals(a), _decimals(b)
        try:
            same = da is not None and db is not None and da == db
        except InvalidOperation:  # a signalling NaN
            same = False
        if not same:
            return False, f"line {i + 1}: got {_short(a, 60)!r}, expected {_short(b, 60)!r}"
    return True, ""


def compare_functional(result: str, expected: str) -> tuple[bool, str]:
    """LiveCodeBench's functional rule on the judge's JSON ``result`` (``{"value": v}``
    or ``{"unequal": type}``) and the expected output's JSON text: (equal, why not).

    Examples
    --------
    >>> from stepsal_lens.eval.code.judge import compare_functional
    >>> compare_functional('{"value": [1, 2]}', "[1, 2]"), compare_functional('{"value": true}', "1")
    ((True, ''), (True, ''))
    >>> compare_functional('{"unequal": "set"}', "[1]")[0]
    False
    """
    try:
        gold = json.loads(expected)
    except ValueError:
        raise StepSalError(f"a functional test's expected output is not JSON: "
                           f"{_short(expected, 80)!r}; fix the problem file") from None
    try:
        got = json.loads(result)
    except ValueError:
        return False, f"the returned value could not be read ({_short(result, 60)!r})"
    if "unequal" in got:
        return False, (f"returned a {got['unequal']} ({_short(got.get('repr', ''), 60)}), "
                       f"which equals no JSON value; expected {_short(expected, 60)}")
    if got.get("value") == gold:
        return True, ""
    return False, (f"returned {_short(json.dumps(got.get('value')), 60)}, expected "
                   f"{_short(expected, 60)}")


_STATUS_VERDICT = {"runtime_error": "runtime_error", "time_limit": "time_limit",
                   "memory_limit": "memory_limit", "output_limit": "runtime_error",
                   "no_function": "compile_error"}


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)\b.*$")


def _last_line(text: str) -> str:
    """The exception line of a traceback (the last one: programs that fork interleave
    theirs), else the last line."""
    lines = [x.strip() for x in str(text or "").strip().splitlines() if x.strip()]
    errors = [x for x in lines if _EXC_LINE.match(x)]
    return errors[-1] if errors else lines[-1] if lines else ""


def judge_code(code: str | None, tests: Sequence[CodeTest], *, func_name: str | None = None,
               limits: Limits | None = None, backend: str = "auto") -> CodeVerdict:
    """Judge one program on ``tests`` in its own sandbox.

    Parameters
    ----------
    code
        The program (None or blank: verdict ``no_code``).
    tests
        :class:`CodeTest` s, all of one ``testtype``.
    func_name
        The method functional tests call (``Solution().func_name``).
    limits
        :class:`~stepsal_lens.eval.code.sandbox.Limits` (LiveCodeBench's 6 s a test).
    backend
        Sandbox backend (see :func:`~stepsal_lens.eval.code.sandbox.detect_backend`).

    Returns
    -------
    CodeVerdict
    """
    limits = limits or Limits()
    tests = list(tests)
    if not tests:
        raise StepSalError("a coding problem needs at least one test; check its "
                           "public_test_cases / private_test_cases (or tests)")
    modes = {t.testtype for t in tests}
    if len(modes) > 1:
        raise StepSalError(f"a problem's tests mix testtypes {sorted(modes)}; give every "
                           f"test of a problem the same testtype")
    mode = modes.pop()
    if mode == "functional" and not func_name:
        raise StepSalError("functional tests need func_name (LiveCodeBench's "
                           "metadata.func_name): the Solution method to call")
    if code is None or not code.strip():
        return CodeVerdict("no_code", None, "the answer holds no code block", [], len(tests))
    results: list[dict[str, Any]] = []
    with SandboxProgram(code, mode=mode, func_name=func_name, limits=limits,
                        backend=backend) as prog:
        if prog.compile_error is not None:
            return CodeVerdict("compile_error", None, _short(_last_line(prog.compile_error)),
                               [], len(tests), prog.backend_used)
        deadline = time.monotonic() + (limits.timeout + 1) * len(tests) + 5
        for i, test in enumerate(tests):
            reply = prog.run(test.input, deadline=deadline)
            status = reply.get("status")
            row = {"index": i, "status": status, "seconds": reply.get("seconds")}
            if status == "ok":
                if mode == "stdin":
                    same, why = compare_stdout(reply.get("stdout", ""), test.output)
                else:
                    same, why = compare_functional(reply.get("result", ""), test.output)
                row["status"] = "passed" if same else "wrong_answer"
                results.append(row)
                if not same:
                    return CodeVerdict("wrong_answer", i, _short(f"test {i}: {why}"), results,
                                       len(tests), prog.backend_used)
                continue
            verdict = _STATUS_VERDICT.get(status, "runtime_error")
            row["status"] = verdict
            results.append(row)
            error = reply.get("error") or ""
            detail = error if status in ("time_limit", "output_limit") else (
                _last_line(error) or error)
            if status == "memory_limit":
                detail = error.splitlines()[0] if error else "out of memory"
            return CodeVerdict(verdict, i, _short(f"test {i}: {detail}"), results, len(tests),
                               prog.backend_used)
        return CodeVerdict("passed", None, "", results, len(tests), prog.backend_used)


def judge_many(jobs: Sequence[dict[str, Any]], *, workers: int = 1, limits: Limits | None = None,
               backend: str = "auto", progress: bool = True) -> list[CodeVerdict]:
    """Judge several programs, ``workers`` at a time (each in its own sandbox).

    Parameters
    ----------
    jobs
        Dicts with ``code``, ``tests`` and optional ``func_name`` (as :func:`judge_code`).
    workers
        Programs judged at once (``stepsal eval --code-workers``).

    Returns
    -------
    list of CodeVerdict, in the order of ``jobs``.

    Examples
    --------
    >>> from stepsal_lens.eval.code.judge import CodeTest, judge_many
    >>> jobs = [{"code": "print(1)", "tests": [CodeTest("", "1")]}, {"code": None,
    ...          "tests": [CodeTest("", "1")]}]
    >>> [v.verdict for v in judge_many(jobs, workers=2, progress=False)]
    ['passed', 'no_code']
    """
    from tqdm.auto import tqdm

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise StepSalError(f"workers must be a whole number >= 1; got {workers!r}")
    from stepsal_lens.eval.code.sandbox import detect_backend

    backend = detect_backend(backend)  # refuse before any work when there is no sandbox

    def one(job: dict[str, Any]) -> CodeVerdict:
        return judge_code(job.get("code"), job["tests"], func_name=job.get("func_name"),
                          limits=limits, backend=backend)

    bar = tqdm(total=len(jobs), desc="judging", unit="program", disable=not progress)
    try:
        if workers == 1:
            out = []
            for job in jobs:
                out.append(one(job))
                bar.update(1)
            return out
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one, job) for job in jobs]
            out = []
            for f in futures:
                out.append(f.result())
                bar.update(1)
            return out
    finally:
        bar.close()
