"""StepFlow's two interventions as pure tensor functions (no model, no hooks).

* :func:`odds_equal_bridge` (OEB) rescales one attention row's *bridge* group B to
  ``tau_B = min(sqrt(|B| / (|B| + |S|)), tau_max)`` when it holds less, the *same* group S
  to ``1 - p_O - tau_B`` and leaves every other key alone: the KL projection the paper
  writes as the logit shift ``z_k + log(tau_g / p_g)``. Rows that sum below 1 (attention
  sinks) keep their sink mass.
* :func:`step_momentum` (SMI) adds ``alpha`` times the mean of a window of earlier
  positions' vectors.

The hooks that apply them live in :mod:`stepsal_lens.lens.stepflow`; the definitions in
docs/concepts.md.

Examples
--------
>>> import torch
>>> from stepsal_lens.core.interventions import odds_equal_bridge
>>> row = torch.tensor([[[[0.05, 0.05, 0.9]]]])  # bridge keys 0-1, same key 2
>>> new = odds_equal_bridge(row, same=torch.tensor([False, False, True]),
...                         bridge=torch.tensor([True, True, False]), tau_max=0.5)
>>> [round(v, 3) for v in new[0, 0, 0].tolist()]
[0.25, 0.25, 0.5]
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.typing import KeyMask, Pattern

__all__ = ["odds_equal_bridge", "step_momentum"]


def _oeb(pattern: Tensor, same: Tensor, bridge: Tensor, tau_max: float):
    """OEB plus what it did: (new pattern, eligible rows, triggered rows, p_B, tau_B).
    ``same`` and ``bridge`` must be disjoint (checked by :func:`odds_equal_bridge`)."""
    p = pattern.float()
    same_f, bridge_f = same.to(p.dtype), bridge.to(p.dtype)
    row = p.sum(-1)
    safe_row = row.clamp_min(torch.finfo(p.dtype).tiny)
    p_s = (p * same_f).sum(-1) / safe_row
    p_b = (p * bridge_f).sum(-1) / safe_row
    n_s, n_b = same_f.sum(-1), bridge_f.sum(-1)
    tau_b = torch.sqrt(n_b / (n_b + n_s).clamp_min(1)).clamp(max=tau_max)
    tau_s = p_s + p_b - tau_b  # = 1 - p_O - tau_B
    eligible = (n_b > 0) & (n_s > 0) & (row > 0)
    # tau_S <= 0 means the other keys hold so much mass that B cannot reach tau_B.
    act = eligible & (p_b > 0) & (p_s > 0) & (p_b < tau_b) & (tau_s > 0)
    one = torch.ones_like(p_b)
    scale_b = torch.where(act, tau_b / p_b.clamp_min(1e-30), one)
    scale_s = torch.where(act, tau_s / p_s.clamp_min(1e-30), one)
    factor = 1 + (scale_b - 1)[..., None] * bridge_f + (scale_s - 1)[..., None] * same_f
    out = (p * factor).to(pattern.dtype)
    return out, eligible.expand_as(row), act.expand_as(row), p_b.expand_as(row), tau_b.expand_as(row)


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
    return _oeb(pattern, same, bridge, tau_max)[0]


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

