"""The one grader, on the one answer parser (:mod:`stepsal_lens.segments.answers`).

Extraction (:func:`~stepsal_lens.segments.answers.find_answer`, :func:`extract_answer`) reads the final answer from
model text with balanced braces everywhere, so ``\\boxed{\\frac{1}{2}}`` gives
``\\frac{1}{2}`` and its character span (the ``answer`` saliency target maps that span to
tokens). Math answers, in order of trust: the last ``\\boxed{}`` / ``\\fbox{}``; the
last "final answer" / "the answer is" / "Answer:" (``**Final answer:** 204``); the last
formula or number of the last line. Multiple-choice letters (``kind="choice"``): a
boxed letter (``\\boxed{C}``, ``\\boxed{\\text{(D)}}``), the letter right after the last
"answer is" / "Answer:" / "correct option" (``**Answer: D**``; "the answer is A, not B"
gives A), a last line that is only a letter, else the last ``(X)``.

Grading (:func:`grade_output`, :func:`judge`, :func:`grade`) returns a :class:`Grade`
that tells *correct*, *wrong* and *error* apart. Choice answers compare letters. Math
answers are equal when any of these holds:

1. the same text after normalisation (LaTeX spacing, ``\\text{}``, ``\\dfrac``, units
   such as ``5\\text{ cm}``, ``1{,}000``, ``^\\circ``, ``\\%``, ``\\$``, ``x =``, case of
   words such as ``Yes`` / ``\\text{yes}``), or the same plain number;
2. Hugging Face's ``math-verify`` (``parse`` + ``verify``) says so, on the answers as
   written or normalised (fractions, radicals, ``\\pm``, sets, intervals, matrices of any
   bracket style, percentages, equations);
3. both are unbracketed lists or ``\\{...\\}`` sets whose elements match in some order.

The last boxed answer wins, unless the gold answer is a list: then all boxed answers of
the text are read together (``\\boxed{3}`` and ``\\boxed{5}`` for ``3, 5``).

All of grading - reading the answer out of the text, normalising it and every symbolic
comparison - runs in a child process with a hard time limit (math-verify's own
alarm-based limit works only in the main thread and cannot stop C code such as a huge
integer power, and no regular expression can be interrupted): a grading that overruns,
on a hostile text as on a hard comparison, is killed, the worker restarts, and the
:class:`Grade` carries the error instead of a silent "wrong" or a hang.

Examples
--------
>>> from stepsal_lens.eval.grading import extract_answer, grade_output
>>> extract_answer("So the answer is \\\\boxed{\\\\frac{1}{2}}.")
'\\\\frac{1}{2}'
>>> extract_answer("**Answer: D** (the answer is D, not B)", kind="choice")
'D'
>>> g = grade_output("Each side is $\\\\boxed{5\\\\text{ cm}}$.", "5")
>>> g.prediction, g.correct, g.status
('5\\\\text{ cm}', True, 'correct')
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stepsal_lens._checks import check_timeout, check_type
from stepsal_lens.errors import StepSalError
from stepsal_lens.segments.answers import (KINDS, Answer, _check_kind, _closing, _split_top,
                                           find_answer, find_boxed)

__all__ = [
    "Answer",
    "Grade",
    "KINDS",
    "extract_answer",
    "find_answer",
    "find_boxed",
    "grade",
    "grade_output",
    "judge",
]

#: Seconds one grading may spend on symbolic comparisons before it is killed.
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Grade:
    """The outcome of grading one output.

    ``correct`` is False when ``error`` is set: the grader could not decide (a symbolic
    comparison ran past its time limit, or the worker died), which is not the same as a
    wrong answer. ``method`` names the rule that decided (``"string"``, ``"number"``,
    ``"letter"``, ``"math-verify"``, ``"normalised"``, ``"unordered"``, ``"no answer"``,
    ``"different"``).
    """

    prediction: str | None
    correct: bool
    error: str | None = None
    method: str = ""

    @property
    def status(self) -> str:
        """``"correct"``, ``"wrong"`` or ``"error"``."""
        return "error" if self.error else "correct" if self.correct else "wrong"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- extraction ---------------------------------------------------------------------------


def _is_list(answer: str) -> bool:
    """A gold answer that lists several values (``3, 5``; ``\\{1, 2\\}``), not a tuple."""
    s = _normal(answer)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        return False
    s = answer.strip().strip("$").strip()
    if s.startswith("\\{") and s.endswith("\\}"):
        return True
    if s[:1] in "([" and s[-1:] in ")]":
        return False
    return len([p for p in _split_top(s) if p]) >= 2


def extract_answer(text: str | None, kind: str = "math", *,
                   gold: str | None = None) -> str | None:
    """The final answer in ``text`` as a string (see :func:`find_answer`), or None.

    With a ``gold`` answer that is a list of ``n`` values, the last ``n`` distinct boxed
    answers are read together, in order, as one list.

    Examples
    --------
    >>> from stepsal_lens.eval.grading import extract_answer
    >>> extract_answer("First \\\\boxed{3}, no wait: \\\\boxed{4}.")
    '4'
    >>> extract_answer("$x = \\\\boxed{3}$ or $x = \\\\boxed{5}$", gold="3, 5")
    '3, 5'
    """
    found = find_answer(text, kind)
    if found is None:
        return None
    if kind == "math" and found.style == "boxed" and gold is not None and _is_list(str(gold)):
        boxed: list[str] = []
        for a in find_boxed(text):
            if a.text not in boxed:
                boxed.append(a.text)
        boxed = boxed[-len(_split_top(str(gold).strip().strip("$"))):]  # the last n of them
        if len(boxed) > 1:
            return ", ".join(boxed)
    return found.text


# ---- normalisation (pure string work, no sympy) -------------------------------------------

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname|"
                       r"textnormal)\s*\{")
_UNIT_WORDS = (  # units of two letters or more; "in" only spelled out as "inches"
    r"(?:(?:sq(?:uare)?\.?|cubic)\s*)?(?:units?|cm|mm|km|inch(?:es)?|ft|feet|foot|yards?|"
    r"miles?|meters?|metres?|centimeters?|kilometers?|seconds?|secs?|minutes?|mins?|hours?|"
    r"hrs?|days?|weeks?|months?|years?|degrees?|radians?|dollars?|cents?|grams?|kg|"
    r"pounds?|lbs?|ounces?|oz|liters?|litres?|ml|gallons?|mph|kph|eV|MeV|GeV|keV|Hz|mol|nm|"
    r"Pa|atm)\b")
_UNIT_1 = r"(?:m|s|g|l|J|K|N|W|V|M)"  # one-letter units only after a space ("5 m", not "5m")
_UNIT_TAIL = re.compile(r"(?<=[\d}])(?:\s*(?:\\[,;:! ]|~)*\s*" + _UNIT_WORDS + r"|\s+" + _UNIT_1
                        + r")(?:\s*\^\s*\{?[23]\}?|²|³)?(?:\s*/\s*(?:" + _UNIT_WORDS + r"|"
                        + _UNIT_1 + r"))?\s*$")


def _unwrap_text(s: str) -> str:
    """``\\text{abc}`` -> ``abc`` (balanced braces, nested commands too)."""
    for _ in range(20):
        m = _TEXT_CMD.search(s)
        if not m:
            return s
        j = _closing(s, m.end() - 1)
        if j < 0:
            return s
        s = s[:m.start()] + s[m.end():j] + s[j + 1:]
    return s


def _clean(s: str) -> str:
    """LaTeX that math-verify reads, with what it stumbles on taken out."""
    s = s.strip().strip("$").strip()
    s = s.replace("{,}", "").replace("\\!", "").replace("\\$", "").replace("\\displaystyle", "")
    s = _unwrap_text(s)
    s = re.sub(r"\s+", " ", s).strip()
    s = _UNIT_TAIL.sub("", s).strip()
    s = re.sub(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)\s*=\s*(?=[^=]+$)", "", s)  # "x = 3" -> "3"
    s = re.sub(r"^\(([A-E])\)\s*(?=[^\s)])", "", s)  # AMC: "\textbf{(C) } 18" -> "18"
    return s.rstrip(".").strip()


def _normal(s: str) -> str:
    """A canonical string: equal strings mean equal answers."""
    s = _clean(s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\ ", ""), ("~", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("\\circ", ""),
                     ("°", ""), ("\\degree", ""), ("\\%", ""), ("%", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac"), ("$", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"([_^])\{(\w)\}", r"\1\2", s)  # x^{2} -> x^2
    s = re.sub(r"\\frac\{(\w)\}\{(\w)\}", r"\\frac\1\2", s)  # \frac{1}{2} -> \frac12
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[A-Za-z][A-Za-z .'-]*", s):
        s = s.lower()
    return s


def _number(s: str) -> float | None:
    """A plain decimal number (``1,000``, ``-3.50``), else None."""
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", s):
        return None
    return float(s) if len(s) < 300 else None


def _is_word(s: str) -> bool:
    return bool(re.fullmatch(r"[a-z][a-z .'-]{2,}", s))


# ---- the symbolic worker ------------------------------------------------------------------

class _Worker:
    """A child process running ``_mv_worker.py``; killed and restarted on overrun."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._pid = 0  # the process that started it (a fork gets its own)
        self._lock = threading.Lock()
        self._buffer = b""

    def _start(self, deadline: float) -> None:
        script = Path(__file__).with_name("_mv_worker.py")
        # run by path, with no folder of ours on sys.path (stepsal_lens/typing.py would
        # shadow the standard library's typing)
        boot = ("import runpy, sys; sys.path.pop(0); "
                "runpy.run_path(sys.argv[1], run_name='__main__')")
        self._proc = subprocess.Popen([sys.executable, "-u", "-c", boot, str(script)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL)
        self._pid, self._buffer = os.getpid(), b""
        if self._read(deadline) is None:
            self._stop()
            raise StepSalError("the math-verify worker did not start; check that the package "
                               "math-verify is installed (pip install math-verify)")

    def _pipe(self, name: str):
        """The worker's stdin or stdout; the worker is started before either is used."""
        pipe = getattr(self._proc, name, None)
        if pipe is None:
            raise RuntimeError(f"the math-verify worker has no {name}: it was not started")
        return pipe

    def _read(self, deadline: float) -> dict | None:
        import select

        fd = self._pipe("stdout").fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker died
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._pid == os.getpid():
                self._stop()

    def compare(self, pairs: list[tuple[str, str]], timeout: float | int) -> list[str]:
        """Verdicts for (gold, prediction) pairs; all ``"killed"`` when killed."""
        op = max(1, int(timeout / 3))
        reply = self.request({"pairs": pairs, "op_timeout": op}, timeout)
        return ["killed"] * len(pairs) if reply is None else reply["results"]

    def request(self, payload: dict[str, Any], timeout: float | int) -> dict | None:
        """The worker's reply to one request, or None when it ran past ``timeout`` seconds
        (then the worker is killed; the next request starts a fresh one)."""
        with self._lock:
            deadline = time.monotonic() + timeout
            if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                if self._proc is not None and self._pid == os.getpid():
                    self._stop()
                self._proc = None
                self._start(time.monotonic() + 60)  # a cold start is not the answer's fault
                deadline = time.monotonic() + timeout
            request = json.dumps(payload) + "\n"
            try:
                stdin = self._pipe("stdin")
                stdin.write(request.encode())
                stdin.flush()
                reply = self._read(deadline)
            except (BrokenPipeError, OSError):
                reply = None
            if reply is None:
                self._stop()
            return reply


_WORKER = _Worker()
atexit.register(_WORKER.close)


# ---- grading ------------------------------------------------------------------------------

def _letter_of(s: str) -> str | None:
    found = find_answer(s, "choice")
    return found.text if found else None


def _variants(s: str) -> list[str]:
    out = [s.strip().strip("$").strip()]
    c = _clean(s)
    if c and c not in out:
        out.append(c)
    return out


def _unordered(s: str) -> list[str] | None:
    s = _clean(s)
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2]
    elif s[:1] in "([" and s[-1:] in ")]":
        return None  # a tuple, point or interval: order matters
    parts = [p for p in _split_top(s) if p]
    return parts if len(parts) >= 2 else None


def _symbolic(prediction: str, answer: str, timeout: float | int, compare) -> Grade:
    deadline = time.monotonic() + timeout
    failures: list[str] = []

    def ask(pairs: list[tuple[str, str]]) -> list[str]:
        left = deadline - time.monotonic()
        if left <= 0:
            failures.append("timeout")
            return ["timeout"] * len(pairs)
        verdicts = compare(pairs, left)
        failures.extend(v for v in verdicts if v not in ("equal", "different"))
        return verdicts

    golds, preds = _variants(answer), _variants(prediction)
    first = ask([(golds[0], preds[0])])
    if first[0] == "equal":
        return Grade(prediction, True, method="math-verify")
    rest = [(g, p) for g in golds for p in preds][1:]
    if rest and "equal" in ask(rest):
        return Grade(prediction, True, method="normalised")
    xs, ys = _unordered(answer), _unordered(prediction)
    if xs and ys and len(xs) == len(ys):
        verdicts = ask([(x, y) for x in xs for y in ys])
        table = [[verdicts[i * len(ys) + j] == "equal" for j in range(len(ys))]
                 for i in range(len(xs))]
        if _matching(table):
            return Grade(prediction, True, method="unordered")
    if failures:
        what = ("ran past its time limit" if any(f in ("timeout", "killed") for f in failures)
                else "ran out of memory")
        return Grade(prediction, False, error=(
            f"comparing {prediction[:60]!r} with {answer[:60]!r} {what} ({timeout:g} s); "
            f"check it by hand or allow more time (timeout=, or stepsal grade --timeout)"),
            method="error")
    return Grade(prediction, False, method="different")


def _matching(table: list[list[bool]]) -> bool:
    """Whether a boolean square table has a perfect matching (rows to columns)."""
    n = len(table)
    match: list[int] = [-1] * n

    def augment(i: int, seen: list[bool]) -> bool:
        for j in range(n):
            if table[i][j] and not seen[j]:
                seen[j] = True
                if match[j] < 0 or augment(match[j], seen):
                    match[j] = i
                    return True
        return False

    return all(augment(i, [False] * n) for i in range(n))


def judge(prediction: str | None, answer: str | int | float, kind: str = "math", *,
          timeout: float | int = DEFAULT_TIMEOUT) -> Grade:
    """Grade an extracted answer against the gold ``answer``.

    Parameters
    ----------
    prediction
        An answer as :func:`extract_answer` returns it (None: no answer found).
    answer
        The gold answer (a letter for ``kind="choice"``).
    kind
        ``"math"`` or ``"choice"``.
    timeout
        Seconds grading may take in all, in (0, 86400]; past it the grade is an error.

    Examples
    --------
    >>> from stepsal_lens.eval.grading import judge
    >>> judge("1{,}000", "1000").status, judge("\\\\text{Yes}", "yes").status
    ('correct', 'correct')
    >>> judge("3", "4").status, judge(None, "4").method
    ('wrong', 'no answer')
    """
    seconds = _check_grading_args(prediction, "prediction", answer, kind, timeout)
    return _in_worker(prediction, answer, kind, seconds, extract=False)


def _check_grading_args(text: Any, name: str, answer: Any, kind: Any, timeout: Any) -> float:
    """The argument checks of :func:`judge` and :func:`grade_output` (before any work);
    returns the timeout as a float."""
    check_type(text, (str, type(None)), name, "model text (a str) or None")
    check_type(answer, (str, int, float), "answer", "the gold answer (a str or a number)")
    _check_kind(kind)
    return check_timeout(timeout)


def _in_worker(text: str | None, answer: str | int | float, kind: str, timeout: float,
               *, extract: bool) -> Grade:
    """Grade in the worker process under the hard time limit ``timeout``."""
    reply = _WORKER.request({"grade": [text, str(answer), kind, extract], "timeout": timeout},
                            timeout)
    if reply is None:
        return Grade(None, False, method="error", error=(
            f"grading ran past its time limit ({timeout:g} s) and was stopped (a very long "
            f"or repetitive text, or a symbolic comparison that does not end); check it by "
            f"hand or allow more time (timeout=, or stepsal grade --timeout)"))
    if "error" in reply:  # a bug in the grader, reported instead of raised in the worker
        return Grade(None, False, method="error", error=f"the grader failed: {reply['error']}")
    return Grade(**reply["grade"])


def _grade_here(text: str | None, answer: str, kind: str, timeout: float, extract: bool,
                compare) -> Grade:
    """Everything grading does, in the process that runs it (the worker):
    ``compare(pairs, seconds)`` gives the symbolic verdicts."""
    prediction = extract_answer(text, kind, gold=answer) if extract else text
    return _judge_here(prediction, answer, kind, timeout, compare)


def _judge_here(prediction: str | None, answer: str, kind: str, timeout: float,
                compare) -> Grade:
    gold = str(answer).strip()
    if prediction is None or not str(prediction).strip():
        return Grade(None, False, method="no answer")
    prediction = str(prediction)
    if kind == "choice":
        got, want = _letter_of(prediction), _letter_of(gold) or gold.upper()
        return Grade(prediction, got is not None and got == want, method="letter")
    a, b = _normal(prediction), _normal(gold)
    if a == b and a:
        return Grade(prediction, True, method="string")
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return Grade(prediction, math.isclose(na, nb, rel_tol=1e-6, abs_tol=1e-9),
                     method="number")
    if _is_word(a) and _is_word(b):
        return Grade(prediction, False, method="string")
    return _symbolic(prediction, gold, timeout, compare)


def grade(prediction: str | None, answer: str | int | float, kind: str = "math", *,
          timeout: float | int = DEFAULT_TIMEOUT) -> bool:
    """Whether an extracted answer matches the gold ``answer`` (False on a grading error).

    :func:`judge` says why, and tells a wrong answer from a grading error.

    Examples
    --------
    >>> from stepsal_lens.eval.grading import grade
    >>> grade("\\\\frac{1}{2}", "0.5"), grade("(B)", "B", kind="choice")
    (True, True)
    """
    return judge(prediction, answer, kind, timeout=timeout).correct


def grade_output(output: str | None, answer: str | int | float, kind: str = "math", *,
                 timeout: float | int = DEFAULT_TIMEOUT) -> Grade:
    """Extract the answer from model text and grade it: the one entry point of ``stepsal
    eval``, ``stepsal grade`` and the demo.

    Parameters
    ----------
    output
        Model text (a summary or a whole completion).
    answer
        The gold answer; when it is a list, several boxed answers are read together.
    kind
        ``"math"`` or ``"choice"``.
    timeout
        Seconds grading may take in all (reading the answer out of the text included), in
        (0, 86400]; past it the worker is stopped and the grade is an error.

    Examples
    --------
    >>> from stepsal_lens.eval.grading import grade_output
    >>> grade_output("**Answer: D**", "D", kind="choice").correct
    True
    >>> g = grade_output("So $x=\\\\boxed{3}$ or $x=\\\\boxed{-2}$.", "-2, 3")
    >>> g.prediction, g.correct
    ('3, -2', True)
    """
    seconds = _check_grading_args(output, "output", answer, kind, timeout)
    return _in_worker(output, answer, kind, seconds, extract=True)
