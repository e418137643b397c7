"""Pooling token-level saliency into step-to-step maps: the method's core, pure tensors.

Steps are contiguous token ranges, so a block of saliency rows ``[head, row, key]`` is
pooled with cumulative sums along keys and one gather per step boundary
(:func:`key_step_sums`, :func:`row_step_sums`), never an index_add over every key. Both
engines use these functions: the hook_pattern engine through :func:`pool_saliency`, the
fused engine block by block through :func:`pool_block`. Definitions: docs/concepts.md.

Examples
--------
>>> import torch
>>> from stepsal_lens.core.pooling import pool_saliency
>>> pattern = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]])
>>> grad = torch.ones_like(pattern)
>>> pool_saliency(pattern, grad, torch.tensor([0, 1, 1]), 2)[0]
tensor([[1.0000, 0.0000],
        [0.3500, 0.3250]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.typing import Pattern, PatternGrad

__all__ = [
    "key_step_sums",
    "pool_block",
    "pool_saliency",
    "row_step_sums",
    "spans_of_steps",
    "step_bounds",
    "step_means",
]


def pool_saliency(pattern: Pattern, grad: PatternGrad, step_of_token: Int[Tensor, " token"],
                  n_steps: int, *, chunk: int = 256) -> Float[Tensor, "head step step"]:
    """Pool ``|A * dL/dA|`` of one layer into a step-to-step map, in float32.

    Parameters
    ----------
    pattern, grad
        ``[1, head, token, token]`` post-softmax pattern and its gradient (any dtype);
        causal (zero above the diagonal), as for every supported model.
    step_of_token
        ``[token]`` step index of each token, ``-1`` for tokens in no step; each step's
        tokens form one contiguous range (query row ``i`` is token ``key - query + i``).
    n_steps
        Number of steps.
    chunk
        Query rows processed at a time (bounds the temporaries to
        ``head x chunk x token`` floats).

    Returns
    -------
    Tensor
        ``[head, step, step]``: the mean saliency over all (query, key) pairs of two
        steps, causally masked pairs (zeros) included.
    """
    if pattern.shape[0] != 1:
        raise StepSalError(f"pool_saliency takes one sequence; got batch {pattern.shape[0]}")
    n_heads, n_q, n_k = pattern.shape[1:]
    starts, ends = step_bounds(spans_of_steps(step_of_token, n_steps), pattern.device)
    offset = n_k - n_q  # keys before the first query (0 without a KV cache)
    # Query rows in chunks so temporaries stay small; each chunk stops at its last visible
    # key (the pattern is exactly 0 beyond it), and steps are pooled by their boundaries.
    sums = torch.zeros(n_heads, n_steps, n_steps, device=pattern.device)
    for a in range(0, n_q, chunk):
        b = min(a + chunk, n_q)
        k = b + offset
        sal = (pattern[0, :, a:b, :k].float() * grad[0, :, a:b, :k].float()).abs_()
        pool_block(sal, starts, ends, row0=a + offset, key0=0, out=sums)
    return step_means(sums, starts, ends)


def spans_of_steps(step_of_token: Int[Tensor, " token"], n_steps: int) -> list[tuple[int, int]]:
    """Token span of each step from a per-token step index (``-1``: no step); every step's
    tokens must be one contiguous range, as in a :class:`~stepsal_lens.Trace`.

    >>> spans_of_steps(torch.tensor([-1, 0, 0, -1, 1]), 2)
    [(1, 3), (4, 5)]
    """
    spans = []
    for i in range(n_steps):
        where = (step_of_token == i).nonzero().flatten()
        if len(where) == 0:
            raise StepSalError(f"step {i} has no tokens (n_steps={n_steps})")
        a, b = int(where[0]), int(where[-1]) + 1
        if len(where) != b - a:
            raise StepSalError(f"step {i}'s tokens are not one contiguous range "
                               f"({where.tolist()[:8]}...); steps are contiguous token spans")
        spans.append((a, b))
    return spans


def step_bounds(spans: Sequence[tuple[int, int]], device: torch.device | str | None = None
                ) -> tuple[Int[Tensor, " step"], Int[Tensor, " step"]]:
    """Start and end (exclusive) token of each step, as int64 tensors.

    >>> step_bounds([(1, 4), (4, 9)])
    (tensor([1, 4]), tensor([4, 9]))
    """
    if not spans:
        raise StepSalError("no steps to pool; the trace needs at least one step")
    starts = torch.tensor([a for a, _ in spans], dtype=torch.long, device=device)
    ends = torch.tensor([b for _, b in spans], dtype=torch.long, device=device)
    if bool((ends <= starts).any()) or bool((starts[1:] < ends[:-1]).any()):
        raise StepSalError(f"step token spans must be non-empty, sorted and disjoint; got {list(spans)}")
    return starts, ends


def key_step_sums(x: Float[Tensor, "*rows key"], starts: Int[Tensor, " step"],
                  ends: Int[Tensor, " step"], key0: int = 0) -> Float[Tensor, "*rows step"]:
    """Sum ``x`` over each step's keys: one cumulative sum, one gather per boundary.

    ``x[..., j]`` holds key ``key0 + j``; keys outside ``x`` count as 0 (masked). The
    cumulative sum runs in float64, so a small step far from a large one keeps its digits.

    >>> key_step_sums(torch.tensor([[1., 2., 3., 4.]]), torch.tensor([0, 1]), torch.tensor([1, 4]))
    tensor([[1., 9.]])
    """
    n = x.shape[-1]
    csum = F.pad(x.cumsum(-1, dtype=torch.float64), (1, 0))
    lo = (starts - key0).clamp(0, n)
    hi = (ends - key0).clamp(0, n)
    return (csum.index_select(-1, hi) - csum.index_select(-1, lo)).to(x.dtype)


def row_step_sums(x: Float[Tensor, "head row key"], starts: Int[Tensor, " step"],
                  ends: Int[Tensor, " step"], row0: int = 0
                  ) -> tuple[Float[Tensor, "head seg key"], Int[Tensor, " seg"]]:
    """Sum the rows of ``x`` (token ``row0 + i``) per step present among them.

    Returns the sums and the step of each; rows in no step are dropped. One
    ``[seg, row]`` indicator matmul, however many steps the rows cover.

    >>> sums, steps = row_step_sums(torch.ones(1, 3, 2), torch.tensor([0, 2]), torch.tensor([2, 3]), row0=1)
    >>> sums.tolist(), steps.tolist()
    ([[[1.0, 1.0], [1.0, 1.0]]], [0, 1])
    """
    n = x.shape[1]
    lo = (starts - row0).clamp(0, n)
    hi = (ends - row0).clamp(0, n)
    seg = (hi > lo).nonzero().flatten()
    rows = torch.arange(n, device=x.device)
    ind = ((rows >= lo[seg, None]) & (rows < hi[seg, None])).to(x.dtype)  # [seg, row]
    return torch.matmul(ind, x), seg


def pool_block(sal: Float[Tensor, "head row key"], starts: Int[Tensor, " step"],
               ends: Int[Tensor, " step"], *, row0: int, key0: int,
               out: Float[Tensor, "head step step"] | None = None
               ) -> Float[Tensor, "head step step"]:
    """Add a block of token saliency into per-step-pair sums.

    Parameters
    ----------
    sal
        ``|A * dL/dA|`` for query tokens ``row0 ...`` and key tokens ``key0 ...``.
    starts, ends
        Step boundaries (:func:`step_bounds`).
    row0, key0
        First query and key token of the block.
    out
        ``[head, step, step]`` sums to add into (float32); a new one when None.

    Returns
    -------
    Tensor
        ``out``: ``out[h, i, j]`` += sum of ``sal`` over query tokens of step ``i`` and
        key tokens of step ``j`` inside the block.
    """
    if out is None:
        out = sal.new_zeros(sal.shape[0], len(starts), len(starts), dtype=torch.float32)
    rows, seg = row_step_sums(sal, starts, ends, row0)
    if len(seg):
        out[:, seg] += key_step_sums(rows, starts, ends, key0).float()
    return out


def step_means(sums: Float[Tensor, "*head step step"], starts: Int[Tensor, " step"],
               ends: Int[Tensor, " step"]) -> Float[Tensor, "*head step step"]:
    """Sums over step pairs divided by the pair counts (``n_i * n_j``): the step map.

    >>> step_means(torch.ones(2, 2), torch.tensor([0, 1]), torch.tensor([1, 3]))
    tensor([[1.0000, 0.5000],
            [0.5000, 0.2500]])
    """
    n = (ends - starts).to(sums.device, torch.float32)
    return sums / (n[:, None] * n[None, :])
