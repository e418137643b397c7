"""The online driver of the step rule: segment and step labels of sequences that grow.

StepFlow needs, at every forward pass of a generation, the segment and step of each
position, and which positions start a new thinking step. :class:`SegmentTracker` gives
them from the same splitter the offline :class:`~stepsal_lens.segments.trace.Trace` uses,
so the online and offline steps agree token for token.

Examples
--------
>>> import tempfile
>>> from stepsal_lens import load_lrm
>>> from stepsal_lens.segments.tracker import SegmentTracker
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp()), format="think-tags")
>>> tracker = SegmentTracker(model.tokenizer, "think-tags")
>>> tracker.reset(model.to_tokens("Start with 7. Add 5.\\n<think>\\nWe start with the number "
...                               "7.\\n\\nAdding 5 to 7 gives 12.\\n</think>\\n\\nThe result is 12."))
>>> int(tracker.step_start.sum())  # question, two thinking steps, one summary step
4
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.segments.formats import ReasoningFormat, get_format
from stepsal_lens.segments.splitters import Splitter, get_splitter
from stepsal_lens.segments.trace import Detokenizer, Trace

__all__ = ["SEGMENT_CODES", "SegmentTracker"]

#: Integer codes of the segments in the tracker's label tensors (-1: none / padding).
SEGMENT_CODES = {"question": 0, "thinking": 1, "summary": 2}
_Q, _T, _S = 0, 1, 2


@dataclass
class _Row:
    """Labels of one sequence, grown token by token."""

    detok: Detokenizer
    valid: list[bool] = field(default_factory=list)
    segment: list[int] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    start: list[bool] = field(default_factory=list)
    anchored: list[bool] = field(default_factory=list)  # has a non-space character
    glued: list[bool] = field(default_factory=list)  # decodes to nothing after a non-space
    n_steps: int = 0
    question: tuple[int, int] | None = None
    # the current step: its region's start, its first character, the last anchored char
    region: int = -1
    step_char: int = -1
    last_char: int = -1


class SegmentTracker:
    """Labels every position of a growing batch of sequences with segment and step.

    A fresh block of tokens (a prompt, or a whole trace) is labelled from its full text;
    each appended token from the text so far. Steps come from the same splitter as the
    offline :class:`~stepsal_lens.Trace` (one step rule), applied to the text of the
    current step up to the new token's first character: a token starts a step exactly
    when its first non-space character opens a span the previous token's did not. A
    label never depends on later tokens (except that spaces trailing a step are dropped
    from it once the next step or segment begins), so labelling token by token, labelling
    the final text at once and the offline Trace agree.

    Labels (``[batch, pos]`` tensors): :attr:`segment` (:data:`SEGMENT_CODES`, -1 for
    template markers and padding), :attr:`step` (the Trace's numbering: question 0,
    then thinking and summary steps; -1 outside steps), :attr:`step_start` (first token
    of a step), :attr:`anchored` (the token has a non-space character) and :attr:`valid`
    (not padding).

    Examples
    --------
    >>> from stepsal_lens.zoo.tiny_random import train_tokenizer
    >>> tok = train_tokenizer()
    >>> tracker = SegmentTracker(tok, "think-tags")
    >>> ids = tok("Start with 7.\\n<think>\\nWe start with 7. Adding 5 makes 12.",
    ...           return_tensors="pt", add_special_tokens=False)["input_ids"]
    >>> tracker.reset(ids)
    >>> int(tracker.step[0].max()), int(tracker.step_start[0].sum())
    (2, 3)
    """

    def __init__(self, tokenizer: Any, format: str | ReasoningFormat,
                 splitter: str | Splitter = "paper"):
        self.tokenizer = tokenizer
        self.format = get_format(format)
        self.splitter = splitter
        self._split = get_splitter(splitter)
        self.rows: list[_Row] = []
        self._cache: Tensor | None = None  # [field, batch, pos] int64 labels
        self._typed: dict[str, Tensor] | None = None  # the same, one tensor per field
        self._relabelled = False

    # ---- feeding ---------------------------------------------------------------------------
    def reset(self, ids: Tensor, mask: Tensor | None = None) -> None:
        """Start over with a fresh ``[batch, pos]`` block (``mask``: 1 = real token)."""
        ids = _as_2d(ids)
        mask = torch.ones_like(ids) if mask is None else mask
        self.rows = [_Row(Detokenizer(self.tokenizer)) for _ in range(ids.shape[0])]
        for row, r_ids, r_mask in zip(self.rows, ids.tolist(), mask.tolist()):
            real = [t for t, m in zip(r_ids, r_mask) if m]
            spans = [row.detok.push(t) for t in real]
            regions = self.format.segment_regions(row.detok.text)  # the whole prompt at once
            row.question = next((sp for name, sp in regions if name == "question"), None)
            it = iter(spans)
            for m in r_mask:
                if m:
                    self._label(row, next(it), regions)
                else:
                    self._pad(row)
        self._cache = self._typed = None

    def extend(self, ids: Tensor, mask: Tensor | None = None) -> None:
        """Append ``[batch, n]`` new tokens (``mask`` covers all positions or the new)."""
        ids = _as_2d(ids)
        if not self.rows:
            raise StepSalError("the tracker has no sequence yet; call reset() first")
        if ids.shape[0] != len(self.rows):
            raise StepSalError(f"got {ids.shape[0]} rows but the tracker follows {len(self.rows)}")
        new_mask = (torch.ones_like(ids) if mask is None else mask[:, -ids.shape[1]:]).tolist()
        self._relabelled = False
        for row, r_ids, r_mask in zip(self.rows, ids.tolist(), new_mask):
            for t, m in zip(r_ids, r_mask):
                if m:
                    span = row.detok.push(t)
                    self._label(row, span, self.format.segment_regions(row.detok.text))
                else:
                    self._pad(row)
        if self._cache is not None and not self._relabelled:
            # Grow the label tensor by the new columns instead of rebuilding it.
            n = ids.shape[1]
            self._cache = torch.cat([self._cache, self._build(lambda values: values[-n:])], dim=2)
        else:
            self._cache = None
        self._typed = None

    def _pad(self, row: _Row) -> None:
        row.valid.append(False)
        row.segment.append(-1)
        row.step.append(-1)
        row.start.append(False)
        row.anchored.append(False)
        row.glued.append(False)

    def _label(self, row: _Row, span: tuple[int, int],
               regions: list[tuple[str, tuple[int, int]]]):
        text = row.detok.text
        s, e = span
        p = s
        while p < e and text[p].isspace():
            p += 1
        anchored = p < e
        if not anchored:
            p = s  # a space-only (or empty) token is placed by its first character
        # A token that decodes to nothing (the first bytes of a character) right after a
        # non-space character stays with it, like the Trace's rule; after a space it is
        # a space.
        glued = s == e and s > 0 and not text[s - 1].isspace()
        if row.question is not None:
            regions = [("question", row.question)] + [r for r in regions if r[0] != "question"]
        # A segment may have several regions (gpt-oss's analysis messages); the first
        # token of each starts a step.
        seg, seg_name, a = -1, None, 0
        for name, (ra, rb) in regions:
            # A token that decodes to nothing yet (the first bytes of a multi-byte
            # character) sits at the end of a still open region: it belongs there, as it
            # will once the character completes.
            if ra <= p < rb or ra <= p == rb == len(text) > ra:
                seg, seg_name, a = SEGMENT_CODES[name], name, ra
                break
        step, start = -1, False
        if seg_name == "question":  # one step; its region is stripped already
            step = 0
            start = row.n_steps == 0
            row.n_steps = max(row.n_steps, 1)
        elif seg_name is not None:
            current = row.region == a and row.step_char >= 0
            if anchored:
                owner = self._owner(text, p, seg_name, row) if current else "new"
                if owner == "new":
                    step, start = row.n_steps, True
                    row.n_steps += 1
                    row.region, row.step_char = a, p if not current else row.step_char
                elif owner == "same":
                    step = row.n_steps - 1
                row.last_char = p if owner != "none" else row.last_char
            elif current:
                step = row.n_steps - 1  # a space inside the step (dropped if it trails)
        if seg != (row.segment[-1] if row.segment else -1) or start:
            self._drop_trailing_spaces(row)
        row.valid.append(True)
        row.segment.append(seg)
        row.step.append(step)
        row.start.append(start)
        row.anchored.append(anchored)
        row.glued.append(glued)

    def _owner(self, text: str, p: int, segment: str, row: _Row) -> str:
        """Does the character at ``p`` open a new step ("new", and moves the step's
        start), continue the current one ("same") or lie in no step ("none")? The
        splitter runs on the current step's text up to ``p``."""
        base = row.step_char
        context = getattr(self._split, "context_start", None)  # fenced code (code_steps.py)
        if context is not None:
            base = context(text, row.region, base)
        for a, b in self._split(text[base:p + 1], segment):
            if a <= p - base < b:
                if base + a > row.last_char:
                    row.step_char = base + a
                    return "new"
                return "same"
        return "none"

    def _drop_trailing_spaces(self, row: _Row) -> None:
        i = len(row.step) - 1
        while i >= 0 and row.valid[i] and not (row.anchored[i] or row.glued[i]):
            if row.step[i] >= 0:
                row.step[i] = -1
                self._relabelled = True
            i -= 1

    # ---- views -----------------------------------------------------------------------------
    #: The label tensors: (name, row attribute, dtype).
    FIELDS = (("segment", "segment", torch.long), ("step", "step", torch.long),
              ("step_start", "start", torch.bool), ("anchored", "anchored", torch.bool),
              ("valid", "valid", torch.bool))

    def _build(self, cut=lambda values: values) -> Tensor:
        return torch.tensor([[cut(getattr(r, attr)) for r in self.rows]
                             for _, attr, _ in self.FIELDS], dtype=torch.long)

    def tensors(self) -> dict[str, Tensor]:
        """The label tensors by field name, each converted on first use."""
        if self._typed is None:
            if self._cache is None:
                self._cache = self._build()
            self._typed = _Labels(self._cache, self.FIELDS)
        return self._typed

    @property
    def segment(self) -> Tensor:
        return self.tensors()["segment"]

    @property
    def step(self) -> Tensor:
        return self.tensors()["step"]

    @property
    def step_start(self) -> Tensor:
        return self.tensors()["step_start"]

    @property
    def anchored(self) -> Tensor:
        return self.tensors()["anchored"]

    @property
    def valid(self) -> Tensor:
        return self.tensors()["valid"]

    def text(self, row: int = 0) -> str:
        """The decoded text of one row so far (padding left out)."""
        return self.rows[row].detok.text

    def token_ids(self, row: int = 0) -> list[int]:
        """The real (non-padding) token ids of one row."""
        return list(self.rows[row].detok.ids)

    def trace(self, model_or_tokenizer: Any = None, row: int = 0, **kwargs) -> Trace:
        """The offline :class:`~stepsal_lens.Trace` of one row's tokens."""
        return Trace.from_token_ids(self.token_ids(row), model_or_tokenizer or self.tokenizer,
                                    format=self.format, **kwargs)


class _Labels(dict):
    """Field name -> ``[batch, pos]`` label tensor, cut from the tracker's stacked int64
    labels when first asked for (a generation step needs two of the five)."""

    def __init__(self, stacked: Tensor, fields: tuple):
        super().__init__()
        self._stacked = stacked
        self._index = {name: (i, dtype) for i, (name, _, dtype) in enumerate(fields)}

    def __missing__(self, name: str) -> Tensor:
        i, dtype = self._index[name]
        value = self._stacked[i] if dtype == torch.long else self._stacked[i].bool()
        self[name] = value
        return value


def _as_2d(ids: Tensor) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point:
        raise StepSalError("StepFlow follows token ids; pass a [batch, pos] integer tensor "
                           "(e.g. model.to_tokens(text))")
    return ids[None] if ids.dim() == 1 else ids
