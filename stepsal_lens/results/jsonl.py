"""The one JSONL reader and writer: lines end at ``\\n`` only, every file is UTF-8.

JSON allows U+2028, U+2029 and U+0085 raw inside strings, and ``json.dumps(...,
ensure_ascii=False)`` writes them raw; ``str.splitlines`` (and so every reader built on
it) splits a line there. So :func:`dumps_line` writes those three escaped (``\\u2028``)
and :func:`read_jsonl` splits on ``\\n`` only: a file stepsal wrote, or any valid JSONL
file, reads back line for line.

A file that is not UTF-8 (UTF-16 or UTF-32, Latin-1) is one
:class:`~stepsal_lens.errors.StepSalError` naming the file and the encoding (the one
UTF-8 reader, :func:`stepsal_lens._checks.read_utf8`); a line that
is not a JSON object names its line number. Only a cut last line (no final newline, as
left by a killed writer) can be tolerated, and only where the caller says so
(``tolerate_cut=True``: resumable results, whose last record is then redone).

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> f = Path(tempfile.mkdtemp()) / "a.jsonl"
>>> _ = f.write_text(dumps_line({"text": "a\\u2028b"}) + dumps_line({"n": 2}), encoding="utf-8")
>>> [row for _, row in read_jsonl(f)]
[{'text': 'a\\u2028b'}, {'n': 2}]
>>> "\\u2028" in f.read_text(encoding="utf-8")  # escaped on disk
False
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stepsal_lens._checks import read_utf8
from stepsal_lens.errors import StepSalError
from stepsal_lens.results.outputs import write_text_atomic

__all__ = ["dumps_line", "read_jsonl", "write_jsonl"]

# Separators that str.splitlines() and some editors treat as line ends inside a JSON string.
_SEPARATORS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def dumps_line(obj: Any) -> str:
    """One JSONL line (with its ``\\n``): UTF-8 text as is, line separators escaped.

    Examples
    --------
    >>> dumps_line({"a": "x\\x85y"})
    '{"a": "x\\\\u0085y"}\\n'
    """
    text = json.dumps(obj, ensure_ascii=False)
    for raw, escaped in _SEPARATORS.items():
        text = text.replace(raw, escaped)
    return text + "\n"


def read_jsonl(path: str | Path, *, what: str = "file",
               fix: str = "each line must be one JSON object",
               tolerate_cut: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for each non-blank line of a JSONL file (``where`` is
    ``"path:line"``).

    Parameters
    ----------
    path
        The file (UTF-8; lines end at ``\\n``).
    what, fix
        Name the file and the remedy in error messages.
    tolerate_cut
        Drop a last line that has no final newline and is not valid JSON (a writer was
        killed mid-line) instead of refusing the file.

    Raises
    ------
    StepSalError
        A missing or unreadable file, another encoding, a line that is not valid JSON or
        not an object.
    """
    path = Path(path)
    text = read_utf8(path, what)
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if tolerate_cut and i == len(lines):  # the last piece has no final newline
                break
            raise StepSalError(f"{path}:{i} is not valid JSON ({err}); {fix}") from None
        if not isinstance(row, dict):
            raise StepSalError(f"{path}:{i} holds a {type(row).__name__}, not an object; {fix}")
        rows.append((f"{path}:{i}", row))
    return rows


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write ``rows`` as a JSONL file atomically (a sibling, then renamed over ``path``)."""
    return write_text_atomic(path, "".join(dumps_line(r) for r in rows))
