"""The coding part of ``stepsal eval`` and ``stepsal grade``: settings, judging, records.

:mod:`stepsal_lens.eval.runs` calls three things from here (each marked "issue 21"
there): :func:`code_settings` once (it picks the sandbox, refusing before any work when
none works, and says what ``run.json`` records), :func:`judge_outputs` on each chunk of
generations, and :func:`~stepsal_lens.eval.code.passk.code_summary` for ``summary.json``.

Examples
--------
>>> from stepsal_lens.eval.code.judge import CodeTest
>>> from stepsal_lens.eval.code.run import grade_code_line
>>> row = {"output": "```python\\nprint(int(input()) + 1)\\n```", "kind": "code",
...        "tests": [{"input": "1", "output": "2", "testtype": "stdin"}]}
>>> out = grade_code_line(row)
>>> out["correct"], out["verdict"]
(True, 'passed')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.code.judge import CodeTest, CodeVerdict, judge_many
from stepsal_lens.eval.code.lcb import extract_code, parse_tests
from stepsal_lens.eval.code.sandbox import Limits, detect_backend, sandbox_info

__all__ = ["code_settings", "grade_code_line", "grade_code_lines", "judge_outputs",
           "verdict_fields"]


def code_settings(problems: Sequence[Any], *, sandbox: str = "auto",
                  limits: Limits | None = None) -> dict[str, Any] | None:
    """What ``run.json`` records for a run with coding problems (None without any):
    the sandbox that runs the programs, its limits and the judging rules.

    Raises :class:`~stepsal_lens.errors.StepSalError` (with the fix) when no sandbox
    works here and ``sandbox`` is not ``"none"``.
    """
    if not any(getattr(p, "kind", None) == "code" for p in problems):
        return None
    limits = limits or Limits()
    backend = detect_backend(sandbox)
    return {"sandbox": sandbox_info(backend, limits), "rules": "LiveCodeBench (testing_util.py)",
            "extraction": "last fenced code block of the summary"}


def verdict_fields(v: CodeVerdict, code: str | None) -> dict[str, Any]:
    """The fields a judged record carries."""
    return {"code": code, "correct": v.passed, "verdict": v.verdict,
            "failed_test": v.failed_test, "verdict_excerpt": v.excerpt,
            "test_results": v.tests, "n_tests": v.n_tests, "sandbox": v.sandbox}


def judge_outputs(items: Sequence[tuple[Any, str | None]], settings: dict[str, Any], *,
                  workers: int = 1) -> list[dict[str, Any] | None]:
    """Judge ``(problem, summary text)`` pairs: the record fields of each coding problem
    (None for the others), ``workers`` programs at a time."""
    sb = settings["sandbox"]
    limits = Limits(**sb["limits"])
    jobs, where = [], []
    for i, (p, summary) in enumerate(items):
        if getattr(p, "kind", None) != "code":
            continue
        code = extract_code(summary)
        jobs.append({"code": code, "tests": list(p.tests), "func_name": p.func_name})
        where.append(i)
    out: list[dict[str, Any] | None] = [None] * len(items)
    if not jobs:
        return out
    verdicts = judge_many(jobs, workers=workers, limits=limits, backend=sb["backend"],
                          progress=False)
    for i, job, v in zip(where, jobs, verdicts):
        p = items[i][0]
        out[i] = {**verdict_fields(v, job["code"]), "platform": p.platform,
                  "difficulty": p.difficulty}
    return out


def line_tests(row: dict[str, Any], where: str) -> list[CodeTest]:
    tests = row.get("tests")
    if not isinstance(tests, list) or not tests:
        raise StepSalError(f"{where}: a code line needs 'tests': a list of {{\"input\", "
                           f"\"output\", \"testtype\"}} (keys: {sorted(row)})")
    out = parse_tests(tests, where)
    if {t.testtype for t in out} == {"functional"} and not row.get("func_name"):
        raise StepSalError(f"{where}: functional tests need 'func_name' (the Solution method)")
    return out


def grade_code_lines(rows: Sequence[dict[str, Any]], *, workers: int = 1,
                     limits: Limits | None = None, sandbox: str = "auto",
                     wheres: Sequence[str] | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """``stepsal grade`` on code lines (``{"output", "kind": "code", "tests", "func_name"}``):
    each line plus ``prediction`` (the extracted code), ``correct``, ``verdict``,
    ``failed_test``, ``verdict_excerpt``, ``test_results``."""
    wheres = list(wheres) if wheres is not None else [f"line {i + 1}" for i in range(len(rows))]
    jobs = [{"code": extract_code(r.get("output")), "tests": line_tests(r, w),
             "func_name": r.get("func_name")} for r, w in zip(rows, wheres)]
    verdicts = judge_many(jobs, workers=workers, limits=limits, backend=sandbox,
                          progress=progress)
    out = []
    for r, job, v in zip(rows, jobs, verdicts):
        fields = verdict_fields(v, job["code"])
        fields["prediction"] = fields.pop("code")
        out.append({**r, **fields})
    return out


def grade_code_line(row: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """:func:`grade_code_lines` on one line."""
    return grade_code_lines([row], progress=False, **kwargs)[0]
