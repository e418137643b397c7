"""Hostile model outputs grade within the time limit: every grading step (the answer's
extraction included) runs in the worker, which is stopped at the limit."""

from __future__ import annotations

import inspect
import time

import pytest

from stepsal_lens import StepSalError
from stepsal_lens.eval.grading import grade_output, judge

N = 32_000
HOSTILE = [
    ("a last line of dashes", "The answer is below.\n" + "-" * N, "math"),
    ("a last line of dashes (choice)", "-" * N, "choice"),
    ("an unclosed box of stars", "\\boxed{" + "*" * N, "math"),
    ("an unclosed box of stars (choice)", "\\boxed{" + "*" * N, "choice"),
    ("a marker then stars", "the answer is " + "*" * N, "choice"),
    ("a marker then spaces", "answer: 1" + " " * N + "m", "math"),
]


@pytest.mark.parametrize("what, output, kind", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_outputs_grade_within_the_limit(what, output, kind):
    grade_output("\\boxed{1}", "1")  # a warm worker: its start is not the answer's time
    t0 = time.monotonic()
    verdict = grade_output(output, "B" if kind == "choice" else "5", kind, timeout=2)
    took = time.monotonic() - t0
    assert took < 2 + 2, f"{what}: {took:.1f} s"
    assert not verdict.correct
    if verdict.status == "error":
        assert "time limit (2 s)" in verdict.error and "--timeout" in verdict.error
    # and grading goes on afterwards
    assert grade_output("So \\boxed{\\frac{1}{2}}.", "0.5").correct


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -1, True, "5", 1e9])
def test_bad_timeouts_are_refused(timeout):
    with pytest.raises(StepSalError, match="timeout must be a"):
        inspect.unwrap(grade_output)("\\boxed{2}", "2", timeout=timeout)
    with pytest.raises(StepSalError, match="timeout must be a"):
        inspect.unwrap(judge)("2", "2", timeout=timeout)


def test_wrong_argument_types_are_refused():
    with pytest.raises(StepSalError, match="output must be model text"):
        inspect.unwrap(grade_output)(["\\boxed{2}"], "2")
    with pytest.raises(StepSalError, match="answer must be the gold answer"):
        inspect.unwrap(grade_output)("\\boxed{2}", ["2"])
