"""Trace: a reasoning text cut into question / thinking steps / summary steps, per token.

Step boundaries are character offsets; they are mapped onto the exact token ids the
model sees through the fast tokenizer's offset mapping (never by re-tokenising step
texts, which misaligns at boundaries).

Examples
--------
>>> import tempfile
>>> from stepsal_lens import Trace, load_lrm
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp()), format="think-tags")
>>> trace = Trace.from_segments(
...     "Start with 7. Add 5. What is the result?",
...     "We start with the number 7. Adding 5 to 7 gives 12.",
...     "The result is 12.",
...     model,
... )
>>> [(s.segment, s.text) for s in trace.steps]  # doctest: +NORMALIZE_WHITESPACE
[('question', 'Start with 7. Add 5. What is the result?'),
 ('thinking', 'We start with the number 7.'), ('thinking', 'Adding 5 to 7 gives 12.'),
 ('summary', 'The result is 12.')]
>>> trace.decode_step(2)
'Adding 5 to 7 gives 12.'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stepsal_lens._checks import check_type
from stepsal_lens.errors import StepSalError
from stepsal_lens.segments.association import format_of, info_of
from stepsal_lens.fingerprint import tokenizer_fingerprint
from stepsal_lens.segments.formats import ParsedText, ReasoningFormat, get_format, list_formats
from stepsal_lens.segments.splitters import Span, Splitter, get_splitter

__all__ = [
    "SEGMENTS",
    "Detokenizer",
    "Step",
    "Trace",
    "check_fits",
    "check_trace",
]

SEGMENTS = ("question", "thinking", "summary")


@dataclass(frozen=True)
class Step:
    """One step of a trace.

    ``char_span`` indexes :attr:`Trace.text`; ``token_span`` indexes
    :attr:`Trace.token_ids` (end exclusive, BOS included in the numbering).
    """

    index: int
    segment: str
    text: str
    char_span: Span
    token_span: Span

    @property
    def n_tokens(self) -> int:
        return self.token_span[1] - self.token_span[0]

    def to_dict(self) -> dict[str, Any]:
        """The JSON record result files write for a step."""
        return {"index": self.index, "segment": self.segment, "text": self.text,
                "token_start": self.token_span[0], "token_end": self.token_span[1],
                "char_start": self.char_span[0], "char_end": self.char_span[1]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Step:
        """Inverse of :meth:`to_dict` (char spans -1 where a file has none)."""
        return cls(d["index"], d["segment"], d["text"],
                   (d.get("char_start", -1), d.get("char_end", -1)),
                   (d["token_start"], d["token_end"]))


# ---- the trace ---------------------------------------------------------------------------

def _tokenizer_of(model_or_tokenizer: Any):
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    return tok if tok is not None else model_or_tokenizer


class Detokenizer:
    """Incremental decoding that gives every token its character span.

    Used when the token ids are fixed (generated) rather than re-tokenised from text. A
    token that ends inside a multi-byte character gets an empty span; the token that
    completes the character gets it.

    Examples
    --------
    >>> from stepsal_lens.zoo.tiny_random import train_tokenizer
    >>> tok = train_tokenizer()
    >>> d = Detokenizer(tok)
    >>> enc = tok("Seven plus five.", add_special_tokens=False, return_offsets_mapping=True)
    >>> spans = [d.push(i) for i in enc["input_ids"]]
    >>> d.text, [d.text[a:b] for a, b in spans][:6]
    ('Seven plus five.', ['S', 'e', 'v', 'en', ' ', 'p'])
    """

    # Decoding a few tokens of left context reproduces merges such as leading spaces.
    _CONTEXT = 4

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decoding context
        self._read = 0  # tokens before this are already in self.text
        self._before: str | None = ""  # decode(ids[_prefix:_read]) when known

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> Span:
        """Append one token; returns its ``(start, end)`` span in :attr:`text`."""
        self.ids.append(int(token_id))
        if self._before is None:
            self._before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        start = len(self.text)
        if len(after) > len(self._before) and not after.endswith("\ufffd"):
            self.text += after[len(self._before):]
            self._read = len(self.ids)
            if self._read - self._prefix > 2 * self._CONTEXT:  # slide the context
                self._prefix, self._before = self._read - self._CONTEXT, None
            else:
                self._before = after
        return start, len(self.text)


class Trace:
    """A reasoning trace aligned to tokens.

    Build one with :meth:`from_text` (a full decoded text, parsed with the format) or
    :meth:`from_segments` (question, thinking and summary strings, rendered with the
    format).

    Attributes
    ----------
    text : str
        The full text (prompt template included).
    token_ids : torch.LongTensor
        ``[n_tokens]``, exactly what the model sees (BOS included where the model
        prepends one).
    offsets : list[tuple[int, int]]
        Character span of each token in ``text`` (``(0, 0)`` for a prepended BOS).
    steps : list[Step]
        In order: the question (step 0), thinking steps, summary steps.
    truncated : bool
        The thinking never closed, so there is no summary.
    tokenizer_fingerprint : str or None
        The fingerprint of the tokenizer that cut the trace
        (:func:`~stepsal_lens.fingerprint.tokenizer_fingerprint`); functions that
        run a model on the trace refuse a model whose tokenizer differs
        (:meth:`check_tokenizer`). None for a trace read from a file that has none
        (written before fingerprints, or by hand): such a trace is accepted by any model
        whose vocabulary holds its ids.
    model_name : str or None
        The model the trace was made with, when it was made from one.

    Where the text starts with the model's generation prompt, the prompt and the
    completion are tokenised apart, as the model saw them: the prompt as its chat
    template gave it, then the tokens it wrote (a completion starting with a newline
    after a prompt ending with one is two tokens, not one merged token).

    A gpt-oss trace may think in several analysis messages: each is split into steps of
    its own, and the markers between them belong to no step. A final-only gpt-oss
    completion gives a trace without thinking steps.
    """

    def __init__(self, parsed: ParsedText, tokenizer: Any, *, format: ReasoningFormat,
                 splitter: str | Splitter = "paper", prepend_bos: bool = False,
                 n_ctx: int | None = None, step_spans: Sequence[Span] | None = None,
                 token_ids: Sequence[int] | None = None, offsets: Sequence[Span] | None = None,
                 prompt_chars: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise StepSalError(
                f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer, so it has no "
                f"offset mapping to align steps to tokens; load it with "
                f"AutoTokenizer.from_pretrained(path, use_fast=True)"
            )
        self.parsed = parsed
        self.text = parsed.text
        self.format = format
        self.tokenizer = tokenizer
        self.truncated = parsed.truncated
        # the fingerprint: of self.tokenizer, computed when first asked (own = True), or
        # the one a document recorded (own = False; None there means unknown)
        self._fingerprint: str | None = None
        self._own_fingerprint = True
        self.model_name: str | None = None

        if token_ids is None:
            ids, offsets = _tokenize(tokenizer, self.text, prompt_chars)
            offsets = _last_byte_owns_the_character(offsets)
        else:  # fixed ids (e.g. generated) with spans from incremental decoding
            ids, offsets = [int(i) for i in token_ids], [tuple(o) for o in offsets]
        bos = tokenizer.bos_token_id
        self.has_bos = bool(prepend_bos and bos is not None and (not ids or ids[0] != bos))
        if self.has_bos:
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
        if n_ctx is not None and len(ids) > n_ctx:
            raise StepSalError(
                f"the trace has {len(ids)} tokens but the model's context is {n_ctx}; "
                f"shorten the trace (or cut the thinking) - the model would silently "
                f"truncate it"
            )
        self.token_ids = torch.tensor(ids, dtype=torch.long)
        self.offsets: list[Span] = offsets

        char_spans = (self._spans_from_splitter(get_splitter(splitter)) if step_spans is None
                      else self._check_spans(step_spans))
        self.steps = self._align(char_spans)

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, model_or_tokenizer: Any, *, format: str | ReasoningFormat | None = None,
                  splitter: str | Splitter = "paper", prepend_bos: bool | None = None,
                  n_ctx: int | None = None, step_spans: Sequence[Span] | None = None) -> Trace:
        """Parse a full decoded text (prompt included) with the model's format.

        Parameters
        ----------
        text
            The whole text: prompt template, thinking and summary.
        model_or_tokenizer
            A model from :func:`stepsal_lens.load_lrm` (gives tokenizer, format, BOS rule
            and context length) or a fast tokenizer (then pass ``format``).
        format
            Reasoning format name; defaults to the model's.
        splitter
            Step splitter name (:func:`list_splitters`) or callable.
        prepend_bos
            Prepend the tokenizer's BOS id. By default only where the model's chat
            template starts with BOS and the text does not (:func:`template_bos`).
        n_ctx
            Context length to check against (default: the model's).
        step_spans
            Caller-given step character spans into ``text`` instead of a splitter.
        """
        fmt, tok, ctx = _resolve(model_or_tokenizer, format, n_ctx)
        check_fits(text, tok, ctx, "the text")
        parsed = fmt.parse(text)
        prompt = fmt.chat_prompt(parsed.question, tok)
        return _made_with(cls(parsed, tok, format=fmt, splitter=splitter,
                   prepend_bos=_bos_for(text, tok, fmt, prepend_bos), n_ctx=ctx,
                   step_spans=step_spans,
                   prompt_chars=len(prompt) if text.startswith(prompt) else None), model_or_tokenizer)

    @classmethod
    def from_token_ids(cls, token_ids: Sequence[int] | torch.Tensor, model_or_tokenizer: Any, *,
                       format: str | ReasoningFormat | None = None,
                       splitter: str | Splitter = "paper", n_ctx: int | None = None) -> Trace:
        """A trace over exactly these token ids (prompt included), e.g. a generation.

        The text is decoded from the ids and each token keeps the characters it decoded
        to, so a non-canonical tokenisation (which sampling can produce) is kept as is.
        A leading BOS id decodes to its string and is part of the text.

        For the ids of ``Trace.from_text(text, ...)`` the decoded text is ``text`` as the
        tokenizer normalises it (``tokenizer.backend_tokenizer.normalizer.normalize_str(text)``):
        equal to ``text`` when it is already in that form. Qwen's, Llama's and the tiny
        tokenizers apply NFC, so a combining sequence such as ``"e\\u0301"`` comes back
        composed (``"\\u00e9"``); pass ``unicodedata.normalize("NFC", text)`` to
        ``from_text`` to get equal texts and character offsets.
        """
        fmt, tok, ctx = _resolve(model_or_tokenizer, format, n_ctx)
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        if ctx is not None and len(ids) > ctx:  # before decoding them one by one
            raise StepSalError(f"the trace has {len(ids)} tokens but the model's context is "
                               f"{ctx}; shorten it - the model would silently truncate it")
        detok = Detokenizer(tok)
        offsets = [detok.push(i) for i in ids]
        return _made_with(cls(fmt.parse(detok.text), tok, format=fmt, splitter=splitter, prepend_bos=False,
                   n_ctx=ctx, token_ids=ids, offsets=offsets), model_or_tokenizer)

    @classmethod
    def from_segments(cls, question: str, thinking: str, summary: str, model_or_tokenizer: Any,
                      *, format: str | ReasoningFormat | None = None,
                      splitter: str | Splitter = "paper", prepend_bos: bool | None = None,
                      n_ctx: int | None = None) -> Trace:
        """Render (question, thinking, summary) after the model's chat prompt, then align.

        The prompt is the tokenizer's chat template where it has one
        (:meth:`~stepsal_lens.segments.formats.ReasoningFormat.chat_prompt`).
        """
        fmt, tok, ctx = _resolve(model_or_tokenizer, format, n_ctx)
        for label, value in (("question", question), ("thinking", thinking), ("summary", summary)):
            check_type(value, str, label, "a str")
        check_fits(question + thinking + summary, tok, ctx, "the question + thinking + summary")
        for label, value in (("question", question), ("thinking", thinking), ("summary", summary)):
            found = [m for m in (*fmt.special_tokens, fmt.think_open.strip(),
                                 fmt.think_close.strip()) if m and m in value]
            if found:
                raise StepSalError(
                    f"the {label} contains the {fmt.name!r} marker(s) {found}, which the "
                    f"tokenizer turns into control tokens, so the segments would not be the "
                    f"ones you passed; remove them, or pass the full text to Trace.from_text"
                )
        text = fmt.render(question, thinking, summary, tokenizer=tok)
        prompt = fmt.chat_prompt(question, tok)
        return _made_with(cls(fmt.parse(text), tok, format=fmt, splitter=splitter,
                   prepend_bos=_bos_for(text, tok, fmt, prepend_bos), n_ctx=ctx,
                   prompt_chars=len(prompt) if text.startswith(prompt) else None), model_or_tokenizer)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], model_or_tokenizer: Any, *,
                  where: str = "the trace document") -> Trace:
        """Inverse of :meth:`to_dict`: the same token ids, offsets and steps, checked.

        The document is untrusted: every field is checked (``where`` names it in the
        messages), its tokenizer fingerprint must equal the tokenizer's of
        ``model_or_tokenizer`` (a document without one is accepted), and the steps must
        come out as the document lists them.

        Parameters
        ----------
        doc
            What :meth:`to_dict` returned (e.g. read back from JSON).
        model_or_tokenizer
            The model (or fast tokenizer) the trace is for.
        where
            How messages name the document (e.g. the file it was read from).

        Raises
        ------
        StepSalError
            A field is missing or malformed, the tokenizer differs, or the steps do not
            match the text.
        """
        fix = "write it again with Trace.to_dict, or cut the trace with Trace.from_text(text, model)"

        def bad(field: str, value: Any, rule: str) -> StepSalError:
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            return StepSalError(f"{where}: {field} is {shown}, {rule}; {fix}")

        def integer(field: str, value: Any, low: int, high: int) -> int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(field, value, f"must be an integer (got {type(value).__name__})")
            if not low <= value <= high:
                raise bad(field, value, f"must be in [{low}, {high}]")
            return value

        if not isinstance(doc, dict):
            raise StepSalError(f"{where} holds a {type(doc).__name__}, not a JSON object; {fix}")
        missing = [k for k in ("text", "format", "token_ids", "offsets", "steps") if k not in doc]
        if missing:
            raise StepSalError(f"{where} lacks {missing} (it has {sorted(doc)}); {fix}")
        text, fmt_name = doc["text"], doc["format"]
        for field, value in (("text", text), ("format", fmt_name)):
            if not isinstance(value, str):
                raise bad(field, value, f"must be a string (got {type(value).__name__})")
        stored = doc.get("tokenizer")
        if stored is not None and not isinstance(stored, str):
            raise bad("tokenizer", stored, "must be a fingerprint string or null")
        fmt, tok, ctx = _resolve(model_or_tokenizer, fmt_name, None)
        if stored is not None:
            _refuse_other_tokenizer(stored, doc.get("model"), model_or_tokenizer, tok)
        ids, offsets, steps = doc["token_ids"], doc["offsets"], doc["steps"]
        for field, value in (("token_ids", ids), ("offsets", offsets), ("steps", steps)):
            if not isinstance(value, list):
                raise bad(field, value, f"must be a list (got {type(value).__name__})")
        vocab = len(tok) - 1 if hasattr(tok, "__len__") else 2**62
        ids = [integer(f"token_ids[{i}]", t, 0, vocab) for i, t in enumerate(ids)]
        if len(offsets) != len(ids):
            raise StepSalError(f"{where}: offsets holds {len(offsets)} spans but token_ids "
                               f"{len(ids)} ids (one span per id); {fix}")
        spans = []
        for i, o in enumerate(offsets):
            if not isinstance(o, list) or len(o) != 2:
                raise bad(f"offsets[{i}]", o, "must be a [start, end] pair")
            a = integer(f"offsets[{i}][0]", o[0], 0, len(text))
            spans.append((a, integer(f"offsets[{i}][1]", o[1], a, len(text))))
        char_spans, token_spans = [], []
        for i, st in enumerate(steps):
            if not isinstance(st, dict) or not {"segment", "char_start", "char_end",
                                                 "token_start", "token_end"} <= set(st):
                raise bad(f"steps[{i}]", st, "must be a step record (Step.to_dict)")
            if st["segment"] not in SEGMENTS:
                raise bad(f"steps[{i}].segment", st["segment"], f"must be one of "
                          f"{list(SEGMENTS)}")
            a = integer(f"steps[{i}].char_start", st["char_start"], 0, len(text))
            char_spans.append((a, integer(f"steps[{i}].char_end", st["char_end"], a, len(text))))
            t0 = integer(f"steps[{i}].token_start", st["token_start"], 0, len(ids))
            token_spans.append((st["segment"], t0, integer(f"steps[{i}].token_end",
                                                           st["token_end"], t0, len(ids))))
        has_bos = doc.get("has_bos", False)
        if not isinstance(has_bos, bool):
            raise bad("has_bos", has_bos, "must be true or false")
        if has_bos and (not ids or ids[0] != tok.bos_token_id or spans[0] != (0, 0)):
            raise bad("has_bos", has_bos, f"but the first id is not the BOS id "
                      f"{tok.bos_token_id} at characters (0, 0)")
        first = 1 if has_bos else 0
        trace = cls(fmt.parse(text), tok, format=fmt, prepend_bos=has_bos, n_ctx=ctx,
                    step_spans=char_spans, token_ids=ids[first:], offsets=spans[first:])
        got = [(s.segment, *s.token_span) for s in trace.steps]
        if got != token_spans or trace.token_ids.tolist() != ids:
            raise bad("steps", token_spans, f"but the text cuts into {got} with this "
                      f"tokenizer")
        trace._fingerprint, trace._own_fingerprint = stored, False
        name = doc.get("model")
        trace.model_name = name if isinstance(name, str) else None
        return trace

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the trace: text, format, token ids, offsets, BOS rule,
        steps (:meth:`Step.to_dict`), the tokenizer fingerprint and the model name;
        :meth:`from_dict` reads it back."""
        return {"text": self.text, "format": self.format.name,
                "token_ids": self.token_ids.tolist(),
                "offsets": [list(o) for o in self.offsets], "has_bos": self.has_bos,
                "steps": [s.to_dict() for s in self.steps],
                "tokenizer": self.tokenizer_fingerprint, "model": self.model_name}

    # ---- the tokenizer the ids belong to --------------------------------------------------
    @property
    def tokenizer_fingerprint(self) -> str | None:
        """Fingerprint of the tokenizer that cut this trace (None: unknown)."""
        if self._own_fingerprint and self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.tokenizer)
        return self._fingerprint

    def check_tokenizer(self, model_or_tokenizer: Any) -> None:
        """Refuse a model (or tokenizer) whose tokenizer is not the one this trace was cut
        with: the trace's token ids would mean other text to it. A trace without a
        fingerprint is accepted.

        Raises
        ------
        StepSalError
            Naming both tokenizers' fingerprints, both models and the fix.
        """
        tok = _tokenizer_of(model_or_tokenizer)
        if tok is None or (tok is self.tokenizer and self._own_fingerprint):
            return
        stored = self.tokenizer_fingerprint
        if stored is not None:
            _refuse_other_tokenizer(stored, self.model_name, model_or_tokenizer, tok)

    # ---- alignment ------------------------------------------------------------------------
    def _spans_from_splitter(self, split: Splitter) -> list[tuple[str, Span]]:
        # A segment in several pieces (gpt-oss's analysis messages) is split piece by
        # piece: no step crosses the markers between two pieces.
        out = []
        for seg in SEGMENTS:
            for a, b in self.parsed.segment_spans(seg):
                for s, e in split(self.text[a:b], seg):
                    if not 0 <= s < e <= b - a:
                        raise StepSalError(f"splitter returned span {(s, e)} outside the {seg} "
                                           f"segment of length {b - a}")
                    out.append((seg, (a + s, a + e)))
        return out

    def _check_spans(self, spans: Sequence[Span]) -> list[tuple[str, Span]]:
        out, last = [], 0
        for s, e in spans:
            if not (last <= s < e <= len(self.text)):
                raise StepSalError(
                    f"step_spans must be sorted, disjoint, non-empty and inside the text "
                    f"(length {len(self.text)}); got {(s, e)} after a span ending at {last}"
                )
            seg = next((n for n in SEGMENTS if self._in_segment(n, s, e)), None)
            if seg is None:
                pieces = {n: list(self.parsed.segment_spans(n)) for n in SEGMENTS}
                raise StepSalError(f"step span {(s, e)} ({self.text[s:e]!r}) is not inside one "
                                   f"segment; segments are {pieces}")
            out.append((seg, (s, e)))
            last = e
        return out

    def _in_segment(self, seg: str, s: int, e: int) -> bool:
        return any(a <= s and e <= b for a, b in self.parsed.segment_spans(seg))

    def _align(self, char_spans: list[tuple[str, Span]]) -> list[Step]:
        # A token belongs to the step holding its first non-space character, so leading
        # spaces merged into a word follow the word; pure-space tokens between steps and
        # template markers belong to no step.
        starts = [s for _, (s, _e) in char_spans]
        ends = [e for _, (_s, e) in char_spans]
        owner = torch.full((len(self.offsets),), -1, dtype=torch.long)
        j = 0
        for t, (s, e) in enumerate(self.offsets):
            if t == 0 and self.has_bos:
                continue
            p = s
            while p < e and self.text[p].isspace():
                p += 1
            if p == e and e > s:  # all whitespace: place by its first character
                p = s
            elif s == e and s > 0:
                # it decodes to nothing on its own (the first bytes of a character, or a
                # space the tokenizer trimmed): placed by the character before it, as
                # StepFlow's tracker places it when it arrives
                p = s - 1
            while j < len(starts) and ends[j] <= p:
                j += 1
            if j < len(starts) and starts[j] <= p < ends[j]:
                owner[t] = j
        steps = []
        for i, (seg, (s, e)) in enumerate(char_spans):
            idx = (owner == i).nonzero().flatten()
            if len(idx) == 0:
                raise StepSalError(f"step {i} ({self.text[s:e]!r}) has no tokens")
            t0, t1 = int(idx[0]), int(idx[-1]) + 1
            steps.append(Step(i, seg, self.text[s:e], (s, e), (t0, t1)))
        self.step_of_token = owner
        return steps

    # ---- views ----------------------------------------------------------------------------
    def segment_char_span(self, segment: str) -> Span:
        """Character span of a segment (``question``, ``thinking``, ``summary``).

        A segment written in several pieces (gpt-oss's analysis messages) gets the span
        covering them all; ``trace.parsed.segment_spans(segment)`` lists the pieces.
        """
        spans = self.segment_char_spans()
        if segment not in spans:
            raise StepSalError(f"unknown segment {segment!r}; choose one of {SEGMENTS}")
        return spans[segment]

    def segment_char_spans(self) -> dict[str, Span]:
        p = self.parsed
        return {"question": p.question_span, "thinking": p.thinking_span, "summary": p.summary_span}

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def question(self) -> str:
        return self.parsed.question

    @property
    def thinking(self) -> str:
        return self.parsed.thinking

    @property
    def summary(self) -> str:
        return self.parsed.summary

    def steps_in(self, segment: str) -> list[int]:
        """Indices of the steps of one segment."""
        return [s.index for s in self.steps if s.segment == segment]

    def segment_token_span(self, segment: str) -> Span:
        """Token span from the first to the last token of a segment's steps ((0, 0) if
        the segment has none)."""
        idx = self.steps_in(segment)
        if not idx:
            return (0, 0)
        return self.steps[idx[0]].token_span[0], self.steps[idx[-1]].token_span[1]

    def decode_step(self, index: int) -> str:
        """Decode a step's tokens (stripped).

        Equals the step's text as the tokenizer normalises it (NFC for most tokenizers;
        see :meth:`from_token_ids`), except where a step starts with a character split
        over several byte tokens: the first bytes decode to nothing on their own and
        belong to the step before (as StepFlow's tracker places them), so the decoded
        string starts with U+FFFD.
        """
        a, b = self.steps[index].token_span
        return self.tokenizer.decode(self.token_ids[a:b].tolist()).strip()

    def str_tokens(self) -> list[str]:
        """Each token's text (the BOS token as its special string)."""
        return [self.tokenizer.decode([i]) for i in self.token_ids.tolist()]

    def to_dataframe(self):
        """One row per step: index, segment, text, char and token spans, token count."""
        import pandas as pd

        return pd.DataFrame([
            {"index": s.index, "segment": s.segment, "text": s.text,
             "char_start": s.char_span[0], "char_end": s.char_span[1],
             "token_start": s.token_span[0], "token_end": s.token_span[1],
             "n_tokens": s.n_tokens}
            for s in self.steps
        ])

    def __repr__(self) -> str:
        counts = {seg: len(self.steps_in(seg)) for seg in SEGMENTS}
        flag = ", truncated" if self.truncated else ""
        return (f"Trace({self.format.name}, {self.n_tokens} tokens, steps: "
                f"{counts['question']} question + {counts['thinking']} thinking + "
                f"{counts['summary']} summary{flag})")


def _name_of(model_or_tokenizer: Any) -> str | None:
    """The model's name where it is a model (a tokenizer has none)."""
    try:
        return info_of(model_or_tokenizer).name
    except (StepSalError, TypeError, KeyError, AttributeError):
        return None


def _made_with(trace: Trace, model_or_tokenizer: Any) -> Trace:
    trace.model_name = _name_of(model_or_tokenizer)
    return trace


def _refuse_other_tokenizer(stored: str, stored_model: Any, model_or_tokenizer: Any,
                            tok: Any) -> None:
    theirs = tokenizer_fingerprint(tok)
    if theirs == stored:
        return
    made = f" (made with {stored_model!r})" if isinstance(stored_model, str) else ""
    name = _name_of(model_or_tokenizer)
    target = f"the model {name!r}" if name else f"the tokenizer {type(tok).__name__}"
    raise StepSalError(
        f"the trace was cut with tokenizer {stored}{made}, but {target} has tokenizer "
        f"{theirs}: the trace's token ids would mean other text to it; re-cut the trace "
        f"for this model with Trace.from_text(trace.text, model)")


def _tokenize(tokenizer: Any, text: str, prompt_chars: int | None) -> tuple[list[int], list[Span]]:
    """Ids and character offsets of ``text``; the first ``prompt_chars`` characters (the
    generation prompt) are tokenised on their own."""
    cuts = [0, len(text)] if not prompt_chars else [0, prompt_chars, len(text)]
    ids: list[int] = []
    offsets: list[Span] = []
    for a, b in zip(cuts, cuts[1:]):
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True)
        ids += enc["input_ids"]
        offsets += [(a + s, a + e) for s, e in enc["offset_mapping"]]
    return ids, offsets


def _last_byte_owns_the_character(offsets: list[Span]) -> list[Span]:
    """Byte-level tokenizers give each token of a character split over several tokens a
    span that starts at that character; give the character to the last of them (the one
    that completes it, as incremental decoding does) and leave the others empty there."""
    out = list(offsets)
    for t in range(len(out) - 1):
        if out[t][0] == out[t + 1][0] and out[t][0] < out[t][1]:
            out[t] = (out[t][0], out[t][0])
    return out


def template_bos(tokenizer: Any, fmt: ReasoningFormat) -> str | None:
    """The BOS string the model's prompt starts with (R1's template writes one; Qwen's,
    QwQ's and harmony's do not), or None. This, not the architecture, decides BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return None
    return bos if fmt.chat_prompt("?", tokenizer).startswith(bos) else None


def check_trace(value: Any, name: str = "trace") -> Trace:
    """``value`` if it is a :class:`Trace`, else one error naming what was passed and how
    to build a trace (the boundary check of every function that takes one)."""
    return check_type(value, Trace, name, "a Trace",
                      "build one with Trace.from_text(text, model) or Trace.from_segments("
                      "question, thinking, summary, model)")


#: Characters per chunk when counting the tokens of a long text against the context.
_CHUNK_CHARS = 1 << 16


def check_fits(text: Any, tokenizer: Any, n_ctx: int | None, what: str = "the trace",
               fix: str = "shorten it (or cut the thinking)") -> None:
    """Refuse a text longer than the model's context before tokenising all of it.

    A text of at most ``8 * n_ctx`` characters is left to the exact check after
    tokenisation. A longer one is tokenised in chunks of :data:`_CHUNK_CHARS` characters
    cut at whitespace, and refused as soon as the tokens counted pass ``n_ctx`` (plus one
    token per chunk, which a cut may add): the work is that of about ``n_ctx`` tokens
    whatever the text's length (a 50 MB text is refused in well under a second, not after
    a minute and 15 GB of offsets).
    """
    check_type(text, str, what, "a str")
    if n_ctx is None or len(text) <= 8 * n_ctx:
        return
    count = chunks = start = 0
    while start < len(text):
        end = min(start + _CHUNK_CHARS, len(text))
        if end < len(text):  # cut at the last whitespace of the chunk, where tokens end
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut if cut > start else end
        count += len(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        chunks += 1
        start = end
        if count > n_ctx + chunks:
            raise StepSalError(
                f"{what} has {len(text):,} characters; its first {start:,} alone are "
                f"{count:,} tokens but the model's context is {n_ctx} tokens; {fix} - the "
                f"model would silently truncate it")


def _resolve(model_or_tokenizer: Any, format, n_ctx):
    model_fmt = format_of(model_or_tokenizer)
    if format is None and model_fmt is None:
        raise StepSalError(f"no reasoning format: pass format=... (one of {list_formats()}) "
                           "or a model loaded with load_lrm")
    fmt = get_format(format if format is not None else model_fmt)
    cfg = getattr(model_or_tokenizer, "cfg", None)
    if n_ctx is None:
        n_ctx = getattr(cfg, "n_ctx", None)
    return fmt, _tokenizer_of(model_or_tokenizer), n_ctx


def _bos_for(text: str, tok: Any, fmt: ReasoningFormat, prepend_bos: bool | None) -> bool:
    """Prepend a BOS id? By default when the template starts with one the text lacks."""
    if prepend_bos is not None:
        return prepend_bos
    bos = template_bos(tok, fmt)
    return bos is not None and not text.startswith(bos)
