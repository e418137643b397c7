"""Reasoning formats: how a model's prompt, thinking and summary are written down.

A :class:`ReasoningFormat` builds the generation prompt for a question, renders a full
trace from (question, thinking, summary), and parses a decoded text back into the three
segments with their character spans. Formats are looked up by name with
:func:`get_format`; :func:`register_format` adds your own.

Examples
--------
>>> from stepsal_lens.segments.formats import get_format
>>> fmt = get_format("deepseek-r1")
>>> text = fmt.render("What is 2+2?", "Two plus two is four.", "The answer is 4.")
>>> parsed = fmt.parse(text)
>>> parsed.thinking, parsed.summary, parsed.truncated
('Two plus two is four.', 'The answer is 4.', False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stepsal_lens._registry import Registry
from stepsal_lens.errors import StepSalError

__all__ = [
    "ReasoningFormat",
    "ParsedText",
    "get_format",
    "list_formats",
    "lstrip_span",
    "register_format",
    "strip_span",
]

Span = tuple[int, int]


@dataclass(frozen=True)
class ParsedText:
    """A decoded text cut into question / thinking / summary.

    Spans are ``(start, end)`` character offsets into ``text`` (end exclusive) and cover
    the segment's content with surrounding whitespace stripped.
    ``truncated`` is True when the thinking segment never closed (the summary is then
    empty and its span is ``(len(text), len(text))``).

    The thinking may be several pieces of text with template markers between them
    (harmony writes one analysis message after another): ``thinking_spans`` lists them,
    in order, and ``thinking_span`` covers them all (markers between them included). By
    default it is the one piece ``thinking_span`` (none when that is empty).

    >>> p = ParsedText("Q: a. T: b. c. S: d.", (3, 5), (9, 14), (18, 20),
    ...                thinking_spans=((9, 11), (12, 14)))
    >>> p.thinking, p.segment_spans("thinking"), p.segment_spans("summary")
    ('b.\\n\\nc.', ((9, 11), (12, 14)), ((18, 20),))
    """

    text: str
    question_span: Span
    thinking_span: Span
    summary_span: Span
    truncated: bool = False
    thinking_spans: tuple[Span, ...] = ()

    def __post_init__(self) -> None:
        if not self.thinking_spans and self.thinking_span[0] < self.thinking_span[1]:
            object.__setattr__(self, "thinking_spans", (self.thinking_span,))

    def segment_spans(self, segment: str) -> tuple[Span, ...]:
        """The non-empty character spans of one segment's content, in order."""
        if segment == "thinking":
            return self.thinking_spans
        span = {"question": self.question_span, "summary": self.summary_span}.get(segment)
        if span is None:
            raise StepSalError(f"unknown segment {segment!r}; choose one of "
                               f"('question', 'thinking', 'summary')")
        return (span,) if span[0] < span[1] else ()

    @property
    def question(self) -> str:
        return self.text[slice(*self.question_span)]

    @property
    def thinking(self) -> str:
        """The thinking text; several pieces are joined by a blank line."""
        if len(self.thinking_spans) > 1:
            return "\n\n".join(self.text[a:b] for a, b in self.thinking_spans)
        return self.text[slice(*self.thinking_span)]

    @property
    def summary(self) -> str:
        return self.text[slice(*self.summary_span)]


def strip_span(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def lstrip_span(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    return start, end


@dataclass(frozen=True)
class ReasoningFormat:
    """Markers of one reasoning format.

    The rendered text is
    ``prefix + user_open + question + user_close + assistant_open + think_open + thinking
    + think_close + summary + eos`` (with the fixed separators below). Each marker is a
    plain string; the tokenizer of a real model has them as special tokens.

    Parameters
    ----------
    name
        Registry name.
    user_open, user_close
        Text around the question.
    assistant_open
        Text that opens the assistant turn (ends the generation prompt unless
        ``prompt_opens_thinking``).
    think_open, think_close
        Markers around the thinking segment.
    summary_open
        Text between ``think_close`` and the summary (e.g. harmony's final channel).
    eos
        Markers that end the summary (the first is written by :meth:`render`).
    prefix
        Text before the user turn (BOS string, system message).
    prompt_opens_thinking
        Whether the generation prompt already contains ``think_open`` (DeepSeek-R1 and
        QwQ templates do; Qwen3 lets the model write it).
    special_tokens
        Markers that must each be one token of the model's tokenizer
        (:meth:`check_tokenizer`); a format whose markers a tokenizer splits does not
        describe that model.
    description
        One line for :func:`list_formats`.

    Notes
    -----
    Where the model's tokenizer carries a chat template, the template is the truth
    for the prompt (:meth:`chat_prompt`); these markers are the fallback and equal it
    where both exist (tested on the real tokenizers).
    """

    name: str
    user_open: str
    user_close: str
    assistant_open: str
    think_open: str
    think_close: str
    summary_open: str = "\n\n"
    eos: tuple[str, ...] = ()
    prefix: str = ""
    prompt_opens_thinking: bool = True
    special_tokens: tuple[str, ...] = ()
    description: str = ""

    # ---- building text -------------------------------------------------------------
    def prompt(self, question: str) -> str:
        """The generation prompt for ``question`` (what the model continues)."""
        text = self.prefix + self.user_open + question + self.user_close + self.assistant_open
        if self.prompt_opens_thinking:
            text += self.think_open
        return text

    def chat_prompt(self, question: str, tokenizer: Any = None, *, system: str | None = None,
                    reasoning_effort: str | None = None) -> str:
        """The generation prompt the model really gets: the tokenizer's chat template
        (``apply_chat_template(..., add_generation_prompt=True)``) where it has one,
        else :meth:`prompt`.

        Parameters
        ----------
        question
            The user message.
        tokenizer
            The model's tokenizer; its chat template, if any, writes the prompt.
        system
            A system message before the question (needs a chat template, except for
            gpt-oss, whose format writes it as harmony's developer message).
        reasoning_effort
            ``"low"``, ``"medium"`` or ``"high"``: gpt-oss only (harmony's system
            message); other formats refuse it.
        """
        if reasoning_effort is not None:
            raise StepSalError(
                f"format {self.name!r} has no reasoning effort; it is a gpt-oss (harmony) "
                f"setting - drop reasoning_effort= or use format='gpt-oss'")
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": question}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        if system:
            raise StepSalError(
                f"format {self.name!r} writes no system message without a chat template; "
                f"use the model's tokenizer (one with tokenizer.chat_template) to pass system=")
        return self.prompt(question)

    @property
    def stop_markers(self) -> tuple[str, ...]:
        """Markers that end a generation (the first of :attr:`eos`)."""
        return self.eos[:1]

    def render(self, question: str, thinking: str, summary: str, *, eos: bool = True,
               tokenizer: Any = None) -> str:
        """A full trace as the model would see it, from its three segments.

        The prompt is :meth:`chat_prompt` (the tokenizer's chat template where it has
        one); ``think_open`` follows unless the prompt already ends with it.
        """
        for label, value in (("question", question), ("thinking", thinking)):
            if not value or not value.strip():
                raise StepSalError(
                    f"the {label} segment is empty ({value!r}); a trace needs a non-empty "
                    f"question and thinking segment"
                )
        text = self.chat_prompt(question, tokenizer)
        if self.prompt_opens_thinking and text.endswith(self.think_open):
            text = text[: -len(self.think_open)]
        text += self.think_open + thinking + self.think_close + self.summary_open + summary
        if eos and self.eos:
            text += self.eos[0]
        return text

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer that splits one of :attr:`special_tokens`."""
        split = {m: len(tokenizer(m, add_special_tokens=False)["input_ids"])
                 for m in self.special_tokens}
        split = {m: n for m, n in split.items() if n != 1}
        if split:
            raise StepSalError(
                f"format {self.name!r} does not fit this tokenizer: its markers "
                f"{sorted(split)} are not single tokens (they split into {sorted(split.values())} "
                f"tokens), so the model never wrote them; choose the model's own format "
                f"(one of {list_formats()}) or leave format= unset to detect it"
            )

    # ---- parsing -------------------------------------------------------------------
    def parse(self, text: str) -> ParsedText:
        """Cut a full decoded text (prompt + completion) into its three segments.

        A text whose thinking never closes is all thinking: ``truncated`` is True and the
        summary is empty. Raises :class:`StepSalError` when a marker the format needs is
        missing or the thinking is empty.
        """
        # The prefix (BOS, system message) is optional: decoders and templates vary.
        q_start = self._find(text, self.user_open, 0, "user turn") + len(self.user_open)
        # Think markers are matched without their whitespace: models vary there.
        think_open, think_close = self.think_open.strip(), self.think_close.strip()
        t_open = self._find(text, think_open, q_start, "thinking")
        # The last user_close before the thinking ends the question, so questions may
        # contain newlines (think-tags closes the question with one).
        q_end = text.rfind(self.user_close, q_start, t_open)
        if q_end < 0:
            self._find(text[q_start:t_open], self.user_close, 0, "end of the user turn")
        t_start = t_open + len(think_open)
        t_close = text.find(think_close, t_start)
        truncated = t_close < 0
        if truncated:
            t_end = self._eos_position(text, t_start)
            s_span = (len(text), len(text))
        else:
            t_end = t_close
            s_start = t_close + len(think_close)
            if self.summary_open.strip():
                opened = text.find(self.summary_open, s_start)
                if opened >= 0:
                    s_start = opened + len(self.summary_open)
            s_span = strip_span(text, s_start, self._eos_position(text, s_start))
        t_span = strip_span(text, t_start, t_end)
        if t_span[0] == t_span[1]:
            raise StepSalError(
                f"the thinking segment is empty in a {self.name!r} text; a trace needs at "
                f"least one thinking step (text starts {text[:80]!r})"
            )
        q_span = strip_span(text, q_start, q_end)
        if q_span[0] == q_span[1]:
            raise StepSalError(f"the question is empty in a {self.name!r} text (text starts {text[:80]!r})")
        return ParsedText(text, q_span, t_span, s_span, truncated)

    def regions(self, text: str) -> dict[str, Span]:
        """Where each segment's content lies in a text that may still be growing.

        Unlike :meth:`parse` this never raises, and a region only grows as text is
        appended: it starts at the first non-space character after its opening marker
        and ends at its closing marker (or the end of the text while the segment is
        open). A segment not opened yet is ``(len(text), len(text))``. The question is
        read from a complete prompt.

        >>> get_format("think-tags").regions("What is 2+2?\\n<think>\\nTwo plus")
        {'question': (0, 12), 'thinking': (21, 29), 'summary': (29, 29)}
        """
        n = len(text)
        closed = (n, n)
        q_open = text.find(self.user_open)
        if q_open < 0:
            return {"question": closed, "thinking": closed, "summary": closed}
        q_start = q_open + len(self.user_open)
        think_open, think_close = self.think_open.strip(), self.think_close.strip()
        t_open = text.find(think_open, q_start)
        stop = t_open if t_open >= 0 else (text.find(self.assistant_open, q_start)
                                           if self.assistant_open else -1)
        q_end = text.rfind(self.user_close, q_start, stop if stop >= 0 else n)
        question = strip_span(text, q_start, q_end if q_end >= 0 else n)
        if t_open < 0:
            return {"question": question, "thinking": closed, "summary": closed}
        t_start = t_open + len(think_open)
        t_close = text.find(think_close, t_start)
        if t_close < 0:
            return {"question": question,
                    "thinking": lstrip_span(text, t_start, self._eos_position(text, t_start)),
                    "summary": closed}
        s_start = t_close + len(think_close)
        if self.summary_open.strip():
            opened = text.find(self.summary_open, s_start)
            if opened < 0:
                return {"question": question, "thinking": lstrip_span(text, t_start, t_close),
                        "summary": closed}
            s_start = opened + len(self.summary_open)
        return {"question": question, "thinking": lstrip_span(text, t_start, t_close),
                "summary": lstrip_span(text, s_start, self._eos_position(text, s_start))}

    def segment_regions(self, text: str) -> list[tuple[str, Span]]:
        """:meth:`regions` as a list of ``(segment, span)`` pairs, in text order.

        A segment may have several regions (gpt-oss writes one analysis message after
        another); the streaming :class:`~stepsal_lens.SegmentTracker` reads this.

        >>> get_format("think-tags").segment_regions("What is 2+2?\\n<think>\\nTwo")
        [('question', (0, 12)), ('thinking', (21, 24)), ('summary', (24, 24))]
        """
        return list(self.regions(text).items())

    def _find(self, text: str, marker: str, start: int, what: str) -> int:
        pos = text.find(marker, start)
        if pos < 0:
            raise StepSalError(
                f"marker {marker!r} ({what}) not found in the text for format {self.name!r} "
                f"(text starts {text[:80]!r}); pass the full decoded text including the "
                f"prompt, or choose the right format (one of {list_formats()})"
            )
        return pos

    def _eos_position(self, text: str, start: int) -> int:
        hits = [p for p in (text.find(m, start) for m in self.eos if m) if p >= 0]
        return min(hits) if hits else len(text)


_FORMATS: Registry[ReasoningFormat] = Registry(
    "reasoning format", "register your own with stepsal_lens.register_format")


def register_format(fmt: ReasoningFormat, *, overwrite: bool = False) -> ReasoningFormat:
    """Add a format to the registry (``overwrite=True`` to replace one)."""
    return _FORMATS.register(fmt.name, fmt, overwrite=overwrite)


def get_format(name: str | ReasoningFormat) -> ReasoningFormat:
    """Look a format up by name (a :class:`ReasoningFormat` passes through)."""
    return name if isinstance(name, ReasoningFormat) else _FORMATS.get(name)


def list_formats() -> list[str]:
    """Names of the registered formats."""
    return _FORMATS.names()


_CHATML = dict(
    special_tokens=("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    user_open="<|im_start|>user\n",
    user_close="<|im_end|>\n",
    assistant_open="<|im_start|>assistant\n",
    think_open="<think>\n",
    think_close="\n</think>",
    eos=("<|im_end|>", "<|endoftext|>"),
)

register_format(ReasoningFormat(
    name="deepseek-r1",
    prefix="<｜begin▁of▁sentence｜>",
    user_open="<｜User｜>",
    user_close="<｜Assistant｜>",
    assistant_open="",
    think_open="<think>\n",
    think_close="\n</think>",
    eos=("<｜end▁of▁sentence｜>",),
    special_tokens=("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
                    "<｜end▁of▁sentence｜>"),
    description="DeepSeek-R1 and its distills (Qwen, Llama)",
))
register_format(ReasoningFormat(name="qwq", description="QwQ-32B (chatml, prompt opens <think>)",
                                **_CHATML))
register_format(ReasoningFormat(name="qwen3", prompt_opens_thinking=False,
                                description="Qwen3 in thinking mode (chatml; the model writes <think>)",
                                **_CHATML))
register_format(ReasoningFormat(
    name="think-tags",
    user_open="",
    user_close="\n",
    assistant_open="",
    think_open="<think>\n",
    think_close="\n</think>",
    eos=("<|endoftext|>",),
    special_tokens=("<think>", "</think>"),
    description="any model that writes <think>...</think> after a plain question line",
))

# gpt-oss's harmony format has its own module (several analysis messages, tool calls,
# system/developer messages); it builds on the classes above and registers itself
# (stepsal_lens/segments/__init__.py imports it, so it is there whenever this module is).
