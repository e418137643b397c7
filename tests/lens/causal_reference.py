"""An independent computation of the causal effect matrix on the raw Hugging Face model.

Nothing from stepsal_lens is used except the Trace's token ids and step spans. The cut
of key step j is an attention mask: with ``via="mask"`` Hugging Face eager gets a 4D
float additive ``attention_mask`` ``[1, 1, T, T]`` (``finfo.min`` at suppressed and
causally masked pairs; valid only when no layer has a sliding window, since a 4D mask
replaces the model's own masks in every layer); with ``via="attention"`` an attention
function registered through ``AttentionInterface`` builds the causal mask, the sliding
window (from its ``sliding_window`` argument), the cut (per layer) and the sinks itself.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

NAME = "stepsal_causal_reference"


def _attention(cuts: dict[int, torch.Tensor]):
    """Eager attention (GQA, sinks, sliding windows) with the pairs in ``cuts[layer]``
    (bool ``[T, T]``, True = suppressed) masked out of the logits."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = module.num_key_value_groups
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        logits = query @ k.transpose(2, 3) * scaling
        n_q, n_k = logits.shape[-2:]
        pos_q = torch.arange(n_k - n_q, n_k)[:, None]
        pos_k = torch.arange(n_k)[None]
        visible = pos_k <= pos_q
        window = kwargs.get("sliding_window")
        if window:
            visible = visible & (pos_q - pos_k < window)
        cut = cuts.get(module.layer_idx)
        if cut is not None:
            visible = visible & ~cut[-n_q:, :n_k]
        logits = logits.masked_fill(~visible, float("-inf"))
        sinks = getattr(module, "sinks", None)
        if sinks is not None:
            logits = torch.cat([logits, sinks.reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)],
                               -1)
        probs = logits.softmax(-1)
        if sinks is not None:
            probs = probs[..., :-1]
        return (probs @ v).transpose(1, 2).contiguous(), probs

    return attention


def logits_with_cuts(hf, ids: torch.Tensor, cuts: dict[int, torch.Tensor],
                     via: str = "attention") -> torch.Tensor:
    """``[T, vocab]`` float64 log-probs of ``hf`` on ``ids`` with the cuts applied."""
    T = ids.shape[1]
    with torch.no_grad():
        if via == "mask":
            layers = {cut for cut in map(id, cuts.values())}
            assert len(layers) <= 1, "a 4D mask applies the same cut in every layer"
            allowed = torch.ones(T, T, dtype=torch.bool).tril()
            if cuts:
                allowed &= ~next(iter(cuts.values()))
            dtype = next(hf.parameters()).dtype
            mask = torch.zeros(1, 1, T, T, dtype=dtype).masked_fill(~allowed,
                                                                    torch.finfo(dtype).min)
            logits = hf(ids, attention_mask=mask).logits
        else:
            AttentionInterface.register(NAME, _attention(cuts))
            old = hf.config._attn_implementation
            hf.set_attn_implementation(NAME)
            try:
                logits = hf(ids).logits
            finally:
                hf.set_attn_implementation(old)
    return logits[0].double().log_softmax(-1)


def reference_effects(hf, trace, layers: list[int] | None = None, via: str = "attention"):
    """``[n_steps, n_steps]`` effects with the cut in ``layers`` (default all)."""
    ids = trace.token_ids[None]
    T, n = ids.shape[1], trace.n_steps
    n_layers = hf.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else layers
    base = logits_with_cuts(hf, ids, {}, via)
    out = torch.zeros(n, n, dtype=torch.float64)
    for j in range(n - 1):
        a, b = trace.steps[j].token_span
        cut = torch.zeros(T, T, dtype=torch.bool)
        cut[b:, a:b] = True  # every position after step j loses step j's keys
        shared = cut
        lp = logits_with_cuts(hf, ids, {l: shared for l in layers}, via)
        kl = (base.exp() * (base - lp)).sum(-1)  # kl[p]: the prediction made at p
        for i in range(j + 1, n):
            ts = [t for t in range(*trace.steps[i].token_span) if t >= 1]
            out[i, j] = torch.stack([kl[t - 1] for t in ts]).mean()
    return out
