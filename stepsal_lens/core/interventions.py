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

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.typing import KeyMask, Pattern
from stepsal_lens._checks import check_type

__all__ = ["odds_equal_bridge", "step_momentum"]


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
    for name, value in (("pattern", pattern), ("same", same), ("bridge", bridge)):
        check_type(value, torch.Tensor, name, "a torch.Tensor",
                   "pass torch tensors (torch.tensor(...)); masks as bool tensors")
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
    for name, value in (("x", x), ("window", window)):
        check_type(value, torch.Tensor, name, "a torch.Tensor", "pass torch tensors")
    if window.shape[0] == 0:
        return x
    return x + alpha * window.mean(0).to(x.dtype)
