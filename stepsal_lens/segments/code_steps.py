"""Steps of code: fenced code blocks in a thinking or summary segment are cut as code.

A fenced block (a line starting with three backticks, up to the next such line) is not
prose: cutting it on ``". "`` would split string literals and comments at random. Inside a
fence a step is a *blank-line block* of code: a new step starts at the first character
after a blank line, unless that blank line lies inside a string literal (``'''...'''``
docstrings included) or inside open brackets. The opening fence line stays with the prose
before it, and the closing fence line with the last block of code, so every cut is
decidable at the character where the new step starts (the splitter stays prefix-stable,
as StepFlow's online tracker needs). Text after the closing fence is prose again.

:func:`split_with_code` applies a prose rule outside fences and the code rule inside;
the default ``paper`` splitter uses it whenever a segment holds a fence.

Examples
--------
>>> from stepsal_lens.segments.code_steps import code_block_spans
>>> code = "import sys\\n\\ndef f(x):\\n    s = '''a\\n\\nb'''\\n    return s\\n\\nprint(f(1))\\n"
>>> [code[a:b] for a, b in code_block_spans(code)]
['import sys', "def f(x):\\n    s = '''a\\n\\nb'''\\n    return s", 'print(f(1))']
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["code_block_spans", "context_start", "fenced_regions", "split_with_code"]

Span = tuple[int, int]

_FENCE = re.compile(r"^[ \t]{0,3}```", re.M)
#: Blocks shorter than this join the next block (like the paper's short pieces).
MIN_BLOCK_CHARS = 10


def _strip(text: str, a: int, b: int) -> Span | None:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return (a, b) if a < b else None


def _block_starts(code: str) -> list[int]:
    """Offsets where a blank-line block starts: the first non-space character after a
    blank line that is outside every string literal and bracket. A left-to-right scan,
    so what it says about a position depends only on the text before it."""
    starts: list[int] = []
    i, n = 0, len(code)
    depth = 0
    quote: str | None = None  # the open string's delimiter: ' " ''' or """
    newlines = 0  # line breaks since the last non-space character (outside strings)
    while i < n:
        ch = code[i]
        if quote is not None:
            if ch == "\\":
                i += 2
                continue
            if code.startswith(quote, i):
                i += len(quote)
                quote = None
                continue
            if ch == "\n" and len(quote) == 1:  # an unclosed one-line string ends here
                quote = None
                newlines = 1
            i += 1
            continue
        if ch == "#":
            while i < n and code[i] != "\n":
                i += 1
            continue
        if ch == "\n":
            newlines += 1
            i += 1
            continue
        if ch in " \t\r\f\v":
            i += 1
            continue
        if newlines >= 2 and depth == 0:
            starts.append(i)
        newlines = 0
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch in "'\"":
            quote = code[i:i + 3] if code.startswith(ch * 3, i) else ch
            i += len(quote)
            continue
        i += 1
    return starts


def code_block_spans(code: str) -> list[Span]:
    """Steps of a piece of code: blank-line blocks outside strings and brackets; a block
    shorter than ``MIN_BLOCK_CHARS`` joins the next one (the last is a step whatever it
    is). Spans are stripped of surrounding whitespace."""
    cuts = [0] + [s for s in _block_starts(code) if s > 0] + [len(code)]
    spans = [sp for a, b in zip(cuts, cuts[1:]) if (sp := _strip(code, a, b))]
    out: list[Span] = []
    pending: int | None = None
    for k, (a, b) in enumerate(spans):
        if b - a < MIN_BLOCK_CHARS and k < len(spans) - 1:
            pending = a if pending is None else pending
            continue
        out.append((a if pending is None else pending, b))
        pending = None
    return out


def fenced_regions(text: str) -> list[tuple[str, Span]]:
    """``("prose" | "code", (start, end))`` regions covering ``text`` in order.

    A code region runs from the line after an opening fence to the end of its closing
    fence line (or the end of the text while the fence is open); the opening fence line
    belongs to the prose before it.
    """
    regions: list[tuple[str, Span]] = []
    pos = 0
    fences = list(_FENCE.finditer(text))
    k = 0
    while k < len(fences):
        open_line_end = text.find("\n", fences[k].start())
        if open_line_end < 0:  # the opening fence line is still streaming in
            break
        code_start = open_line_end + 1
        regions.append(("prose", (pos, code_start)))
        close = next((f for f in fences[k + 1:] if f.start() >= code_start), None)
        if close is None:
            regions.append(("code", (code_start, len(text))))
            return [r for r in regions if r[1][0] < r[1][1]]
        close_end = text.find("\n", close.start())
        close_end = len(text) if close_end < 0 else close_end
        regions.append(("code", (code_start, close_end)))
        pos = close_end
        k = fences.index(close) + 1
    regions.append(("prose", (pos, len(text))))
    return [r for r in regions if r[1][0] < r[1][1]]


def split_with_code(text: str, segment: str,
                    prose: Callable[[str, str], list[Span]]) -> list[Span]:
    """Step spans of a segment: ``prose(piece, segment)`` outside fences, code blocks
    inside (:func:`code_block_spans`); offsets are relative to ``text``.

    Examples
    --------
    >>> from stepsal_lens.segments.code_steps import split_with_code
    >>> from stepsal_lens.segments.splitters import paper_splitter
    >>> text = ("Let me write it. Here is the code:\\n```python\\nn = int(input())\\n\\n"
    ...         "print(n * n)  # the answer. Done\\n```\\nThat is all.")
    >>> [text[a:b] for a, b in split_with_code(text, "thinking", paper_splitter)]
    ['Let me write it.', 'Here is the code:\\n```python', 'n = int(input())', 'print(n * n)  # the answer. Done\\n```', 'That is all.']
    """
    out: list[Span] = []
    carry: int | None = None  # an opening fence line that is a step alone joins the code
    for kind, (a, b) in fenced_regions(text):
        piece = text[a:b]
        spans = [(a + s, a + e) for s, e in (code_block_spans(piece) if kind == "code"
                                               else prose(piece, segment))]
        if kind == "code" and carry is not None and spans:
            spans[0] = (carry, spans[0][1])
            carry = None
        elif kind == "prose" and spans and _FENCE.match(text, spans[-1][0]) and \
                text.rfind("\n", spans[-1][0], spans[-1][1]) < 0 and b < len(text):
            carry = spans.pop()[0]
        if carry is not None and kind == "code" and not spans:
            out.append((carry, b))
            carry = None
        out.extend(spans)
    if carry is not None:
        out.append((carry, len(text.rstrip())))
    return out


def context_start(text: str, region_start: int, step_char: int) -> int:
    """Where StepFlow's tracker must start splitting to judge a step that starts at
    ``step_char``: the start of the opening fence line when that step lies inside a
    fenced block (the code rule needs to know it is in code), else ``step_char``.

    From there the splitter gives the same spans after ``step_char`` as on the whole
    segment, so online steps equal the offline :class:`~stepsal_lens.Trace`'s.
    """
    seg = text[region_start:step_char]
    if "```" not in seg:
        return step_char
    fences = list(_FENCE.finditer(seg))
    k = 0
    while k < len(fences):
        line_end = seg.find("\n", fences[k].start())
        if line_end < 0:
            return step_char
        code_start = line_end + 1
        close = next((f for f in fences[k + 1:] if f.start() >= code_start), None)
        if close is None:
            return region_start + fences[k].start()
        k = fences.index(close) + 1
    return step_char
