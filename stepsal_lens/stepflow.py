"""StepFlow: Odds-Equal Bridge (OEB) and Step Momentum Injection (SMI) at generation time.

Two test-time interventions (docs/stepflow.md, docs/concepts.md), no retraining:

* **OEB** on ``blocks.{l}.attn.hook_pattern`` of shallow layers. For a query in the
  thinking segment the *same* group S is the visible thinking tokens and the *bridge*
  group B is the question; for a summary query S is the visible summary and B the
  thinking segment. With masses measured on the row renormalised over its keys, if
  ``p_B < tau_B = min(sqrt(|B| / (|B| + |S|)), tau_max)`` then B is rescaled to
  ``tau_B``, S to ``tau_S = 1 - p_O - tau_B`` and everything else is left alone (the KL
  projection the paper writes as the logit shift ``z_k + log(tau_g / p_g)``). A row that
  sums to less than 1 (attention sinks) keeps its sink mass.
* **SMI** at the first token of each new thinking step, in one of two variants
  (:data:`~stepsal_lens.results.config.SMI_VARIANTS`). ``"resid_post"`` (default, the design card): add ``alpha``
  times the mean ``blocks.{l}.hook_resid_post`` over the last ``window`` non-space tokens
  of the previous step, in every SMI layer. ``"paper_code"`` (what the paper's code
  does): add ``alpha`` times the mean of the attention *values*
  (``blocks.{l}.attn.hook_v``, GQA heads expanded) over the last ``window`` tokens of the
  previous step to each head's attention output (``blocks.{l}.attn.hook_z``), in the
  first SMI layer only.

The pure cores are :func:`odds_equal_bridge` and :func:`step_momentum`; the hooks are thin
wrappers that read per-position labels from a :class:`SegmentTracker`, which follows
every forward pass of the model (a fresh pass, a KV-cached generation step, a batch of
left-padded prompts) through a forward pre-hook.

Examples
--------
>>> import tempfile
>>> from stepsal_lens import load_lrm, stepflow
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp(), n_layers=4),
...                  format="think-tags")
>>> tokens = model.to_tokens("Start with 7. Add 5.\\n<think>\\nWe start with the number 7. "
...                          "Adding 5 to 7 gives 12.\\n</think>\\n\\nThe result is 12.")
>>> with stepflow(model, tau_max=0.15, alpha=0.06) as sf:
...     logits = model(tokens)
>>> sorted(sf.stats.to_dict())
['oeb', 'smi']
>>> sf.stats.to_dict()["smi"]["injections"]  # one new thinking step, one SMI layer
1
"""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.formats import ReasoningFormat, get_format
from stepsal_lens.results.config import StepFlowConfig
from stepsal_lens.trace import Detokenizer, Splitter, Trace, get_splitter
from stepsal_lens.typing import KeyMask, Pattern

__all__ = [
    "SEGMENT_CODES",
    "SegmentTracker",
    "StepFlow",
    "StepFlowStats",
    "odds_equal_bridge",
    "step_momentum",
    "stepflow",
]

#: Integer codes of the segments in the tracker's label tensors (-1: none / padding).
SEGMENT_CODES = {"question": 0, "thinking": 1, "summary": 2}
_Q, _T, _S = 0, 1, 2
#: OEB's group of a key, indexed by (query segment + 1, key segment + 1): 1 = same,
#: 2 = bridge, 0 = neither. A thinking query's same group is thinking and its bridge the
#: question; a summary query's are summary and thinking; other queries are left alone.
_GROUP_OF = torch.tensor([[0, 0, 0, 0],   # query in no segment (template, padding)
                          [0, 0, 0, 0],   # question
                          [0, 2, 1, 0],   # thinking
                          [0, 0, 2, 1]],  # summary
                         dtype=torch.uint8)


# ---- pure cores ----------------------------------------------------------------------------

class _Groups(NamedTuple):
    """OEB's key groups, prepared once for every layer that shares them. Masks that vary
    with the query (``[batch, 1, query, key]``) stay float masks ``same`` and ``bridge``;
    masks shared by all queries (``[key]``, or one query row) become ``keys``
    ``[..., key, 3]`` (columns: same, bridge, every key), so that the masses, the row sum
    and the rescale are one matrix product each. ``tau_b`` is the bridge target per query
    row, ``nonempty`` whether both groups have a key."""

    same: Tensor | None
    bridge: Tensor | None
    keys: Tensor | None
    tau_b: Tensor
    nonempty: Tensor


def _groups(same: Tensor, bridge: Tensor, tau_max: float) -> _Groups:
    """Prepare disjoint boolean key masks (checked by :func:`odds_equal_bridge`)."""
    if same.dim() > 1 and same.shape[-2] != 1:  # one mask per query row
        same_f, bridge_f = same.float(), bridge.float()
        n_s, n_b, keys = same_f.sum(-1), bridge_f.sum(-1), None
    else:
        same_f = bridge_f = None
        same, bridge = torch.broadcast_tensors(same, bridge)
        keys = torch.stack([same, bridge, torch.ones_like(same)], -1).float()
        n = keys.sum(-2)
        n_s, n_b = n[..., 0], n[..., 1]
        if keys.dim() > 2:
            keys = keys.squeeze(-3)  # [..., key, 3]: the query dimension comes from A
    tau_b = torch.sqrt(n_b / (n_b + n_s).clamp_min(1)).clamp(max=tau_max)
    return _Groups(same_f, bridge_f, keys, tau_b, torch.minimum(n_s, n_b) > 0)


def _oeb(pattern: Tensor, g: _Groups) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """OEB plus what it needs for the statistics: (new pattern, triggered rows, row sums,
    bridge mass).

    Masses are compared in the row's own units: ``p_B < tau_B`` is ``m_B < tau_B * row``
    and ``tau_S = p_S + p_B - tau_B > 0`` is ``m_S + m_B > tau_B * row`` (which, with
    ``m_B < tau_B * row``, also makes ``m_S > 0``). The new masses over the old,
    ``(tau_S / p_S, tau_B / p_B, 1)``, are the factors of the same group, the bridge and
    the rest."""
    p = pattern if pattern.dtype == torch.float32 else pattern.float()
    if g.keys is not None:
        m = torch.matmul(p, g.keys)  # [..., query, 3]: m_S, m_B, row sum
    else:
        m = torch.stack([(p * g.same).sum(-1), (p * g.bridge).sum(-1), p.sum(-1)], -1)
    m_s, m_b, row = m.unbind(-1)
    target_b = g.tau_b * row  # tau_B of this row's mass (sinks keep the rest)
    both = m_s + m_b
    # tau_S <= 0 means the other keys hold so much mass that B cannot reach tau_B.
    act = g.nonempty & (m_b > 0) & (m_b < target_b) & (both > target_b)
    scale = torch.where(act[..., None], torch.stack([both - target_b, target_b, row], -1)
                        / m.clamp_min(1e-30), 1.0)
    if g.keys is not None:
        factor = 1 + torch.matmul(scale - 1, g.keys.transpose(-1, -2))
    else:
        factor = 1 + (scale[..., 0:1] - 1) * g.same + (scale[..., 1:2] - 1) * g.bridge
    out = p * factor
    return out if out.dtype == pattern.dtype else out.to(pattern.dtype), act, row, m_b


def odds_equal_bridge(pattern: Pattern, same: KeyMask, bridge: KeyMask,
                      tau_max: float = 0.15) -> Pattern:
    """The Odds-Equal Bridge on one attention pattern (pure; no hooks).

    Parameters
    ----------
    pattern
        ``[batch, head, query, key]`` post-softmax attention (rows may sum to < 1).
    same, bridge
        Boolean key masks broadcastable to ``pattern`` with the head dimension broadcast:
        ``[key]`` when every key is visible to every query, or ``[batch, 1, query, key]``
        for per-query visibility. They must not overlap. ``|S|`` and ``|B|`` are their
        counts, so pass only keys the query can see.
    tau_max
        Cap on the bridge target ``tau_B``; 0 leaves every row unchanged.

    Returns
    -------
    Tensor
        ``[batch, head, query, key]``: rows with ``p_B < tau_B`` rescaled group-wise so
        that B holds ``tau_B`` and S holds ``1 - p_O - tau_B`` of the row's mass; other
        keys and the row sum (sink mass) unchanged. Rows with an empty group, or whose
        other keys hold more than ``1 - tau_B``, are left alone.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[[[0.05, 0.05, 0.6, 0.3]]]])  # keys: 2 question, 2 thinking
    >>> bridge = torch.tensor([True, True, False, False])
    >>> out = odds_equal_bridge(a, ~bridge, bridge, tau_max=0.15)
    >>> [round(x, 3) for x in out.flatten().tolist()]
    [0.075, 0.075, 0.567, 0.283]
    """
    if not 0 <= tau_max <= 1:
        raise StepSalError(f"tau_max must be in [0, 1]; got {tau_max}")
    if (same & bridge).any():
        raise StepSalError("the same and bridge key masks overlap; a key belongs to one group")
    return _oeb(pattern, _groups(same, bridge, tau_max))[0]


def step_momentum(x: Float[Tensor, "*d"], window: Float[Tensor, "w *d"],
                  alpha: float) -> Float[Tensor, "*d"]:
    """The SMI update for one position: ``x + alpha * mean(window)``.

    ``x`` is the activation at the first token of a new step (``[d_model]`` for the
    residual stream, ``[head, d_head]`` for ``hook_z``); ``window`` stacks the same
    activation at the last ``w`` tokens of the previous step.

    >>> import torch
    >>> step_momentum(torch.zeros(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0.5)
    tensor([1.0000, 1.5000])
    """
    if window.shape[0] == 0:
        return x
    return x + alpha * window.mean(0).to(x.dtype)


# ---- the streaming segment tracker ---------------------------------------------------------

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
    _FIELDS = (("segment", "segment", torch.long), ("step", "step", torch.long),
               ("step_start", "start", torch.bool), ("anchored", "anchored", torch.bool),
               ("valid", "valid", torch.bool))

    def _build(self, cut=lambda values: values) -> Tensor:
        return torch.tensor([[cut(getattr(r, attr)) for r in self.rows]
                             for _, attr, _ in self._FIELDS], dtype=torch.long)

    def _tensors(self) -> dict[str, Tensor]:
        """The label tensors by field name, each converted on first use."""
        if self._typed is None:
            if self._cache is None:
                self._cache = self._build()
            self._typed = _Labels(self._cache, self._FIELDS)
        return self._typed

    @property
    def segment(self) -> Tensor:
        return self._tensors()["segment"]

    @property
    def step(self) -> Tensor:
        return self._tensors()["step"]

    @property
    def step_start(self) -> Tensor:
        return self._tensors()["step_start"]

    @property
    def anchored(self) -> Tensor:
        return self._tensors()["anchored"]

    @property
    def valid(self) -> Tensor:
        return self._tensors()["valid"]

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


# ---- statistics ---------------------------------------------------------------------------

@dataclass
class StepFlowStats:
    """What StepFlow did: OEB triggers and bridge mass per layer, SMI injections.

    Counts are over (row, head, query) attention rows for OEB and over (row, position)
    for SMI; "eligible" rows have a query in the thinking or summary segment with both
    groups non-empty. :meth:`per_row` gives the counts of each batch row of the last
    sequence batch.
    """

    oeb_layers: list[int]
    smi_layers: list[int]
    batch: int = 0
    oeb_triggers: dict[int, Tensor] = field(default_factory=dict)
    oeb_eligible: dict[int, Tensor] = field(default_factory=dict)
    bridge_before: dict[int, Tensor] = field(default_factory=dict)
    bridge_after: dict[int, Tensor] = field(default_factory=dict)
    smi_injections: dict[int, Tensor] = field(default_factory=dict)
    #: summaries of earlier batches inside the same ``stepflow`` block
    archive: list[dict[str, Any]] = field(default_factory=list, repr=False)
    #: OEB records not yet counted: (layer, triggered, row sum, bridge mass, tau_B,
    #: eligible groups), each ``[batch, head or 1, query]``; summed when read
    _pending: list[tuple[int, Tensor, Tensor, Tensor, Tensor, Tensor]] = field(
        default_factory=list, repr=False)

    def add_oeb(self, layer: int, act: Tensor, row: Tensor, m_b: Tensor, tau_b: Tensor,
                nonempty: Tensor) -> None:
        """Record what OEB did in one layer of one pass (counted lazily, so that a
        generation step costs one list append per layer)."""
        detached = [x.detach() if x.requires_grad else x for x in (row, m_b, tau_b)]
        self._pending.append((layer, act, *detached, nonempty))

    def _flush(self) -> None:
        """Add the pending OEB records into the per-row counters (one reduction per layer
        over all of its records)."""
        pending, self._pending = self._pending, []
        by_layer: dict[int, list] = {}
        for rec in pending:
            by_layer.setdefault(rec[0], []).append(rec[1:])
        for layer, recs in by_layer.items():
            act, row, m_b, tau_b, nonempty = (
                torch.cat([r[i].expand_as(r[0]).flatten(1) for r in recs], dim=1)
                for i in range(5))
            eligible = nonempty & (row > 0)
            p_b = m_b / row.clamp_min(torch.finfo(row.dtype).tiny)
            after = torch.where(act, tau_b, p_b)
            sums = torch.stack([act.to(p_b.dtype), eligible.to(p_b.dtype), p_b * eligible,
                                after * eligible]).double().sum(2).cpu()  # [4, batch]
            self.oeb_triggers[layer] += sums[0]
            self.oeb_eligible[layer] += sums[1]
            self.bridge_before[layer] += sums[2]
            self.bridge_after[layer] += sums[3]

    def start_batch(self, batch: int) -> None:
        """Zero the per-row counters for a new batch of sequences."""
        self._flush()
        self.batch = batch
        z = lambda: torch.zeros(batch, dtype=torch.float64)  # noqa: E731
        for store, layers in ((self.oeb_triggers, self.oeb_layers),
                              (self.oeb_eligible, self.oeb_layers),
                              (self.bridge_before, self.oeb_layers),
                              (self.bridge_after, self.oeb_layers),
                              (self.smi_injections, self.smi_layers)):
            for layer in layers:
                store[layer] = z()

    def _summary(self, rows: slice | int) -> dict[str, Any]:
        self._flush()
        pick = lambda d: {l: float(v[rows].sum()) for l, v in d.items()}  # noqa: E731
        trig, elig = pick(self.oeb_triggers), pick(self.oeb_eligible)
        before, after = pick(self.bridge_before), pick(self.bridge_after)
        inj = pick(self.smi_injections)
        n_elig = sum(elig.values())
        return {
            "oeb": {
                "triggers": int(sum(trig.values())),
                "triggers_per_layer": {str(l): int(v) for l, v in trig.items()},
                "eligible_rows": int(n_elig),
                "eligible_rows_per_layer": {str(l): int(v) for l, v in elig.items()},
                "mean_bridge_mass_before": (sum(before.values()) / n_elig) if n_elig else None,
                "mean_bridge_mass_after": (sum(after.values()) / n_elig) if n_elig else None,
            },
            "smi": {
                "injections": int(sum(inj.values())),
                "injections_per_layer": {str(l): int(v) for l, v in inj.items()},
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """Totals over every sequence seen inside the ``stepflow`` block."""
        out = self._summary(slice(None))
        for old in self.archive:
            out = _add_summaries(out, old)
        return out

    def per_row(self) -> list[dict[str, Any]]:
        """One summary per row of the last batch of sequences."""
        return [self._summary(b) for b in range(self.batch)]

    def _archive_batch(self) -> None:
        if self.batch:
            self.archive.append(self._summary(slice(None)))


def _add_summaries(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum two :meth:`StepFlowStats._summary` results (means weighted by eligible rows)."""
    oa, ob = a["oeb"], b["oeb"]
    n = oa["eligible_rows"] + ob["eligible_rows"]

    def mean(key):
        total = sum((o[key] or 0) * o["eligible_rows"] for o in (oa, ob))
        return total / n if n else None

    add = lambda x, y: {k: x.get(k, 0) + y.get(k, 0) for k in {**x, **y}}  # noqa: E731
    return {
        "oeb": {"triggers": oa["triggers"] + ob["triggers"],
                "triggers_per_layer": add(oa["triggers_per_layer"], ob["triggers_per_layer"]),
                "eligible_rows": n,
                "eligible_rows_per_layer": add(oa["eligible_rows_per_layer"],
                                               ob["eligible_rows_per_layer"]),
                "mean_bridge_mass_before": mean("mean_bridge_mass_before"),
                "mean_bridge_mass_after": mean("mean_bridge_mass_after")},
        "smi": {"injections": a["smi"]["injections"] + b["smi"]["injections"],
                "injections_per_layer": add(a["smi"]["injections_per_layer"],
                                            b["smi"]["injections_per_layer"])},
    }


# ---- hooks ---------------------------------------------------------------------------------

def _layer_of(name: str) -> int:
    return int(name.split(".")[1])


class StepFlow:
    """The live intervention: hooks, tracker and stats (made by :func:`stepflow`).

    ``config`` is the resolved :class:`~stepsal_lens.StepFlowConfig` (explicit layers);
    ``engine`` is ``"hook_pattern"`` (hooks on the bridge's hook points) or ``"fused"``
    (:mod:`stepsal_lens.fused_stepflow`), ``engine_reason`` why it was chosen.
    """

    def __init__(self, model: Any, config: StepFlowConfig | None = None,
                 engine: str = "hook_pattern", engine_reason: str = "requested"):
        from stepsal_lens.models import info_of

        if engine not in ("fused", "hook_pattern"):
            raise StepSalError(f"StepFlow runs engine 'fused' or 'hook_pattern'; got {engine!r} "
                               f"(stepflow(..., engine='auto') chooses one)")
        fmt = info_of(model).format
        self.model = model
        self.engine, self.engine_reason = engine, engine_reason
        self.config = (config or StepFlowConfig()).resolve(model.cfg.n_layers)
        c = self.config
        self.tau_max, self.alpha, self.window = c.tau_max, c.alpha, c.window
        self.oeb_layers, self.smi_layers = list(c.oeb_layers), list(c.smi_layers)
        self.smi_variant = c.smi_variant
        self.tracker = SegmentTracker(model.tokenizer, fmt, c.splitter)
        self.stats = StepFlowStats(list(self.oeb_layers), list(self.smi_layers))
        self._windows = _sliding_windows(model)
        self._device = torch.device(model.cfg.device)
        self._group_of = _GROUP_OF.to(self._device)
        self._buffers: dict[int, dict[str, Any]] = {}
        self._values: dict[int, Tensor] = {}  # this pass's hook_v per layer (paper_code)
        self._pass = 0
        self._counted: set[tuple[int, int, str]] = set()
        self._per_pass: dict[Any, Any] = {}
        self._labels: dict[str, Tensor] | None = None

    def hooks(self) -> list[tuple[str, Any]]:
        """``(hook name, function)`` pairs, for ``model.hooks(fwd_hooks=...)``."""
        out = [(f"blocks.{l}.attn.hook_pattern", self._oeb_hook) for l in self.oeb_layers
               if self.tau_max > 0]
        if self.alpha == 0:
            return out
        if self.smi_variant == "resid_post":
            return out + [(f"blocks.{l}.hook_resid_post", self._smi_hook) for l in self.smi_layers]
        for l in self.smi_layers:  # hook_v fires before hook_z in the same layer
            out += [(f"blocks.{l}.attn.hook_v", self._keep_values),
                    (f"blocks.{l}.attn.hook_z", self._smi_hook)]
        return out

    # ---- following the model's forward passes ----------------------------------------------
    def _before_forward(self, module, args, kwargs):
        """Forward pre-hook on the bridge (the ``hook_pattern`` engine)."""
        tokens = args[0] if args else kwargs.get("input")
        if isinstance(tokens, (str, list)):
            tokens = self.model.to_tokens(tokens)
        self._follow(tokens, kwargs.get("attention_mask"), kwargs.get("past_key_values") is None)

    def _follow(self, tokens: Tensor, mask: Tensor | None, fresh: bool) -> None:
        """Feed one forward pass's token ids to the tracker: a fresh pass (prompt, trace or
        re-feed) starts over, a KV-cached step appends. Both engines call it."""
        if fresh:
            self.stats._archive_batch()
            self.tracker.reset(tokens, mask)
            self.stats.start_batch(len(self.tracker.rows))
            self._buffers = {}
        else:
            self.tracker.extend(tokens, mask)
        self._pass += 1
        self._counted.clear()
        self._values.clear()
        self._per_pass: dict[Any, Any] = {}  # label slices and OEB groups shared by layers
        labels = self.tracker._tensors()
        if labels["segment"].device != self._device:
            labels = {name: labels[name].to(self._device) for name, _, _ in self.tracker._FIELDS}
        self._labels = labels

    def _count(self, layer: int, kind: str) -> bool:
        """Count each hook once per forward pass (checkpointed backward re-runs it)."""
        key = (self._pass, layer, kind)
        if key in self._counted:
            return False
        self._counted.add(key)
        return True

    def _oeb_hook(self, pattern: Pattern, hook) -> Pattern:
        layer = _layer_of(hook.name)
        lab = self._check_batch(pattern)
        n_q, n_k = pattern.shape[-2:]
        groups = self._oeb_groups(lab, layer, n_q, n_k)
        if groups is None:
            return pattern
        return self._oeb_apply(pattern, groups, layer, self._count(layer, "oeb"))

    def _oeb_groups(self, lab: dict[str, Tensor], layer: int, n_q: int, n_k: int,
                    rows: tuple[int, int] | None = None) -> _Groups | None:
        """OEB's same and bridge groups (key masks ``[batch, 1, row, key]``) for query rows
        ``rows`` (default: all ``n_q``) of a pass with ``n_q`` queries and ``n_k`` keys, or
        None when no row is a thinking or summary query (nothing to edit). Layers of one
        pass with the same keys and window share them."""
        rows = None if rows == (0, n_q) else rows
        key = ("oeb", n_q, n_k, rows, self._windows.get(layer))
        if key not in self._per_pass:
            self._per_pass[key] = self._make_groups(lab, layer, n_q, n_k, rows)
        return self._per_pass[key]

    def _make_groups(self, lab: dict[str, Tensor], layer: int, n_q: int, n_k: int,
                     rows: tuple[int, int] | None) -> _Groups | None:
        total = lab["segment"].shape[1]
        a, b = rows or (0, n_q)
        # queries are the last n_q known positions, keys the last n_k (a sliding-window
        # cache may hold fewer than all)
        q0 = total - n_q
        q_seg = lab["segment"][:, q0 + a:q0 + b]
        k_seg = lab["segment"][:, total - n_k:]
        group = self._group_of[(q_seg + 1)[:, :, None], (k_seg + 1)[:, None, :]]
        visible = lab["valid"][:, None, total - n_k:]
        width = self._windows.get(layer)
        if n_q > 1 or width is not None:
            dev = visible.device
            q_pos = torch.arange(q0 + a, q0 + b, device=dev)[:, None]
            k_pos = torch.arange(total - n_k, total, device=dev)[None, :]
            sight = k_pos <= q_pos
            if width is not None:
                sight = sight & (k_pos > q_pos - width)
            visible = visible & sight
        group = group * visible  # [batch, row, key]: 1 same, 2 bridge, 0 neither
        if not bool(group.any()):
            return None
        return _groups(group[:, None] == 1, group[:, None] == 2, self.tau_max)

    def _oeb_apply(self, pattern: Pattern, groups: _Groups, layer: int,
                   count: bool) -> Pattern:
        """:func:`odds_equal_bridge` on ``pattern`` with the given groups; adds to the
        statistics when ``count`` (the first time this pass reaches ``layer``; on
        detached values, so that checkpointing does not see it)."""
        out, act, row, m_b = _oeb(pattern, groups)
        if count:
            self.stats.add_oeb(layer, act, row, m_b, groups.tau_b, groups.nonempty)
        return out

    def _keep_values(self, v: Tensor, hook) -> None:
        self._keep_v(v, _layer_of(hook.name))

    def _keep_v(self, v: Tensor, layer: int) -> None:
        """``hook_v`` ``[batch, pos, kv_head, d_head]``: keep it with the key/value heads
        expanded to query heads (Hugging Face's ``repeat_kv`` order), for ``hook_z``."""
        n_rep = self.model.cfg.n_heads // v.shape[2]
        self._values[layer] = einops.repeat(
            v, "batch pos kv_head d -> batch pos (kv_head rep) d", rep=n_rep)

    def _smi_hook(self, act: Tensor, hook) -> Tensor:
        return self._smi(act, _layer_of(hook.name))

    def _smi(self, act: Tensor, layer: int) -> Tensor:
        """SMI on one layer's activation ``[batch, pos, ...]`` (``hook_resid_post``, or
        ``hook_z`` for ``paper_code``), for either engine."""
        n_q = act.shape[1]
        key = ("smi", n_q, act.shape[0])
        if key not in self._per_pass and n_q == 1:  # a generation step: the rows' last labels
            self._check_batch(act)
            rows = self.tracker.rows
            thinking = [r.segment[-1] == _T for r in rows]
            # resid_post's window: the step's last non-space tokens; paper_code's: the
            # step's last tokens (spaces inside it included)
            steps = [r.step[-1] if t and (r.anchored[-1] or self.smi_variant != "resid_post")
                     else -1 for r, t in zip(rows, thinking)]
            starts = [t and r.start[-1] for r, t in zip(rows, thinking)]
            live = [s >= 0 for s in steps]
            live = torch.tensor(live, device=act.device) if any(live) and not all(live) \
                else any(live)
            self._per_pass[key] = (steps, starts, live)
        elif key not in self._per_pass:  # the labels of this pass's positions
            lab = self._check_batch(act)
            total = lab["segment"].shape[1]
            pos = slice(total - n_q, total)
            thinking = lab["segment"][:, pos] == _T
            # resid_post's window: the step's last non-space tokens; paper_code's: the
            # step's last tokens (spaces inside it included)
            inside = thinking & lab["anchored"][:, pos] if self.smi_variant == "resid_post" \
                else thinking
            self._per_pass[key] = (torch.where(inside, lab["step"][:, pos], -1).tolist(),
                                   (thinking & lab["step_start"][:, pos]).tolist(), None)
        steps, starts, live = self._per_pass[key]  # [batch] or [batch][pos] lists
        if self.smi_variant == "resid_post":
            src = act  # the window's activations at the same hook
        else:
            src = self._values.pop(layer, None)  # the values
            if src is None or src.shape[:2] != act.shape[:2]:
                raise StepSalError(f"smi_variant='paper_code' saw blocks.{layer}.attn.hook_z "
                                   f"without the same pass's hook_v (the attention ran outside "
                                   f"its block?); use smi_variant='resid_post' for this model")
        # Per row: the last `window` source activations of the latest thinking step seen so
        # far (right-aligned in `vec`, `count` of them valid). Each pass starts from the
        # state the previous pass left, so a pass re-run by checkpointing starts the same way.
        state = self._buffers.get(layer)
        if state is None or state["pass"] != self._pass:
            b, w = act.shape[0], self.window
            init = state["end"] if state else {
                "vec": src.new_zeros((b, w, *src.shape[2:])).detach(),
                "count": [0] * b, "step": [-1] * b}
            state = {"pass": self._pass, "init": init}
            self._buffers[layer] = state
        count = self._count(layer, "smi")
        if n_q == 1:
            out, state["end"] = self._smi_one(act, src, steps, starts, live, state["init"],
                                              layer, count)
        else:
            out, state["end"] = self._smi_block(act, src, steps, starts, state["init"], layer,
                                                count)
        return out

    def _inject(self, out: Tensor, act: Tensor, b: int, i: int, window: Tensor, layer: int,
                count: bool) -> Tensor:
        if out is act:
            out = act.clone()
        out[b, i] = step_momentum(act[b, i], window, self.alpha)
        if count:
            self.stats.smi_injections[layer][b] += 1
        return out

    def _smi_one(self, act, src, steps, starts, live, buf, layer, count):
        """One new position per row (a KV-cached step): the bookkeeping on the rows' plain
        ints, the window shifted by one tensor op for all rows. ``act`` is edited, ``src``
        feeds the window (the same tensor for ``resid_post``); ``steps`` and ``starts``
        hold one label per row, ``live`` says which rows' windows move (True: all, False:
        none, else a ``[batch]`` mask)."""
        w = self.window
        vec, n, step = buf["vec"], list(buf["count"]), list(buf["step"])
        out = act
        for b, (s, is_start) in enumerate(zip(steps, starts)):
            if s < 0:
                continue
            if is_start and step[b] == s - 1 and n[b] > 0:
                out = self._inject(out, act, b, 0, vec[b, w - n[b]:], layer, count)
            if s != step[b]:
                n[b], step[b] = 0, s
            n[b] = min(n[b] + 1, w)
        if live is not False:
            new = src[:, :1]
            new = new.detach() if new.requires_grad else new
            shifted = torch.cat([vec[:, 1:], new if new.dtype == vec.dtype else new.to(vec.dtype)],
                                dim=1)
            if live is not True:
                shifted = torch.where(live.view(-1, *([1] * (vec.dim() - 1))), shifted, vec)
            vec = shifted
        return out, {"vec": vec, "count": n, "step": step}

    def _smi_block(self, act, src, steps, starts, buf, layer, count):
        """Many positions per row (prompt, teacher-forced trace, uncached step)."""
        w = self.window
        out = act
        vec, n, step = buf["vec"].clone(), list(buf["count"]), list(buf["step"])
        for b in range(act.shape[0]):
            if all(s < 0 for s in steps[b]):
                continue
            cur = step[b]
            win = [vec[b, j] for j in range(w - n[b], w)]
            for i, (s, is_start) in enumerate(zip(steps[b], starts[b])):
                if s < 0:
                    continue
                if is_start and cur == s - 1 and win:
                    out = self._inject(out, act, b, i, torch.stack(win), layer, count)
                if cur != s:
                    cur, win = s, []
                win = (win + [src[b, i]])[-w:]
            step[b], n[b] = cur, len(win)
            vec[b] = 0
            if win:  # copies: later hooks may edit the activation in place
                vec[b, w - len(win):] = torch.stack(win).detach().to(vec.dtype)
        return out, {"vec": vec, "count": n, "step": step}

    def _check_batch(self, act: Tensor) -> dict[str, Tensor]:
        lab = getattr(self, "_labels", None)
        if lab is None or act.shape[0] != lab["segment"].shape[0]:
            raise StepSalError(
                f"StepFlow's hook got a batch of {act.shape[0]} but followed "
                f"{0 if lab is None else lab['segment'].shape[0]} sequences; call the model "
                f"with token ids (model(tokens) / model.generate(...)) inside the stepflow block")
        return lab

    # ---- context management ----------------------------------------------------------------
    @contextmanager
    def active(self) -> Iterator[StepFlow]:
        """Hooks on for the duration of the block; always removed, even on errors.

        Blocks do not nest on one model: two trackers would each see every pass and two
        sets of edits would compound, so a second block raises.
        """
        from stepsal_lens.models import require_hooks

        if self.model in _ACTIVE:
            raise StepSalError(f"a stepflow block is already active on this model "
                               f"({_ACTIVE[self.model].config}); stepflow blocks do not "
                               f"nest - leave the first block, or change its StepFlowConfig")
        hooks = self.hooks() if self.engine == "hook_pattern" else []
        require_hooks(self.model, [name for name, _ in hooks])
        with ExitStack() as stack:
            _ACTIVE[self.model] = self
            stack.callback(_ACTIVE.pop, self.model, None)
            if self.engine == "fused":
                from stepsal_lens.fused_stepflow import fused_hooks

                stack.enter_context(fused_hooks(self))
                yield self
                return
            handle = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            stack.callback(handle.remove)
            stack.enter_context(self.model.hooks(fwd_hooks=hooks))
            yield self

    def __repr__(self) -> str:
        return f"StepFlow({self.config}, engine={self.engine!r})"


#: The StepFlow active on each model (blocks do not nest).
_ACTIVE: weakref.WeakKeyDictionary[Any, StepFlow] = weakref.WeakKeyDictionary()


def active_stepflow(model: Any) -> StepFlow | None:
    """The StepFlow whose block is open on ``model`` (None outside any block); results
    computed inside record its config."""
    return _ACTIVE.get(model)


def _smi_site(settings: dict[str, Any]) -> dict[str, Any]:
    """Map the removed ``smi_site`` option, or refuse it naming the new one."""
    site = settings.pop("smi_site", None)
    if site is not None and (site != "resid_post"
                             or settings.get("smi_variant", "resid_post") != "resid_post"):
        raise StepSalError(
            f"smi_site={site!r} was removed; pass smi_variant='paper_code' for the paper "
            f"code's SMI (alpha * mean of the values added to each head's hook_z, first "
            f"SMI layer only) or smi_variant='resid_post' (the default)")
    return settings


def _sliding_windows(model: Any) -> dict[int, int]:
    """Layer -> sliding-window width, for layers with local attention (GPT-OSS)."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    width = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not width or not types:
        return {}
    return {i: int(width) for i, t in enumerate(types) if t == "sliding_attention"}


@contextmanager
def stepflow(model: Any, config: StepFlowConfig | None = None, *, engine: str = "auto",
             **settings: Any) -> Iterator[StepFlow]:
    """Turn StepFlow on for every forward pass of ``model`` inside the block.

    Works with KV-cached and uncached ``model.generate`` (batched prompts included) and
    with teacher-forced forward passes, e.g. :func:`~stepsal_lens.step_saliency` over a
    fixed trace. Hooks are removed when the block ends, also on an exception. Blocks do
    not nest on one model (a second raises).

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm` (its format locates the segments).
    config
        A :class:`~stepsal_lens.StepFlowConfig` (default: the paper's settings).
    **settings
        Fields of :class:`~stepsal_lens.StepFlowConfig` that override ``config``
        (``tau_max``, ``alpha``, ``oeb_layers``, ``smi_layers``, ``window``,
        ``smi_variant``). ``smi_variant="resid_post"`` (the design card) adds ``alpha``
        times the mean ``hook_resid_post`` over the previous step's last ``window``
        non-space tokens at each new thinking step's first token, in every SMI layer;
        ``"paper_code"`` (the paper's code) adds the mean value vector (``hook_v``) to
        each head's ``hook_z``, in the first SMI layer only (docs/stepflow.md).
    engine
        ``"hook_pattern"``: hooks on the bridge's ``hook_pattern`` and ``hook_resid_post``
        (anything can run inside the block: other hooks, ``run_with_cache``,
        :func:`~stepsal_lens.step_saliency`). ``"fused"``: OEB as an attention function
        and SMI as module hooks on the Hugging Face model inside the bridge
        (:mod:`stepsal_lens.fused_stepflow`; the same results, at Hugging Face's speed,
        for forward passes and generation only: the bridge's hook points do not run).
        ``"auto"`` (default): ``"hook_pattern"`` in a block;
        :func:`~stepsal_lens.generation.generate` chooses ``"fused"``.

    Yields
    ------
    StepFlow
        ``sf.config`` (resolved), ``sf.stats`` (:class:`StepFlowStats`), ``sf.tracker``
        (:class:`SegmentTracker`) and ``sf.engine`` (the engine that runs).
    """
    settings = _smi_site(dict(settings))
    config = config or StepFlowConfig()
    if settings:
        try:
            config = replace(config, **settings)
        except TypeError:
            known = [f.name for f in fields(StepFlowConfig)]
            raise StepSalError(f"unknown StepFlow setting(s) {sorted(settings)}; known: "
                               f"{known}") from None
    from stepsal_lens.fused_stepflow import choose_engine

    used, reason = choose_engine(model, engine, block=True)
    sf = StepFlow(model, config, used, reason)
    with sf.active():
        yield sf


class _CallableModule(types.ModuleType):
    """Lets ``stepsal_lens.stepflow`` be both this module and the context manager, so
    ``with stepflow(model):`` and ``stepflow.odds_equal_bridge`` both read naturally."""

    def __call__(self, model: Any, config: StepFlowConfig | None = None, *,
                 engine: str = "auto", **settings: Any):
        return stepflow(model, config, engine=engine, **settings)


sys.modules[__name__].__class__ = _CallableModule
