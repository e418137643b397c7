"""Step splitters: what a step is, as character spans of one segment's text.

One rule serves both drivers: :class:`~stepsal_lens.segments.trace.Trace` applies it to a
whole text, the StepFlow tracker (:mod:`stepsal_lens.segments.tracker`) to text as it
streams in, which is why a registered splitter must be *prefix-stable*
(:func:`register_splitter`). The paper's rule is :func:`paper_splitter`: split on blank
lines (thinking) or line breaks (summary); a piece that is too short to be a step of its
own (digits and punctuation only, or a table rule) joins the *next* piece.

Examples
--------
>>> from stepsal_lens.segments.splitters import paper_splitter
>>> text = "We start with 7.\\n\\nSo 12.\\n\\nAdding 5 gives 12."
>>> [text[a:b] for a, b in paper_splitter(text, "thinking")]  # "So 12." is too short alone
['We start with 7.', 'So 12.\\n\\nAdding 5 gives 12.']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from stepsal_lens._registry import Registry

__all__ = [
    "Span",
    "Splitter",
    "get_splitter",
    "list_splitters",
    "newline_splitter",
    "paper_splitter",
    "register_splitter",
    "regex_splitter",
]

Span = tuple[int, int]
#: A splitter takes a segment's text and its name and returns step spans (char offsets
#: relative to that text, sorted, disjoint).
Splitter = Callable[[str, str], list[Span]]


_DIGITS_ONLY = re.compile(r"[\d\s.,:;+\-*/=()%$]*")
# A GFM table delimiter row: cells of hyphens with optional colons ("| --- | :-: |").
_TABLE_RULE = re.compile(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?")
# Line breaks: LF, CRLF and a lone CR alike (matched, never rewritten, so character
# offsets into the caller's text stay valid).
_EOL = r"(?:\r\n|\r(?!\n)|\n)"
_BLANK_LINE = re.compile(_EOL + r"[ \t]*" + _EOL + r"\s*")
_LINE_BREAKS = re.compile(r"[\r\n]+")


def _strip_all(text: str, spans: list[Span]) -> list[Span]:
    """Spans with surrounding whitespace removed; empty ones dropped."""
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            out.append((a, b))
    return out


def _pieces(text: str, separator: re.Pattern, keep_chars: int) -> list[Span]:
    """Cut at each separator match, keeping its first ``keep_chars`` characters in the
    piece before it; spans are stripped of whitespace and empty pieces dropped."""
    spans, start = [], 0
    for m in separator.finditer(text):
        spans.append((start, m.start() + keep_chars))
        start = m.end()
    spans.append((start, len(text)))
    return _strip_all(text, spans)


def _join_small(text: str, spans: list[Span], is_small: Callable[[str], bool]) -> list[Span]:
    """Merge pieces that are not steps of their own into the next piece (the last piece
    is a step whatever it is), so no character is lost.

    Joining forward keeps the rule decidable while text streams in: when a separator
    arrives the piece before it is complete, so whether the next character starts a new
    step is known at once - the online tracker and the offline Trace use this one rule.
    """
    out: list[Span] = []
    pending: int | None = None  # start of small pieces waiting for the next piece
    for i, (a, b) in enumerate(spans):
        if is_small(text[a:b]) and i < len(spans) - 1:
            pending = a if pending is None else pending
            continue
        out.append((a if pending is None else pending, b))
        pending = None
    return out


def _not_a_thinking_step(piece: str) -> bool:
    body = piece[:-1] if piece.endswith(".") else piece
    return len(piece) < 15 or bool(_DIGITS_ONLY.fullmatch(body) or _TABLE_RULE.fullmatch(body))


def paper_splitter(text: str, segment: str) -> list[Span]:
    """The reference paper's rule: thinking on ``\\.\\s+``, summary on blank lines.

    Line breaks may be LF, CRLF or a lone CR.

    Thinking pieces shorter than 15 characters, digit-and-separator pieces (list
    numbers such as ``"2."``) and markdown table rules join the next piece; summary
    pieces shorter than 10 characters join the next piece; the last piece of a segment is
    a step whatever it is. The question is one step. (The paper's code drops such pieces;
    joining them keeps every token.)

    Fenced code blocks (three backticks) in the thinking or summary are cut as code, not
    sentences: by blank-line blocks outside string literals and brackets
    (:mod:`stepsal_lens.segments.code_steps`); text without a fence is split exactly as
    above.
    """
    if segment in ("thinking", "summary") and "```" in text:
        from stepsal_lens.segments.code_steps import split_with_code

        return split_with_code(text, segment, _paper_prose)
    return _paper_prose(text, segment)


def _context_start(text: str, region_start: int, step_char: int) -> int:
    from stepsal_lens.segments.code_steps import context_start

    return context_start(text, region_start, step_char)


#: StepFlow's tracker splits from here (a fenced block's opening line), not the step start
paper_splitter.context_start = _context_start  # type: ignore[attr-defined]


def _paper_prose(text: str, segment: str) -> list[Span]:
    """The paper's rule on prose (no fences)."""
    if segment == "thinking":
        spans = _pieces(text, re.compile(r"\.\s+"), keep_chars=1)
        return _join_small(text, spans, _not_a_thinking_step)
    if segment == "summary":
        spans = _pieces(text, _BLANK_LINE, keep_chars=0)
        return _join_small(text, spans, lambda s: len(s) < 10)
    return _strip_all(text, [(0, len(text))])


def newline_splitter(text: str, segment: str) -> list[Span]:
    """One step per non-empty line (the question stays one step)."""
    if segment == "question":
        return paper_splitter(text, segment)
    return _pieces(text, _LINE_BREAKS, keep_chars=0)


def regex_splitter(pattern: str, *, keep_separator: bool = False,
                   segments: Sequence[str] = ("thinking", "summary")) -> Splitter:
    """A splitter that cuts the given segments wherever ``pattern`` matches.

    ``keep_separator=True`` keeps the matched text at the end of the piece before it.
    """
    sep = re.compile(pattern)

    def split(text: str, segment: str) -> list[Span]:
        if segment not in segments:
            return _strip_all(text, [(0, len(text))])
        out, start = [], 0
        for m in sep.finditer(text):
            if m.end() == m.start():
                continue
            out.append((start, m.end() if keep_separator else m.start()))
            start = m.end()
        out.append((start, len(text)))
        return _strip_all(text, out)

    return split


_SPLITTERS: Registry[Splitter] = Registry(
    "step splitter", "pass regex_splitter(pattern), a callable (text, segment) -> spans, or "
    "step_spans=[...]")
_SPLITTERS.register("paper", paper_splitter)
_SPLITTERS.register("newline", newline_splitter)


def register_splitter(name: str, splitter: Splitter, *, overwrite: bool = False) -> None:
    """Make ``splitter`` available by name to :class:`Trace` and to StepFlow's tracker.

    A splitter ``(text, segment) -> [(start, end), ...]`` returns sorted, disjoint
    character spans. StepFlow applies it to text as it streams in, so it must be
    *prefix-stable*: splitting a prefix that ends at the first character of a new step
    starts a span there, and splitting again from any step's start gives the same later
    spans (``paper``, ``newline`` and :func:`regex_splitter` are).
    """
    _SPLITTERS.register(name, splitter, overwrite=overwrite)


def list_splitters() -> list[str]:
    """Names of the registered step splitters."""
    return _SPLITTERS.names()


def get_splitter(splitter: str | Splitter) -> Splitter:
    """A splitter by name (a callable passes through)."""
    return splitter if callable(splitter) else _SPLITTERS.get(splitter)


