"""gpt-oss's harmony format: its prompt, its messages, and how they map to segments.

gpt-oss writes *messages*, ``<|start|>{header}<|message|>{content}{end}``, where the
header names the role and the channel (``assistant<|channel|>analysis``) and the end is
``<|end|>``, ``<|return|>`` (the answer is done) or ``<|call|>`` (a tool call waits for
its result). After the question the model may write several ``analysis`` messages (its
thinking), ``commentary`` messages (tool calls, preambles) and one ``final`` message
(the answer). :class:`HarmonyFormat` (registered as ``"gpt-oss"``) maps them onto
question / thinking / summary:

- the question is the last user message that an assistant message follows;
- every analysis message after it is thinking (each one a run of steps; the markers
  between two of them belong to no step), except one addressed to a tool (``to=python``);
- the first final message is the summary (none: the trace is truncated, unless the
  model stopped at a tool call);
- commentary messages, tool results and every header stay in the text but in no step.

The prompt equals gpt-oss's official chat template and ``openai-harmony``'s
``render_conversation_for_completion`` (tested on the real tokenizer): a system message
with the model identity, knowledge cutoff, current date, reasoning effort and valid
channels; an optional developer message; the user message; ``<|start|>assistant``. The
model chooses its channel itself.

Examples
--------
>>> from stepsal_lens import get_format
>>> fmt = get_format("gpt-oss").with_options(current_date="2025-08-05")
>>> prompt = fmt.prompt("What is 2+2?")
>>> print(prompt.replace("<|end|>", "<|end|>\\n"))  # doctest: +NORMALIZE_WHITESPACE
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-08-05
<BLANKLINE>
Reasoning: medium
<BLANKLINE>
# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
<|start|>user<|message|>What is 2+2?<|end|>
<|start|>assistant
>>> completion = ("<|channel|>analysis<|message|>Two plus two is four.<|end|>"
...               "<|start|>assistant<|channel|>analysis<|message|>Check: yes, four.<|end|>"
...               "<|start|>assistant<|channel|>final<|message|>4<|return|>")
>>> parsed = fmt.parse(prompt + completion)
>>> [parsed.text[a:b] for a, b in parsed.thinking_spans], parsed.summary
(['Two plus two is four.', 'Check: yes, four.'], '4')
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepsal_lens.errors import StepSalError
from stepsal_lens.segments.formats import (ParsedText, ReasoningFormat, lstrip_span,
                                           register_format, strip_span)

__all__ = [
    "DEFAULT_MODEL_IDENTITY",
    "HarmonyFormat",
    "HarmonyMessage",
    "KNOWLEDGE_CUTOFF",
    "REASONING_EFFORTS",
    "harmony_encoding",
    "harmony_messages",
]

Span = tuple[int, int]

START, MESSAGE, CHANNEL = "<|start|>", "<|message|>", "<|channel|>"
#: Markers that close a message: ``<|end|>`` (more may follow), ``<|return|>`` (the
#: answer is done), ``<|call|>`` (a tool call waits for its result).
END_MARKERS = ("<|end|>", "<|return|>", "<|call|>")
REASONING_EFFORTS = ("low", "medium", "high")
#: The system message's defaults, as gpt-oss's chat template and openai-harmony write them.
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
_CHANNELS_LINE = ("# Valid channels: analysis, commentary, final. Channel must be included "
                  "for every message.")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TEMPLATE_DATE = re.compile(r"(\nCurrent date: )\d{4}-\d{2}-\d{2}(\n)")
_ROLE = re.compile(r"[^\s<]*")
_CHANNEL_RE = re.compile(re.escape(CHANNEL) + r"([^\s<]*)")
_RECIPIENT_RE = re.compile(r"(?:^|\s)to=([^\s<]+)")


@dataclass(frozen=True)
class HarmonyMessage:
    """One harmony message of a text, as :func:`harmony_messages` finds it.

    Attributes
    ----------
    role
        The header's first word: ``system``, ``developer``, ``user``, ``assistant``, or
        a tool's name for a tool result (``functions.get_weather``).
    channel
        ``analysis``, ``commentary``, ``final`` (None without a channel).
    recipient
        The header's ``to=`` target (``functions.get_weather`` for a tool call).
    start
        Offset of the message's ``<|start|>``.
    content
        Character span of the raw content (None while the header is still open); it
        runs to the end of the text while the message is open.
    end
        The marker that closed the message (None while it is open).
    """

    role: str
    channel: str | None
    recipient: str | None
    start: int
    content: Span | None
    end: str | None


def harmony_messages(text: str) -> list[HarmonyMessage]:
    """Cut a harmony text into its messages (the text may end inside one).

    Text before the first ``<|start|>`` is not a message.

    Examples
    --------
    >>> [(m.role, m.channel, m.end) for m in harmony_messages(
    ...     "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>"
    ...     "Hello<|return|>")]
    [('user', None, '<|end|>'), ('assistant', 'final', '<|return|>')]
    """
    out: list[HarmonyMessage] = []
    n = len(text)
    pos = text.find(START)
    while pos >= 0:
        h0 = pos + len(START)
        nxt = text.find(START, h0)
        limit = nxt if nxt >= 0 else n
        m = text.find(MESSAGE, h0, limit)
        header = text[h0:m if m >= 0 else limit]
        content, end = None, None
        if m >= 0:
            c0 = m + len(MESSAGE)
            hits = [(p, e) for e in END_MARKERS if (p := text.find(e, c0, limit)) >= 0]
            if hits:
                p, end = min(hits)
                content = (c0, p)
            else:
                content = (c0, limit)
        channel = _CHANNEL_RE.search(header)
        recipient = _RECIPIENT_RE.search(header)
        out.append(HarmonyMessage(
            role=_ROLE.match(header).group(0),
            channel=channel.group(1) if channel else None,
            recipient=recipient.group(1) if recipient else None,
            start=pos, content=content, end=end))
        pos = nxt
    return out


@dataclass(frozen=True)
class _Turn:
    """The messages of the answered turn: the question and what follows it."""

    question: HarmonyMessage | None
    thinking: list[HarmonyMessage]
    final: HarmonyMessage | None
    rest: list[HarmonyMessage]  # every other message after the question, up to the final


def _turn(text: str) -> _Turn:
    msgs = harmony_messages(text)
    users = [i for i, m in enumerate(msgs) if m.role == "user" and m.content is not None]
    if not users:
        return _Turn(None, [], None, [])
    q = next((i for i in reversed(users) if any(m.role == "assistant" for m in msgs[i + 1:])),
             users[-1])
    thinking: list[HarmonyMessage] = []
    rest: list[HarmonyMessage] = []
    final = None
    for m in msgs[q + 1:]:
        # A message to a tool (`to=functions.x`, `to=python`) is a tool call, whatever
        # its channel: no thinking.
        said = m.role == "assistant" and m.content is not None and m.recipient is None
        if said and m.channel == "analysis":
            thinking.append(m)
        elif said and m.channel == "final":
            final = m
            break
        else:
            rest.append(m)
    return _Turn(msgs[q], thinking, final, rest)


@dataclass(frozen=True)
class HarmonyFormat(ReasoningFormat):
    """gpt-oss's harmony format (registered as ``"gpt-oss"``).

    The marker fields of :class:`~stepsal_lens.segments.formats.ReasoningFormat` describe a
    single analysis message followed by the final one (what :meth:`render` writes);
    :meth:`parse` and :meth:`regions` read any sequence of harmony messages (see the
    module docstring).

    Parameters
    ----------
    reasoning_effort
        ``"low"``, ``"medium"`` (the template's default) or ``"high"``: the system
        message's ``Reasoning:`` line.
    system
        Instructions written as harmony's developer message (``# Instructions``), as
        the official chat template writes a leading system or developer message.
    current_date
        ``"YYYY-MM-DD"`` for the system message's ``Current date:`` line; None writes
        today's date, as the chat template does (fix it for reproducible prompts).
    model_identity
        The system message's first line.

    Notes
    -----
    A variant with other settings: ``fmt.with_options(reasoning_effort="high")``; pass
    it to :func:`~stepsal_lens.load_lrm` (``format=``) and every prompt of that model
    (``generate``, ``Trace.from_segments``) uses it.
    """

    name: str = "gpt-oss"
    user_open: str = "<|start|>user<|message|>"
    user_close: str = "<|end|>"
    assistant_open: str = "<|start|>assistant"
    think_open: str = "<|channel|>analysis<|message|>"
    think_close: str = "<|end|>"
    summary_open: str = "<|start|>assistant<|channel|>final<|message|>"
    eos: tuple[str, ...] = ("<|return|>", "<|end|>", "<|call|>")
    prefix: str = ""
    prompt_opens_thinking: bool = False
    special_tokens: tuple[str, ...] = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                                       "<|return|>")
    description: str = ("gpt-oss harmony (analysis messages = thinking, final message = "
                        "summary, commentary/tool calls in no step)")
    reasoning_effort: str = "medium"
    system: str | None = None
    current_date: str | None = None
    model_identity: str = DEFAULT_MODEL_IDENTITY

    def __post_init__(self) -> None:
        effort = str(self.reasoning_effort).lower()
        if effort not in REASONING_EFFORTS:
            raise StepSalError(f"reasoning_effort {self.reasoning_effort!r} is not one of "
                               f"{REASONING_EFFORTS}")
        object.__setattr__(self, "reasoning_effort", effort)
        if self.current_date is not None and not _DATE.fullmatch(self.current_date):
            raise StepSalError(f"current_date {self.current_date!r} is not a 'YYYY-MM-DD' "
                               f"date (e.g. '2025-08-05')")

    def with_options(self, **options: Any) -> HarmonyFormat:
        """A copy with other prompt settings (``reasoning_effort``, ``system``,
        ``current_date``, ``model_identity``).

        >>> from stepsal_lens import get_format
        >>> get_format("gpt-oss").with_options(reasoning_effort="HIGH").reasoning_effort
        'high'
        """
        allowed = ("reasoning_effort", "system", "current_date", "model_identity")
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise StepSalError(f"unknown gpt-oss prompt option(s) {unknown}; choose from "
                               f"{list(allowed)}")
        return dataclasses.replace(self, **options)

    @property
    def stop_markers(self) -> tuple[str, ...]:
        """``<|return|>`` (the answer is done) and ``<|call|>`` (a tool call waits);
        ``<|end|>`` is no stop: it closes an analysis message and more follow."""
        return ("<|return|>", "<|call|>")

    # ---- the prompt -----------------------------------------------------------------------
    def _settings(self, system, reasoning_effort, current_date, model_identity) -> HarmonyFormat:
        given = {k: v for k, v in (("system", system), ("reasoning_effort", reasoning_effort),
                                   ("current_date", current_date),
                                   ("model_identity", model_identity)) if v is not None}
        return self.with_options(**given) if given else self

    def system_message(self) -> str:
        """The content of the system message (identity, cutoff, date, effort, channels)."""
        date = self.current_date or _dt.date.today().strftime("%Y-%m-%d")
        return (f"{self.model_identity}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}\n"
                f"Current date: {date}\n\nReasoning: {self.reasoning_effort}\n\n"
                f"{_CHANNELS_LINE}")

    def prompt(self, question: str, *, system: str | None = None,
               reasoning_effort: str | None = None, current_date: str | None = None,
               model_identity: str | None = None) -> str:
        """The generation prompt, written as gpt-oss's chat template writes it.

        Keyword arguments override this format's settings for one prompt.
        """
        fmt = self._settings(system, reasoning_effort, current_date, model_identity)
        text = f"<|start|>system<|message|>{fmt.system_message()}<|end|>"
        if fmt.system:
            # The chat template ends the instructions with a blank line (openai-harmony
            # does not; docs/loading.md).
            text += f"<|start|>developer<|message|># Instructions\n\n{fmt.system}\n\n<|end|>"
        return text + f"{self.user_open}{question}{self.user_close}{self.assistant_open}"

    def chat_prompt(self, question: str, tokenizer: Any = None, *, system: str | None = None,
                    reasoning_effort: str | None = None, current_date: str | None = None,
                    model_identity: str | None = None) -> str:
        """The prompt from the tokenizer's chat template where it has one (given this
        format's settings; a fixed ``current_date`` replaces the template's today),
        else :meth:`prompt` - the two are equal."""
        fmt = self._settings(system, reasoning_effort, current_date, model_identity)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return fmt.prompt(question)
        messages = [{"role": "user", "content": question}]
        if fmt.system:
            messages.insert(0, {"role": "system", "content": fmt.system})
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False,
            reasoning_effort=fmt.reasoning_effort, model_identity=fmt.model_identity)
        if fmt.current_date is not None:
            # The template calls strftime_now(), which cannot be passed in: set the date
            # in its output (only in the system message, before the first <|end|>).
            head, sep, tail = text.partition("<|end|>")
            head, n = _TEMPLATE_DATE.subn(rf"\g<1>{fmt.current_date}\g<2>", head, count=1)
            if n != 1:
                raise StepSalError(
                    "the tokenizer's chat template writes no 'Current date: YYYY-MM-DD' line "
                    "in its system message, so current_date= cannot be applied; leave "
                    "current_date unset for this tokenizer")
            text = head + sep + tail
        return text

    # ---- reading texts --------------------------------------------------------------------
    def parse(self, text: str) -> ParsedText:
        """Cut a full harmony text (prompt + completion) into question / thinking /
        summary.

        Each analysis message is one of ``thinking_spans``; the first final message is
        the summary. With no final message the trace is truncated (unless the model
        stopped at a tool call, ``<|call|>``). A final-only completion has no thinking.
        Raises :class:`StepSalError` without a user message or an assistant message
        after it.
        """
        n = len(text)
        turn = _turn(text)
        if turn.question is None:
            raise StepSalError(
                f"no user message ({self.user_open!r}) in the text for format {self.name!r} "
                f"(text starts {text[:80]!r}); pass the full decoded text including the prompt")
        q_span = strip_span(text, *turn.question.content)
        if q_span[0] == q_span[1]:
            raise StepSalError(f"the question is empty in a {self.name!r} text (text starts "
                               f"{text[:80]!r})")
        answered = [m for m in (*turn.thinking, turn.final, *turn.rest)
                    if m is not None and m.role == "assistant" and m.content is not None]
        if not answered:
            raise StepSalError(
                f"no assistant message after the question in a {self.name!r} text (it ends "
                f"{text[-80:]!r}); pass the prompt together with the model's completion")
        thinking = tuple(s for s in (strip_span(text, *m.content) for m in turn.thinking)
                         if s[0] < s[1])
        if turn.final is not None:
            s_span = strip_span(text, *turn.final.content)
            truncated = False
        else:
            s_span = (n, n)
            truncated = max(answered, key=lambda m: m.start).end != "<|call|>"
        if thinking:
            t_span = (thinking[0][0], thinking[-1][1])
        else:
            t_span = (s_span[0], s_span[0])
        return ParsedText(text, q_span, t_span, s_span, truncated, thinking_spans=thinking)

    def segment_regions(self, text: str) -> list[tuple[str, Span]]:
        """Where the question, each analysis message and the final message lie in a
        text that may still be growing (see :meth:`regions`); never raises.

        Examples
        --------
        >>> from stepsal_lens import get_format
        >>> fmt = get_format("gpt-oss")
        >>> text = ("<|start|>user<|message|>Hi?<|end|><|start|>assistant<|channel|>analysis"
        ...         "<|message|>A.<|end|><|start|>assistant<|channel|>analysis<|message|>B")
        >>> [(name, text[a:b]) for name, (a, b) in fmt.segment_regions(text)]
        [('question', 'Hi?'), ('thinking', 'A.'), ('thinking', 'B')]
        """
        n = len(text)
        turn = _turn(text)
        if turn.question is None:
            return [("question", (n, n))]
        out = [("question", strip_span(text, *turn.question.content))]
        out += [("thinking", lstrip_span(text, *m.content)) for m in turn.thinking]
        if turn.final is not None:
            out.append(("summary", lstrip_span(text, *turn.final.content)))
        return out

    def regions(self, text: str) -> dict[str, Span]:
        """Like :meth:`ReasoningFormat.regions`; the thinking region covers every
        analysis message (markers between them included) - :meth:`segment_regions`
        lists them one by one."""
        n = len(text)
        closed = (n, n)
        out = {"question": closed, "thinking": closed, "summary": closed}
        thinking = []
        for name, span in self.segment_regions(text):
            if name == "thinking":
                thinking.append(span)
            else:
                out[name] = span
        if thinking:
            out["thinking"] = (thinking[0][0], thinking[-1][1])
        return out


# ---- openai-harmony, offline ----------------------------------------------------------------

_VOCAB_FILE = "o200k_base.tiktoken"
_VOCAB_ENV = "TIKTOKEN_ENCODINGS_BASE"


def harmony_encoding(vocab_dir: str | Path | None = None):
    """``openai-harmony``'s gpt-oss encoding, loaded from a local vocabulary file.

    openai-harmony downloads ``o200k_base.tiktoken`` at first use unless the
    environment variable ``TIKTOKEN_ENCODINGS_BASE`` names a folder holding it (it then
    checks the file's sha256). This sets that variable only while loading and restores
    it afterwards; the encoding is cached per folder.

    Parameters
    ----------
    vocab_dir
        Folder with ``o200k_base.tiktoken``. Default: ``$TIKTOKEN_ENCODINGS_BASE`` if
        set, else the real gpt-oss tokenizer folder that ``python -m
        stepsal_lens.zoo.real_tokenizers`` builds (rebuilt offline from gpt-oss's
        ``tokenizer.json``).

    Returns
    -------
    openai_harmony.HarmonyEncoding
    """
    try:
        import openai_harmony  # noqa: F401
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise StepSalError("openai-harmony is not installed; `pip install openai-harmony`") from err
    if vocab_dir is None:
        from stepsal_lens.zoo.real_tokenizers import tokenizers_root

        vocab_dir = os.environ.get(_VOCAB_ENV) or tokenizers_root() / "gpt-oss"
    folder = Path(vocab_dir).resolve()
    if not (folder / _VOCAB_FILE).is_file():
        raise StepSalError(
            f"no {_VOCAB_FILE} in {str(folder)!r}, which openai-harmony needs (offline it "
            f"cannot download it); build it with `python -m stepsal_lens.zoo.real_tokenizers "
            f"--out DIR` and pass vocab_dir=DIR/gpt-oss (or set {_VOCAB_ENV} to that folder)")
    return _load_encoding(str(folder))


@functools.lru_cache(maxsize=4)
def _load_encoding(folder: str):
    import openai_harmony

    before = os.environ.get(_VOCAB_ENV)
    os.environ[_VOCAB_ENV] = folder
    try:
        return openai_harmony.load_harmony_encoding(
            openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as err:  # openai_harmony.HarmonyError and friends
        raise StepSalError(f"openai-harmony could not load {_VOCAB_FILE} from {folder!r}: "
                           f"{err}; rebuild it with `python -m "
                           f"stepsal_lens.zoo.real_tokenizers --force`") from err
    finally:
        if before is None:
            del os.environ[_VOCAB_ENV]
        else:
            os.environ[_VOCAB_ENV] = before


register_format(HarmonyFormat())
