"""Benchmark problems: local files in the layouts of the paper's benchmarks, and sources.

:func:`load_problems` reads local JSONL / JSON / parquet / CSV files in the field layouts
of MATH-500, AIME 2024/2025, AMC23 and GPQA-Diamond (nothing is downloaded), or asks a
registered problem source (``SOURCE:SPLIT``; the bundled zoo registers ``tiny``).

Examples
--------
>>> import json, tempfile
>>> from stepsal_lens.eval.problems import load_problems
>>> path = tempfile.mktemp(suffix=".jsonl")
>>> with open(path, "w") as f:
...     _ = f.write(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\\n")
>>> [(p.question, p.answer, p.kind) for p in load_problems(path)]
[('What is 1+1?', '2', 'math')]
>>> load_problems("tiny:id", limit=1)[0].source
'tiny:id'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepsal_lens._checks import check_id, read_utf8
from stepsal_lens._registry import Registry
from stepsal_lens.errors import StepSalError
from stepsal_lens.results.jsonl import read_jsonl
from stepsal_lens.segments.answers import find_answer

__all__ = ["Problem", "list_sources", "load_problems", "register_row_reader", "register_source"]

#: A problem source: ``fn(split, limit) -> [Problem, ...]`` (``limit`` None: its default).
Source = Callable[[str, "int | None"], list]
_SOURCES: Registry[Source] = Registry("problem source", "register_source(name, fn)")


def register_source(name: str, fn: Source, *, overwrite: bool = False) -> None:
    """Make ``load_problems("NAME:SPLIT")`` call ``fn(split, limit)``.

    The bundled zoo registers ``tiny`` (the arithmetic task's held-out splits).
    """
    if not name.isidentifier():
        raise StepSalError(f"a source name must be an identifier (it prefixes 'NAME:SPLIT'); "
                           f"got {name!r}")
    _SOURCES.register(name, fn, overwrite=overwrite)


def list_sources() -> list[str]:
    """Names of the registered problem sources."""
    return _SOURCES.names()


MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


CHOICE_INSTRUCTION = ("\nPlease reason step by step, and put the letter of the correct choice "
                      "within \\boxed{}.")


LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    ``kind`` is ``"math"`` (free-form answer) or ``"choice"`` (``answer`` is a letter and
    ``choices`` the options in letter order). ``instruction`` is appended to the
    question in the prompt.
    """

    id: str
    question: str
    answer: str
    kind: str = "math"
    choices: tuple[str, ...] = ()
    source: str = ""
    instruction: str = MATH_INSTRUCTION

    def prompt_question(self) -> str:
        """The question as the model reads it (options and instruction included)."""
        text = self.question
        if self.choices:
            text += "\n\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(self.choices))
        return text + self.instruction


def _missing(value: Any) -> bool:
    """None, NaN (an empty CSV cell) or a blank string."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and not value.strip()


def _field(row: dict[str, Any], *names: str) -> Any:
    lower = {str(k).lower(): v for k, v in row.items()}
    for n in names:
        if n.lower() in lower and not _missing(lower[n.lower()]):
            return lower[n.lower()]
    return None


_ROW_FIX = ('each problem must be an object like {"problem": "...", "answer": "..."} '
            '(or GPQA\'s Question / Correct Answer / Incorrect Answer 1-3)')


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs: ``where`` names the file and line or row for messages."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, what="data file", fix=_ROW_FIX)
    if suffix == ".json":
        try:
            doc = json.loads(read_utf8(path, "data file"))
        except json.JSONDecodeError as err:
            raise StepSalError(f"data file {str(path)!r} is not valid JSON ({err})") from None
        if isinstance(doc, dict):
            keys = [k for k in ("data", "rows") if k in doc]
            if not keys:
                raise StepSalError(f"data file {str(path)!r} holds an object with keys "
                                   f"{sorted(doc)[:8]}; expected a list of problems, or "
                                   f"{{\"data\": [...]}} / {{\"rows\": [...]}}")
            doc = doc[keys[0]]
            if not isinstance(doc, list):
                raise StepSalError(f"data file {str(path)!r}: {keys[0]!r} holds "
                                   f"{str(doc)[:40]} ({type(doc).__name__}), not a list of "
                                   f"problems")
        if not isinstance(doc, list):
            raise StepSalError(f"data file {str(path)!r} holds a JSON {type(doc).__name__}; "
                               f"expected a list of problems")
        return [(f"{path} item {i}", row) for i, row in enumerate(doc)]
    if suffix in (".parquet", ".csv"):
        import pandas as pd

        try:
            df = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        except Exception as err:  # pandas/pyarrow raise many types for a bad file
            raise StepSalError(f"cannot read data file {str(path)!r} as {suffix[1:]}: "
                               f"{type(err).__name__}: {err}") from err
        return [(f"{path} row {i + 1}", row) for i, row in
                enumerate(df.to_dict(orient="records"))]
    raise StepSalError(f"cannot read {str(path)!r}: use .jsonl, .json, .parquet or .csv")


#: Readers of row layouts besides the built-in math / choice ones, tried first, in order:
#: ``(claims(row) -> bool, parse(row, i, source, where) -> Problem)``.
_ROW_READERS: list[tuple[Callable[[dict], bool], Callable[..., Any]]] = []


def register_row_reader(claims: Callable[[dict], bool], parse: Callable[..., Any]) -> None:
    """Read rows that ``claims(row)`` with ``parse(row, i, source, where)`` (e.g. the
    coding rows of :mod:`stepsal_lens.eval.code.lcb`, which registers itself)."""
    _ROW_READERS.append((claims, parse))


def id_of(row: dict[str, Any], names: tuple[str, ...], where: str) -> str | None:
    """The row's own id field (a string or whole number), or None: then the id comes
    from the problem's content (:func:`content_id`), never from its row number, so
    inserting or removing a row changes no other problem's id."""
    value = _field(row, *names)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) \
            or (isinstance(value, float) and not value.is_integer()):
        raise StepSalError(f"{where}: the id {value!r} must be a string or a whole number")
    return check_id(str(int(value) if isinstance(value, float) else value).strip(),
                    f"{where}: the id")


def content_id(question: str, answer: str, choices: tuple[str, ...] = ()) -> str:
    """The id of a problem without an id field: a hash of what it asks and expects.

    Examples
    --------
    >>> content_id("What is 1+1?", "2")
    'c-...'
    >>> content_id("What is 1+1?", "2") == content_id("What is 1+1?", "2")
    True
    """
    doc = json.dumps([question, answer, list(choices)], ensure_ascii=False)
    return "c-" + hashlib.sha256(doc.encode()).hexdigest()[:16]


def _gpqa(row: dict[str, Any], i: int, source: str, where: str) -> Problem:
    """GPQA: options shuffled with a seed taken from the record, so runs agree."""
    pid = id_of(row, ("Record ID", "id"), where)
    names = ["Question", "Correct Answer"] + [f"Incorrect Answer {k}" for k in (1, 2, 3)]
    empty = [n for n in names if _field(row, n) is None]
    if empty:
        raise StepSalError(f"{where}: GPQA row has empty {empty}; fill them in or drop the row")
    correct = str(_field(row, "Correct Answer")).strip()
    options = [correct] + [str(_field(row, f"Incorrect Answer {k}")).strip() for k in (1, 2, 3)]
    question = str(_field(row, "Question")).strip()
    if pid is None:
        pid = content_id(question, correct, tuple(sorted(options)))
    rng = random.Random(int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16))
    rng.shuffle(options)
    return Problem(pid, question, LETTERS[options.index(correct)], "choice", tuple(options),
                   source, CHOICE_INSTRUCTION)


def _choices_of(row: dict[str, Any], where: str) -> tuple[str, ...] | None:
    """The options of a multiple-choice row, in letter order: a ``choices`` / ``options``
    list, a ``{"A": text, ...}`` object, Hugging Face's ``{"label": [...], "text": [...]}``,
    or separate ``A`` / ``B`` / ``C`` / ``D`` (``E`` ...) fields; None when there are none."""
    value = _field(row, "choices", "options")
    if value is None:
        cols = [_field(row, x) for x in LETTERS]
        n = next((k for k, v in enumerate(cols) if v is None), len(cols))
        if n >= 2 and all(v is None for v in cols[n:]):
            return tuple(str(v).strip() for v in cols[:n])
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise StepSalError(f"{where}: 'choices' must be a list of option texts like "
                           f"[\"3\", \"4\", \"5\", \"6\"] (or an object {{\"A\": ..., \"B\": ...}}); "
                           f"got the {type(value).__name__} {str(value)[:40]!r} (a string is not "
                           f"a list of options)")
    if isinstance(value, dict):
        lower = {str(k).lower(): v for k, v in value.items()}
        if "text" in lower and isinstance(lower["text"], (list, tuple)):
            labels = list(lower.get("label") or LETTERS[:len(lower["text"])])
            pairs = sorted(zip(map(str, labels), lower["text"]))
        else:
            pairs = sorted((str(k).strip().upper(), v) for k, v in value.items())
        labels = [k for k, _ in pairs]
        if labels != list(LETTERS[:len(labels)]):
            raise StepSalError(f"{where}: the choices are labelled {labels}; label them A, B, "
                               f"C ... in order")
        value = [v for _, v in pairs]
    if not hasattr(value, "__len__") or isinstance(value, (bytes, dict)) or not len(value):
        return None
    if len(value) > len(LETTERS):
        raise StepSalError(f"{where}: {len(value)} choices; at most {len(LETTERS)} are supported")
    return tuple(str(c).strip() for c in value)


def _squash(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _gold_letter(answer: Any, choices: tuple[str, ...], where: str) -> str:
    """The gold letter from a letter (``B``, ``(B)``), a 0-based index, or the text of an
    option (as GPQA stores its correct answer)."""
    ans = str(answer).strip()
    numeric = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if numeric and float(answer).is_integer() and 0 <= int(answer) < len(choices):
        return LETTERS[int(answer)]  # a number is an index
    by_text = [k for k, c in enumerate(choices) if _squash(c) == _squash(ans)]
    if len(by_text) == 1 and not (len(ans) == 1 and ans.upper() in LETTERS):
        return LETTERS[by_text[0]]
    if ans.isdigit() and int(ans) < len(choices):
        return LETTERS[int(ans)]
    found = find_answer(ans, "choice")
    letter = found.text if found is not None and len(ans) <= 6 else (
        ans.upper() if len(ans) == 1 else None)
    if letter is not None and letter in LETTERS[:len(choices)]:
        return letter
    if len(by_text) > 1:
        raise StepSalError(f"{where}: the answer {ans[:60]!r} is the text of several options; "
                           f"give its letter instead")
    raise StepSalError(f"{where}: the answer {ans[:60]!r} is neither a letter A-"
                       f"{LETTERS[len(choices) - 1]}, an index 0-{len(choices) - 1}, nor the "
                       f"text of one of the {len(choices)} choices")


def _row_problem(row: Any, i: int, source: str, where: str) -> Problem:
    if not isinstance(row, dict):
        raise StepSalError(f"{where} holds a {type(row).__name__}, not an object; {_ROW_FIX}")
    for claims, parse in _ROW_READERS:  # other layouts first (coding rows: eval/code/lcb.py)
        if claims(row):
            return parse(row, i, source, where)
    choices = _choices_of(row, where)
    if _field(row, "Incorrect Answer 1") is not None or (
            _field(row, "Correct Answer") is not None and choices is None):
        return _gpqa(row, i, source, where)
    question = _field(row, "problem", "question", "prompt")
    answer = _field(row, "answer", "final_answer", "expected_answer", "correct answer",
                    "correct_answer")
    if question is None or answer is None:
        empty = [k for k, v in row.items() if _missing(v) and str(k).lower() in (
            "problem", "question", "prompt", "answer", "final_answer", "expected_answer")]
        if empty:
            raise StepSalError(f"{where} has an empty {' and '.join(map(repr, empty))}; every "
                               f"problem needs a question and an answer (fill them in or "
                               f"drop the row)")
        raise StepSalError(
            f"{where} has fields {sorted(map(str, row))}; expected a question field "
            f"(problem / question / Question) and an answer field (answer / Answer), or "
            f"GPQA's Question / Correct Answer / Incorrect Answer 1-3")
    pid = id_of(row, ("unique_id", "id", "idx", "record id"), where)
    if choices is not None:
        letter = _gold_letter(answer, choices, where)
        question = str(question).strip()
        return Problem(pid or content_id(question, letter, choices), question, letter,
                       "choice", choices, source, CHOICE_INSTRUCTION)
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # AMC23 stores answers as floats
    question, answer = str(question).strip(), str(answer).strip()
    return Problem(pid or content_id(question, answer), question, answer, "math", (), source)


def load_problems(data: str | Path, *, limit: int | None = None) -> list[Problem]:
    """Problems from a local file, or ``SOURCE:SPLIT`` from a registered source.

    Parameters
    ----------
    data
        A ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file in the layout of MATH-500
        (``problem``, ``answer``, ``unique_id``), AIME 2024 (``ID``, ``Problem``,
        ``Answer``), AIME 2025 / AMC23 (``question`` or ``problem``, ``answer``, ``id``),
        GPQA-Diamond (``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``,
        ``Record ID``) or generic multiple choice (``question``, ``choices``, ``answer`` as
        letter or index). ``SOURCE:SPLIT`` asks a registered source
        (:func:`register_source`); the zoo registers ``tiny:id`` / ``tiny:long`` /
        ``tiny:hard``: held-out problems of the bundled arithmetic task (seed 20000, as in
        tiny-lrm's ``eval.json``; 500 by default).
    limit
        Keep the first ``limit`` problems (None: all; at least 1).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise StepSalError(f"limit must be a whole number >= 1 (or None for all problems); got "
                           f"{limit!r}")
    if isinstance(data, str) and ":" in data and data.split(":", 1)[0] in _SOURCES:
        name, split = data.split(":", 1)
        return _SOURCES.get(name)(split, limit)
    path = Path(data)
    if not path.exists():
        raise StepSalError(f"data file {str(path)!r} does not exist (nothing is downloaded: "
                           f"save the benchmark locally first)")
    if path.is_dir():
        raise StepSalError(f"data file {str(path)!r} is a folder; pass a .jsonl, .json, "
                           f".parquet or .csv file")
    rows = _read_rows(path)
    if not rows:
        raise StepSalError(f"data file {str(path)!r} holds no problems")
    problems, seen = [], {}
    for i, (where, r) in enumerate(rows):
        p = _row_problem(r, i, path.name, where)
        if p.id in seen:
            if not p.id.startswith("c-"):
                raise StepSalError(f"{where} and {seen[p.id]} both have the id {p.id!r}; "
                                   f"records are keyed by id: give every problem its own")
            n = sum(1 for q in problems if q.id.split("~")[0] == p.id)
            p = dataclasses.replace(p, id=f"{p.id}~{n + 1}")  # the same problem again
        seen[p.id] = where
        problems.append(p)
    return problems[:limit] if limit is not None else problems
