r"""The one answer parser: the final answer in a model's text, with its character span.

Balanced braces everywhere, so ``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}`` and its
span (the ``answer`` saliency target maps that span to tokens). Math answers, in order of
trust: the last ``\boxed{}`` / ``\fbox{}``; the last "final answer" / "the answer is" /
"Answer:"; the last formula or number of the last line. Multiple-choice letters
(``kind="choice"``): a boxed letter, the letter right after the last "answer is" /
"Answer:" / "correct option", a last line that is only a letter, else the last ``(X)``.
Grading lives in :mod:`stepsal_lens.eval.grading`.

Examples
--------
>>> from stepsal_lens.segments.answers import find_answer
>>> a = find_answer("So the answer is \\boxed{\\frac{1}{2}}.")
>>> a.text, a.style
('\\frac{1}{2}', 'boxed')
>>> find_answer("**Answer: D** (the answer is D, not B)", kind="choice").text
'D'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stepsal_lens.errors import StepSalError

__all__ = ["Answer", "KINDS", "check_kind", "closing_brace", "find_answer", "find_boxed",
           "split_top"]


#: Answer kinds: free-form math, or a multiple-choice letter.
KINDS = ("math", "choice")


@dataclass(frozen=True)
class Answer:
    """An answer found in a text: ``text == source[start:end]``.

    ``style`` says where it came from: ``"boxed"``, ``"marker"`` (after "answer is",
    "Final answer:" ...), ``"last-line"``, ``"letter"`` (a lone or parenthesised letter).
    """

    text: str
    start: int
    end: int
    style: str


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise StepSalError(f"unknown answer kind {kind!r}; use one of {list(KINDS)}")


_BOX = re.compile(r"\\(?:boxed|fbox)\b")


def closing_brace(text: str, i: int) -> int:
    """Index of the brace closing the ``{`` at ``i`` (-1 when it never closes)."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":  # \{ and \} are literal braces; skip any escaped character
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def find_boxed(text: str | None) -> list[Answer]:
    """Every ``\\boxed{...}`` / ``\\fbox{...}`` answer of ``text``, in order (braces balanced).

    Examples
    --------
    >>> from stepsal_lens.segments.answers import find_boxed
    >>> [a.text for a in find_boxed("$\\\\boxed{\\\\frac{1}{2}}$, then \\\\fbox{\\\\{1, 2\\\\}}")]
    ['\\\\frac{1}{2}', '\\\\{1, 2\\\\}']
    """
    found = []
    text = text or ""
    for s, e in _boxes(text):
        s, e = _trim(text, s, e)
        if s < e:
            found.append(Answer(text[s:e], s, e, "boxed"))
    return found


def _boxes(text: str) -> list[tuple[int, int]]:
    """Spans of the contents of every ``\\boxed{...}`` / ``\\fbox{...}`` (balanced)."""
    spans = []
    for m in _BOX.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            j = closing_brace(text, i)
            if j > 0:
                spans.append((i + 1, j))
        elif i < len(text):  # "\boxed 5"
            n = re.match(r"[^\s$.,]+", text[i:])
            if n:
                spans.append((i, i + n.end()))
    return spans


_WRAP_OPEN = ("**", "$$", "$", "\\(", "\\[", "*", "`", ":", "\\displaystyle")


_WRAP_CLOSE = ("**", "$$", "$", "\\)", "\\]", "*", "`", ".", ",", ";", ":")


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    """Shrink ``[a, b)`` past blanks, markdown emphasis and math delimiters."""
    changed = True
    while changed and a < b:
        changed = False
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        for w in _WRAP_OPEN:
            if text.startswith(w, a) and a + len(w) <= b:
                a += len(w)
                changed = True
                break
        for w in _WRAP_CLOSE:
            if b - len(w) >= a and text[b - len(w):b] == w and not text[:b].endswith("\\" + w):
                b -= len(w)
                changed = True
                break
    return a, b


_MARKER = re.compile(
    r"(?:\bfinal\s+answer\b(?:\s*\*{1,2})?(?:\s*(?:is|:|：|=))?"
    r"|\b(?:correct\s+(?:answer|option|choice)|best\s+answer|answer)\b(?:\s*\*{1,2})?"
    r"\s*(?:is|would\s+be|should\s+be|must\s+be|:|：|=)"
    r"|\b(?:I\s+(?:choose|pick|select)|go\s+with)\b)(?:\s*\*{1,2})?", re.IGNORECASE)


_SENTENCE_END = re.compile(r"\.(?:\s|$)|\s+(?:since|because|as|which)\s", re.IGNORECASE)


def _eol(text: str, start: int) -> int:
    """End of the line at ``start`` (LF, CRLF or a lone CR), or the end of the text."""
    m = re.compile(r"[\r\n]").search(text, start)
    return m.start() if m else len(text)


def _after_marker(text: str, m: re.Match) -> tuple[int, int] | None:
    """The answer following a marker: the rest of its sentence, or the next lines."""
    eol = _eol(text, m.end())
    s, e = _trim(text, m.end(), eol)
    if s >= e:  # "**Final Answer**\n\n$$\n204\n$$": take the next line or display block
        rest = text[eol:]
        block = re.match(r"\s*(?:\$\$|\\\[)(.*?)(?:\$\$|\\\])", rest, re.DOTALL)
        line = block or re.match(r"\s*([^\r\n]+)", rest)
        if not line:
            return None
        return _trim(text, eol + line.start(1), eol + line.end(1))
    cut = _SENTENCE_END.search(text, s, e)  # "42. I hope it is correct."
    if cut:
        s, e = _trim(text, s, cut.start())
    return (s, e) if s < e else None


def _math_after_marker(text: str, m: re.Match) -> tuple[int, int] | None:
    a = m.end()
    eol = _eol(text, a)
    head = text[a:eol]
    stripped = head.lstrip(" *:")
    offset = a + len(head) - len(stripped)
    for pat in (r"\$\$(.+?)\$\$", r"\$(.+?)\$", r"\\\((.+?)\\\)", r"\\\[(.+?)\\\]"):
        mm = re.match(pat, stripped)
        if mm:
            return _trim(text, offset + mm.start(1), offset + mm.end(1))
    return _after_marker(text, m)


def _last_line_math(text: str) -> tuple[int, int] | None:
    lines = [(mm.start(), mm.end()) for mm in re.finditer(r"[^\r\n]*\S[^\r\n]*", text)]
    if not lines:
        return None
    a, b = lines[-1]
    line = text[a:b]
    maths = list(re.finditer(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", line))
    if maths:
        mm = maths[-1]
        g = next(i for i in range(1, 5) if mm.group(i) is not None)
        return _trim(text, a + mm.start(g), a + mm.end(g))
    nums = list(re.finditer(r"-?\d+(?:[.,]\d+)*(?:/\d+)?", line))
    if nums:
        return a + nums[-1].start(), a + nums[-1].end()
    return None


# a letter that is a whole token: not part of a word, not "I think"
_LETTER = r"([A-J])(?![A-Za-z0-9'’])(?!(?<=I)\s+[a-z])"


_LETTER_BOX = re.compile(  # boxed content: "C", "(C)", "\text{(D)}", "B) 3.5 eV"
    r"\W*?(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?\W*(?:(?:option|choice)\s*)?\(?"
    + _LETTER + r"\)?(?:[\s\]}.:),;*$]|$)")


_LETTER_LINE = re.compile(r"\W*?(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?\W*\(?"
                          + _LETTER + r"\)?\W*")


_LETTER_LEAD = re.compile(  # after a marker: "**(B)**", " option C", "\textbf{D}"
    r"[\s*_:$({\[]*(?:(?:therefore|thus|clearly|then|probably|likely),?\s+)?"
    r"[\s*_:$({\[]*(?:\\(?:text|textbf|mathrm|mathbf|boxed)\s*\{[\s(]*)?"
    r"(?:(?:option|choice)\s*)?\(?" + _LETTER)


def _letter_span(pattern: re.Pattern, text: str, a: int, b: int) -> tuple[int, int] | None:
    m = (pattern.fullmatch if pattern is _LETTER_LINE else pattern.match)(text[a:b])
    return (a + m.start(1), a + m.end(1)) if m else None


def _choice(text: str) -> Answer | None:
    for s, e in reversed(_boxes(text)):
        span = _letter_span(_LETTER_BOX, text, s, e)
        if span:
            return Answer(text[span[0]:span[1]], *span, "boxed")
    for m in reversed(list(_MARKER.finditer(text))):
        lead = _LETTER_LEAD.match(text, m.end())
        if lead:
            return Answer(lead.group(1), lead.start(1), lead.end(1), "marker")
    lines = [(mm.start(), mm.end()) for mm in re.finditer(r"[^\r\n]*\S[^\r\n]*", text)]
    if lines:
        span = _letter_span(_LETTER_LINE, text, *lines[-1])
        if span:
            return Answer(text[span[0]:span[1]], *span, "last-line")
    found = list(re.finditer(r"\(([A-J])\)", text))
    if found:
        m = found[-1]
        return Answer(m.group(1), m.start(1), m.end(1), "letter")
    return None


def find_answer(text: str | None, kind: str = "math") -> Answer | None:
    """The final answer in ``text`` with its character span, or None.

    Parameters
    ----------
    text
        Model text: a summary, or a whole completion.
    kind
        ``"math"`` (the last boxed answer, else the last "answer is" / "Final answer:",
        else the last formula or number of the last line) or ``"choice"`` (a letter A-J).

    Returns
    -------
    Answer or None
        ``text[answer.start:answer.end] == answer.text``.

    Examples
    --------
    >>> from stepsal_lens.segments.answers import find_answer
    >>> text = "So $x = \\\\boxed{\\\\frac{1}{2}}$."
    >>> a = find_answer(text)
    >>> a.text, a.style, text[a.start:a.end] == a.text
    ('\\\\frac{1}{2}', 'boxed', True)
    >>> find_answer("The answer is A, not B.", kind="choice").text
    'A'
    """
    check_kind(kind)
    if not text:
        return None
    if kind == "choice":
        return _choice(text)
    boxes = find_boxed(text)
    if boxes:
        return boxes[-1]
    for m in reversed(list(_MARKER.finditer(text))):
        span = _math_after_marker(text, m)
        if span and span[0] < span[1]:
            return Answer(text[span[0]:span[1]], *span, "marker")
    span = _last_line_math(text)
    if span and span[0] < span[1]:
        return Answer(text[span[0]:span[1]], *span, "last-line")
    return None


def split_top(s: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets and braces."""
    parts, depth, cur = [], 0, []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            cur.append(s[i:i + 2])
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts]


