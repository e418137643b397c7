"""Attention knockout as pure tensor math: which (query, key) pairs are cut, and the
renormalised pattern.

Suppressing key tokens ``K`` for a query masks their attention logits with ``-inf``; on
the post-softmax pattern that is exactly ``A'[k] = 0`` for ``k`` in ``K`` and
``A'[k] = A[k] / (1 - suppressed mass)`` otherwise (sinks keep their logit). The hook
wrapper is :class:`~stepsal_lens.lens.knockout.Knockout`.

Examples
--------
>>> import torch
>>> from stepsal_lens.core.knockout import suppress_attention
>>> row = torch.tensor([[[[0.5, 0.25, 0.25]]]])
>>> cut = torch.tensor([[[[True, False, False]]]])
>>> suppress_attention(row, cut)[0][0, 0, 0].tolist()
[0.0, 0.5, 0.5]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.typing import Pattern

__all__ = ["Span", "Suppression", "suppress_attention", "suppression_mask"]

Span = tuple[int, int]


@dataclass(frozen=True)
class Suppression:
    """One cut: queries in ``queries`` may not attend to keys in ``keys``.

    Positions are token indices of the sequence as a :class:`~stepsal_lens.Trace` numbers
    them (BOS included, padding excluded), end exclusive.

    Attributes
    ----------
    keys
        ``(start, end)`` token span of the suppressed keys (e.g. a step's ``token_span``).
    queries
        ``(start, end)`` span of the affected queries; ``end=None`` means "to the end,
        generated tokens included". Default ``None``: every position from ``keys[1]`` on
        (every token after the key step).
    layers, heads
        Where the cut applies; ``None`` = every layer / every head.
    """

    keys: Span
    queries: tuple[int, int | None] | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    def __post_init__(self):
        a, b = self.keys
        if not 0 <= a < b:
            raise StepSalError(f"keys must be a non-empty token span (start, end) with "
                               f"0 <= start < end; got {self.keys}")
        if self.queries is not None:
            qa, qb = self.queries
            if qa < 0 or (qb is not None and qb <= qa):
                raise StepSalError(f"queries must be a token span (start, end or None) with "
                                   f"0 <= start < end; got {self.queries}")

    @property
    def query_span(self) -> tuple[int, int | None]:
        return (self.keys[1], None) if self.queries is None else self.queries


def suppression_mask(query_pos: Int[Tensor, "batch query"], key_pos: Int[Tensor, "batch key"],
                     rows: Sequence[Sequence[Suppression]], n_heads: int,
                     layer: int | None = None) -> Bool[Tensor, "batch head query key"] | None:
    """Which (query, key) pairs each batch row suppresses in one layer.

    Parameters
    ----------
    query_pos, key_pos
        Token position of each query / key in its row's own numbering; ``-1`` for padding
        (never suppressed).
    rows
        The cuts of each batch row (one list per row).
    n_heads
        Number of query heads.
    layer
        The layer being edited; cuts restricted to other layers are skipped.

    Returns
    -------
    Tensor or None
        ``[batch, head, query, key]`` boolean (``head`` is 1 when no cut names heads), or
        ``None`` when nothing is cut in this layer.

    Examples
    --------
    >>> pos = torch.arange(4)[None]
    >>> suppression_mask(pos, pos, [[Suppression(keys=(1, 2))]], n_heads=2)[0, 0].int()
    tensor([[0, 0, 0, 0],
            [0, 0, 0, 0],
            [0, 1, 0, 0],
            [0, 1, 0, 0]], dtype=torch.int32)
    """
    if len(rows) != query_pos.shape[0]:
        raise StepSalError(f"{len(rows)} rows of cuts for a batch of {query_pos.shape[0]}")
    live = [[s for s in cuts if s.layers is None or layer is None or layer in s.layers]
            for cuts in rows]
    if not any(live):
        return None
    by_head = any(s.heads is not None for cuts in live for s in cuts)
    b, n_q, n_k = query_pos.shape[0], query_pos.shape[1], key_pos.shape[1]
    out = torch.zeros(b, n_heads if by_head else 1, n_q, n_k, dtype=torch.bool,
                      device=query_pos.device)
    for r, cuts in enumerate(live):
        qp, kp = query_pos[r], key_pos[r]
        for s in cuts:
            qa, qb = s.query_span
            q_sel = (qp >= qa) & (qp >= 0)
            if qb is not None:
                q_sel &= qp < qb
            k_sel = (kp >= s.keys[0]) & (kp < s.keys[1]) & (kp >= 0)
            pair = q_sel[:, None] & k_sel[None, :]
            if s.heads is None:
                out[r] |= pair
            else:
                out[r, list(s.heads)] |= pair
    return out


def suppress_attention(pattern: Pattern, suppressed: Bool[Tensor, "#batch #head query key"],
                       *, sinks: bool = False) -> tuple[Pattern, Int[Tensor, ""]]:
    """Mask attention logits at ``suppressed`` pairs, on the post-softmax pattern.

    Parameters
    ----------
    pattern
        ``[batch, head, query, key]`` post-softmax attention (rows may sum to < 1 with
        attention sinks).
    suppressed
        Boolean pairs to cut, broadcastable to ``pattern``.
    sinks
        The model has attention sinks: the row's missing mass ``1 - sum_k A[k]`` is the
        sink's, which stays and is renormalised with the kept keys. Without sinks the
        divisor is the kept mass alone.

    Returns
    -------
    (Tensor, Tensor)
        The edited pattern (same dtype), and how many rows were left unchanged because
        every key they can see was suppressed (and no sink).

    Examples
    --------
    >>> a = torch.tensor([[[[0.5, 0.3, 0.2]]]])
    >>> cut = torch.tensor([False, True, False])[None, None, None]   # [1, 1, 1, key]
    >>> out, left = suppress_attention(a, cut)
    >>> [round(x, 4) for x in out.flatten().tolist()], int(left)
    ([0.7143, 0.0, 0.2857], 0)
    >>> sink = torch.tensor([[[[0.4, 0.3, 0.1]]]])   # sink mass 0.2 stays in the softmax
    >>> [round(x, 4) for x in suppress_attention(sink, cut, sinks=True)[0].flatten().tolist()]
    [0.5714, 0.0, 0.1429]
    """
    p = pattern.float() if pattern.dtype in (torch.float16, torch.bfloat16) else pattern
    kept = p.masked_fill(suppressed, 0.0)
    denom = kept.sum(-1, keepdim=True)
    if sinks:
        denom = denom + (1 - p.sum(-1, keepdim=True)).clamp_min(0)
    touched = suppressed.expand_as(p).any(-1, keepdim=True) & (p > 0).any(-1, keepdim=True)
    empty = touched & (denom <= torch.finfo(p.dtype).tiny)
    out = torch.where(empty | ~touched, p, kept / denom.clamp_min(torch.finfo(p.dtype).tiny))
    return out.to(pattern.dtype), empty.sum()
