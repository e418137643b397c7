"""The one place text from results becomes HTML or a spreadsheet cell.

Everything read from a file (``steps.json``, a traces file, a run's records) is
untrusted: a step text, a segment name, a token string, a model name or a trace id may
hold ``<img src=x onerror=...>`` or ``=cmd|' /C calc'!A0``. Every HTML string this
package builds passes such values through :func:`esc`, and every CSV it writes goes
through :func:`write_csv`, which neutralises the cells a spreadsheet would evaluate.
The explorers' JavaScript (``_views.js``) draws text with ``textContent`` only.

Examples
--------
>>> esc('<img src=x onerror="alert(1)">')
'&lt;img src=x onerror=&quot;alert(1)&quot;&gt;'
>>> [csv_cell(v) for v in ["=1+2", "-2+3", "@SUM(A1)", "plain", -2.5, 3]]
["'=1+2", "'-2+3", "'@SUM(A1)", 'plain', -2.5, 3]
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

__all__ = ["CSV_TRIGGERS", "csv_cell", "esc", "neutralize_csv", "write_csv"]

#: First characters that make a spreadsheet evaluate a text cell (OWASP CSV injection).
CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def esc(value: Any) -> str:
    """``str(value)`` escaped for HTML text and quoted attribute values (``&``, ``<``,
    ``>``, ``"`` and ``'``). The only HTML escaping in the package: every value that
    reaches an HTML string goes through it.

    Parameters
    ----------
    value
        Anything; it is converted with ``str`` first.

    Returns
    -------
    str
        Safe to place between tags or inside a quoted attribute.
    """
    return html.escape(str(value), quote=True)


def csv_cell(value: Any) -> Any:
    """One CSV cell made inert: a string starting with ``=``, ``+``, ``-``, ``@``, a tab
    or a carriage return gets a leading ``'`` (so a spreadsheet shows it as text instead
    of evaluating it); everything else, numbers included (negative ones too), is
    returned as is.

    Parameters
    ----------
    value
        A cell value.

    Returns
    -------
    Any
        ``"'" + value`` for a dangerous string, else ``value``.
    """
    if isinstance(value, str) and value.startswith(CSV_TRIGGERS):
        return "'" + value
    return value


def neutralize_csv(frame: Any) -> Any:
    """A copy of a DataFrame with :func:`csv_cell` applied to every text cell and column
    name (numeric columns are untouched, so numbers stay numbers)."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or str(out[column].dtype) in ("string", "str"):
            out[column] = out[column].map(csv_cell).astype(object)
    out.columns = [csv_cell(c) for c in out.columns]
    return out


def write_csv(frame: Any, path: str | Path) -> Path:
    """Write a DataFrame as CSV (no index) with its text cells neutralised
    (:func:`neutralize_csv`): the one CSV writer of the package. Lines end with CRLF
    (RFC 4180), so a cell holding a carriage return or a newline is quoted and stays
    one cell.

    Parameters
    ----------
    frame
        A pandas DataFrame.
    path
        The file to write.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    neutralize_csv(frame).to_csv(path, index=False, lineterminator="\r\n")
    return path
