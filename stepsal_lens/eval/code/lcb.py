"""LiveCodeBench problems: its release files, a plain form, its prompts, code extraction.

Two row layouts are read (by :func:`~stepsal_lens.eval.problems.load_problems`, which
hands coding rows here):

* LiveCodeBench's release files (``code_generation_lite``'s ``test.jsonl``,
  ``test2.jsonl`` ...): ``question_id``, ``question_title``, ``question_content``,
  ``platform``, ``contest_date``, ``difficulty``, ``starter_code``,
  ``public_test_cases`` (a JSON string), ``private_test_cases`` (a JSON string, or
  base64(zlib(pickle(JSON string))) as LiveCodeBench stores them) and ``metadata`` (a JSON
  string holding ``func_name`` for functional problems);
* a plain form: ``{"id", "question", "tests": [{"input", "output", "testtype"}],
  "func_name", "starter_code"}`` (``platform``, ``difficulty``, ``contest_date``
  optional).

The pickled tests are decoded **without** :mod:`pickle`: :func:`decode_pickled_string`
walks the opcodes with :func:`pickletools.genops` (a parser that executes nothing) and
accepts only the opcodes a pickled ``str`` is made of, refusing anything else by name.

Examples
--------
>>> from stepsal_lens.eval.code.lcb import extract_code
>>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nand finally\\n```python\\nprint(2)\\n```")
'print(2)'
>>> extract_code("no code at all") is None
True
"""

from __future__ import annotations

import base64
import binascii
import json
import pickletools
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.code.judge import CodeTest
from stepsal_lens.eval.problems import Problem, content_id, id_of, register_row_reader

__all__ = ["CodeProblem", "LCB_INSTRUCTION_STARTER", "LCB_INSTRUCTION_STDIN",
           "decode_pickled_string", "extract_code", "filter_dates", "is_code_row",
           "lcb_prompt", "parse_code_row", "parse_tests"]

#: LiveCodeBench's formatting lines (``PromptConstants``), with and without starter code.
LCB_INSTRUCTION_STARTER = ("You will use the following starter code to write the solution to "
                           "the problem and enclose your code within delimiters.")
LCB_INSTRUCTION_STDIN = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not "
    "directly test on the sample inputs). Enclose your code within delimiters as follows. "
    "Ensure that when the python program runs, it reads the inputs, runs the algorithm and "
    "writes output to STDOUT.")
_LCB_HEAD = ("You will be given a question (problem specification) and will generate a correct "
             "Python program that matches the specification and passes all tests.\n\n")

#: Decompressed private tests larger than this are refused (a zlib bomb guard).
MAX_DECODED_BYTES = 1 << 30

# the opcodes of a pickled str, protocols 0-5 (pickletools.dis(pickle.dumps("x", protocol=p)))
_STRING_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_HARMLESS_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"}


def decode_pickled_string(data: bytes) -> str:
    """The ``str`` a pickle holds, read without unpickling; anything else is refused.

    Only ``PROTO``, ``FRAME``, one of ``UNICODE`` / ``SHORT_BINUNICODE`` / ``BINUNICODE``
    / ``BINUNICODE8``, a memo store (``MEMOIZE`` / ``PUT`` / ``BINPUT`` /
    ``LONG_BINPUT``) and ``STOP`` may appear: what ``pickle.dumps(some_str, protocol=p)``
    writes for ``p`` 0 to 5. Any other opcode (``GLOBAL``, ``REDUCE``, ``BUILD`` ...)
    raises before anything is built.

    Examples
    --------
    >>> import pickle
    >>> from stepsal_lens.eval.code.lcb import decode_pickled_string
    >>> decode_pickled_string(pickle.dumps('[{"input": "1"}]'))
    '[{"input": "1"}]'
    >>> decode_pickled_string(pickle.dumps(print))
    Traceback (most recent call last):
    ...
    stepsal_lens.errors.StepSalError: refusing pickle opcode STACK_GLOBAL at byte ...: ...
    """
    if not isinstance(data, (bytes, bytearray)):
        raise StepSalError(f"a pickle is bytes; got {type(data).__name__}")
    strings: list[tuple[int, str]] = []
    stopped = False
    bad: tuple[str, int] | None = None
    broken: str | None = None
    try:  # walk every opcode first (nothing is built), then judge
        for op, arg, pos in pickletools.genops(bytes(data)):
            if op.name in _STRING_OPS:
                strings.append((pos, arg))
            elif op.name not in _HARMLESS_OPS and bad is None:
                bad = (op.name, pos)
            stopped = op.name == "STOP"
    except (ValueError, EOFError, UnicodeDecodeError) as err:  # what genops raises
        broken = str(err)
    if bad is not None:
        raise StepSalError(
            f"refusing pickle opcode {bad[0]} at byte {bad[1]}: only a pickled str is "
            f"accepted (its tests), never objects or calls; re-export the file from "
            f"LiveCodeBench's own release")
    if broken is not None:
        raise StepSalError(f"not a valid pickle ({broken})")
    if len(strings) > 1:
        raise StepSalError(f"refusing a pickle with more than one string (second at byte "
                           f"{strings[1][0]}): LiveCodeBench's tests are one str")
    value = strings[0][1] if strings else None
    if not stopped or value is None:
        raise StepSalError("the pickle holds no string")
    return value


def _decode_private(text: str, where: str) -> list[Any]:
    """``private_test_cases``: JSON, or base64(zlib(pickle(JSON string)))."""
    if not text.strip():
        return []
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        raw = base64.b64decode("".join(text.split()).encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        data = inflater.decompress(raw, MAX_DECODED_BYTES)
        if inflater.unconsumed_tail:
            raise StepSalError(f"{where}: private_test_cases decompress to more than "
                               f"{MAX_DECODED_BYTES >> 20} MiB; refusing")
        if not inflater.eof:
            raise zlib.error("incomplete or empty zlib stream")
    except (binascii.Error, zlib.error, UnicodeEncodeError) as err:
        raise StepSalError(f"{where}: private_test_cases is neither JSON nor "
                           f"base64(zlib(pickle)) ({err})") from None
    try:
        return json.loads(decode_pickled_string(data))
    except StepSalError as err:
        raise StepSalError(f"{where}: private_test_cases: {err}") from None
    except ValueError as err:
        raise StepSalError(f"{where}: private_test_cases hold a string that is not JSON "
                           f"({err})") from None


@dataclass(frozen=True)
class CodeProblem(Problem):
    """A coding problem (``kind="code"``): its tests, the method functional tests call,
    the starter code and LiveCodeBench's metadata. ``answer`` is empty (the tests are the
    answer); the prompt is LiveCodeBench's (:func:`lcb_prompt`)."""

    tests: tuple[CodeTest, ...] = ()
    func_name: str | None = None
    starter_code: str = ""
    platform: str = ""
    difficulty: str = ""
    contest_date: str = ""
    n_public: int = 0

    def prompt_question(self) -> str:
        return lcb_prompt(self.question, self.starter_code)


def lcb_prompt(question: str, starter_code: str = "") -> str:
    """LiveCodeBench's user message for reasoning models (its DeepSeek-R1 template, the
    chat markers left to the model's own template).

    Examples
    --------
    >>> from stepsal_lens.eval.code.lcb import lcb_prompt
    >>> print(lcb_prompt("Add two numbers."))  # doctest: +ELLIPSIS
    You will be given a question ...
    <BLANKLINE>
    Question: Add two numbers.
    <BLANKLINE>
    Read the inputs from stdin solve the problem ...
    ```python
    # YOUR CODE HERE
    ```
    """
    text = _LCB_HEAD + f"Question: {question}\n\n"
    if starter_code:
        text += f"{LCB_INSTRUCTION_STARTER}\n```python\n{starter_code}\n```\n"
    else:
        text += f"{LCB_INSTRUCTION_STDIN}\n```python\n# YOUR CODE HERE\n```\n"
    return text.rstrip("\n")


def extract_code(text: str | None) -> str | None:
    """The last fenced code block of ``text``, as LiveCodeBench extracts it: the lines
    between the last two lines holding a triple backtick; None when there are fewer
    than two such lines or the block is blank."""
    if not text:
        return None
    lines = text.split("\n")
    fences = [i for i, line in enumerate(lines) if "```" in line]
    if len(fences) < 2:
        return None
    code = "\n".join(lines[fences[-2] + 1:fences[-1]])
    return code if code.strip() else None


def is_code_row(row: dict[str, Any]) -> bool:
    """A LiveCodeBench row or a plain coding row (one with a ``tests`` list)."""
    keys = {str(k).lower() for k in row}
    return ("question_content" in keys and "public_test_cases" in keys) or (
        "tests" in keys and isinstance(row.get("tests"), list))


def parse_tests(items: Any, where: str, what: str = "tests") -> list[CodeTest]:
    """A list of ``{"input", "output", "testtype"}`` objects as :class:`CodeTest`, or one
    error naming ``where`` and the item."""
    if not isinstance(items, list):
        raise StepSalError(f"{where}: {what} must be a list of {{\"input\", \"output\", "
                           f"\"testtype\"}}; got {type(items).__name__}")
    out = []
    for j, t in enumerate(items):
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise StepSalError(f"{where}: {what}[{j}] must be an object with input, output "
                               f"and testtype ('stdin' or 'functional'); got {str(t)[:80]}")
        try:
            out.append(CodeTest(str(t["input"]), str(t["output"]), t.get("testtype", "stdin")))
        except StepSalError as err:
            raise StepSalError(f"{where}: {what}[{j}]: {err}") from None
    return out


def _json_field(value: Any, where: str, name: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else None
        except ValueError as err:
            raise StepSalError(f"{where}: {name} is not valid JSON ({err})") from None
    return value


def _date(value: Any, where: str) -> str:
    if value is None or value == "":
        return ""
    text = str(value)
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).isoformat()
    except ValueError:
        raise StepSalError(f"{where}: contest_date {text!r} is not an ISO date "
                           f"(YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)") from None


def parse_code_row(row: dict[str, Any], i: int, source: str, where: str) -> CodeProblem:
    """One coding problem from a LiveCodeBench release row or a plain row."""
    if "question_content" in row:
        pid = id_of(row, ("question_id",), where)
        public = parse_tests(_json_field(row.get("public_test_cases"), where, "public_test_cases")
                        or [], where, "public_test_cases")
        private_raw = row.get("private_test_cases") or ""
        private = parse_tests(private_raw if isinstance(private_raw, list)
                         else _decode_private(str(private_raw), where), where,
                         "private_test_cases")
        meta = _json_field(row.get("metadata"), where, "metadata") or {}
        if not isinstance(meta, dict):
            raise StepSalError(f"{where}: metadata must be a JSON object; got {str(meta)[:60]}")
        question = str(row.get("question_content") or "")
        func_name = meta.get("func_name")
        platform, difficulty = row.get("platform") or "", row.get("difficulty") or ""
        date, starter = row.get("contest_date"), row.get("starter_code") or ""
    else:
        pid = id_of(row, ("id", "question_id"), where)
        public = parse_tests(row["tests"], where, "tests")
        private = []
        question = str(row.get("question") or row.get("problem") or "")
        func_name = row.get("func_name")
        platform, difficulty = row.get("platform") or "", row.get("difficulty") or ""
        date, starter = row.get("contest_date"), row.get("starter_code") or ""
    if not question.strip():
        raise StepSalError(f"{where}: a coding problem needs its question "
                           f"(question_content / question)")
    # no id field: an id from the content, never the row number (as other problems)
    pid = pid or content_id(question.strip(), "code")
    tests = public + private
    if not tests:
        raise StepSalError(f"{where}: problem {pid!r} has no tests; a coding problem needs "
                           f"public_test_cases / private_test_cases (or tests)")
    kinds = {t.testtype for t in tests}
    if len(kinds) > 1:
        raise StepSalError(f"{where}: problem {pid!r} mixes testtypes {sorted(kinds)}")
    if kinds == {"functional"} and not func_name:
        raise StepSalError(f"{where}: problem {pid!r} has functional tests but no func_name "
                           f"(metadata.func_name in LiveCodeBench's files)")
    return CodeProblem(pid, question.strip(), "", "code", (), source, "", tests=tuple(tests),
                       func_name=func_name or None, starter_code=str(starter),
                       platform=str(platform), difficulty=str(difficulty),
                       contest_date=_date(date, where), n_public=len(public))


def filter_dates(problems: list[Problem], *, after: str | None = None,
                 before: str | None = None) -> list[Problem]:
    """Coding problems with ``after <= contest_date <= before`` (both ``YYYY-MM-DD``,
    inclusive, either optional), as LiveCodeBench's ``--start_date`` / ``--end_date``.

    Examples
    --------
    >>> from stepsal_lens.eval.code.lcb import CodeProblem, filter_dates
    >>> ps = [CodeProblem(str(d), "q", "", "code", contest_date=f"2024-0{d}-15T00:00:00")
    ...       for d in (1, 5, 9)]
    >>> [p.id for p in filter_dates(ps, after="2024-05-01", before="2024-09-15")]
    ['5', '9']
    """
    if after is None and before is None:
        return problems

    def day(text: str, flag: str) -> datetime:
        try:
            return datetime.strptime(text, "%Y-%m-%d")
        except (TypeError, ValueError):
            raise StepSalError(f"{flag} {text!r} is not a date; use YYYY-MM-DD") from None

    start = day(after, "--after") if after is not None else None
    end = day(before, "--before") if before is not None else None
    if start and end and start > end:
        raise StepSalError(f"--after {after} is later than --before {before}; no problem fits")
    out = []
    for p in problems:
        date = getattr(p, "contest_date", "")
        if not date:
            raise StepSalError(f"problem {p.id!r} has no contest_date; --after/--before "
                               f"select LiveCodeBench problems by their contest_date")
        when = datetime.fromisoformat(date).replace(tzinfo=None)
        if (start is None or start <= when) and (end is None or when <= end):
            out.append(p)
    if not out:
        raise StepSalError(f"no problem has a contest_date in the window --after {after} "
                           f"--before {before}")
    return out


register_row_reader(is_code_row, parse_code_row)
