"""The fused Step-Saliency engine: attention x gradient pooled inside attention's backward.

The ``hook_pattern`` engine (:mod:`stepsal_lens.lens.saliency`) runs TransformerLens's eager
attention, which materialises every layer's ``[head, token, token]`` pattern, its
gradient and several temporaries. This engine computes the same maps at about the cost
of one forward and backward pass with a fused attention kernel:

* **Where it runs.** ``bridge.original_model`` stays a valid Hugging Face model. For the
  call, :func:`fused_attention` puts each layer's Hugging Face attention module back in
  place of its TransformerLens ``AttentionBridge`` and sets the config's attention
  implementation to one registered with transformers' ``AttentionInterface``; both are
  restored in ``finally``. The rest of the bridge (embedding, blocks, norms, linear
  layers) runs as usual, so logits are the bridge's.
* **Forward.** ``FusedAttention.forward`` gets post-RoPE ``q`` ``[1, head, T, d]`` and
  ``k``, ``v`` ``[1, kv_head, T, d]`` (key/value heads not repeated). It computes the
  output and each row's log-normaliser ``lse`` (the CPU flash kernel, or query chunks),
  GPT-OSS sinks joining the normaliser, sliding windows as a key range per chunk. It
  saves ``q``, ``k``, ``v``, the output and ``lse``: O(T) memory per layer.
* **Backward**, per chunk of query rows (one ``[head, chunk, key]`` block alive per
  buffer): ``A = exp(q k^T s - lse)`` (exactly the pattern, rows summing below 1 with
  sinks; ``-lse`` rides in the score matmul as an extra column), ``dA = dO v^T``, and
  ``A |dA|`` is pooled into the step map at once (:func:`~stepsal_lens.core.pooling.pool_block`); query heads are
  grouped per key/value head, never repeated; everything in float32. ``dq``, ``dk``,
  ``dv`` come from the CPU flash kernel's backward (exact with sinks, given the
  sink-inclusive ``lse``), or, on other devices and for sliding windows, from the same
  blocks, flash-attention style (``dS = A * (dA - rowsum(dO * O))``). The lowest
  measured layer needs none, and the layers below it run without a graph.
* **Pooling** uses the structure of the problem: steps are contiguous token ranges, so a
  block's rows are summed per step by one small matmul and its keys by one cumulative
  sum and one gather per step boundary (:func:`~stepsal_lens.core.pooling.row_step_sums`, :func:`~stepsal_lens.core.pooling.key_step_sums`).
* **Targets** with a lean form (``lm``, ``summary``, ``answer``, ``logit``) start from
  the final hidden states: the losses run through the unembedding in chunks of
  positions, recomputed in backward (:func:`~stepsal_lens.lens.targets.chunked_cross_entropy`), so ``[T, vocab]``
  float32 logits never exist at once. Other targets get the full logits.
* **Hooks.** The swapped-in attention does not run the bridge's attention hook points, so
  :func:`stepsal_lens.step_saliency` uses this engine only on a model without hooks
  (:func:`attention_hooks_in_use`) and the ``hook_pattern`` engine otherwise.

Examples
--------
>>> import torch
>>> from stepsal_lens.core.pooling import pool_block
>>> sal = torch.arange(16.0).reshape(1, 4, 4)      # [head, query, key]
>>> starts, ends = torch.tensor([0, 2]), torch.tensor([2, 4])  # steps: tokens 0-1, 2-3
>>> pool_block(sal, starts, ends, row0=0, key0=0)  # sums over each step pair
tensor([[[10., 18.],
         [42., 50.]]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from stepsal_lens.core.pooling import pool_block, step_bounds
from stepsal_lens.errors import StepSalError
from stepsal_lens.lens.bridge_mode import attention_hooks_in_use, attention_slots
from stepsal_lens.typing import Model

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FusedAttention",
    "attention_hooks_in_use",
    "choose_chunk",
    "default_budget",
    "final_hidden",
    "fused_attention",
]

#: Name under which the engine's attention function is registered with transformers.
ATTN_IMPLEMENTATION = "stepsal_fused"

# ---- pure pooling math --------------------------------------------------------------------


def choose_chunk(n_heads: int, n_keys: int, budget_bytes: int, *, n_buffers: int = 3,
                 minimum: int = 16) -> int:
    """Query rows per block so that ``n_buffers`` float32 ``[head, rows, key]`` blocks
    fit in ``budget_bytes`` (at least ``minimum`` rows, at most ``n_keys``).

    >>> choose_chunk(8, 4096, 64 * 2**20)
    170
    """
    rows = budget_bytes // max(1, n_buffers * 4 * n_heads * n_keys)
    return int(max(minimum, min(n_keys, rows)))


def default_budget(device: torch.device) -> int:
    """Bytes for one layer's blocks in backward: 48 MiB on CPU (cache-sized blocks are
    fastest there), a quarter of free memory up to 4 GiB on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(4 * 2**30, free // 4))
    return 48 * 2**20


# ---- the attention function ------------------------------------------------------------------


@dataclass
class LayerPlan:
    """What the engine does in one layer: pool or not, and the blocking."""

    layer: int
    pool: bool
    chunk: int | None = None  # query rows per block; None = from the budget
    input_grads: bool = True  # False in the lowest measured layer: nothing below needs them
    sums: Tensor | None = None  # [head, step, step] float32, filled in backward


@dataclass
class EngineState:
    """State shared by every layer's attention call during one engine run."""

    starts: Tensor
    ends: Tensor
    plans: dict[int, LayerPlan]
    budget: int
    on_layer_done: Callable[[int], None] | None = None
    calls: dict[int, int] = field(default_factory=dict)
    cpu_kernels: bool = True  # use the CPU flash kernels where they apply (tests turn it off)


_STATE: list[EngineState] = []  # the active engine (a stack, for nesting)


def _mask_block(s: Tensor, q0: int, k0: int, window: int | None) -> None:
    """-inf where key > query (causal) or key <= query - window, in place.

    ``s`` is ``[..., query, key]`` for queries ``q0...`` and keys ``k0...``."""
    n_q, n_k = s.shape[-2:]
    q = torch.arange(q0, q0 + n_q, device=s.device)[:, None]
    if window is None:  # only the diagonal block [q0, q0 + n_q) can be masked
        c0 = q0 - k0
        k = torch.arange(q0, q0 + n_k - c0, device=s.device)[None, :]
        s[..., c0:].masked_fill_(k > q, float("-inf"))
        return
    k = torch.arange(k0, k0 + n_k, device=s.device)[None, :]
    s.masked_fill_((k > q) | (k <= q - window), float("-inf"))


def _key_start(q0: int, window: int | None) -> int:
    return 0 if window is None else max(0, q0 - window + 1)


def _forward_chunked(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, scale: float,
                     window: int | None, chunk: int) -> tuple[Tensor, Tensor]:
    """Attention output ``[head, T, d]`` and log-normaliser ``[head, T]`` (float32),
    query rows in chunks; ``q`` ``[kv, group, T, d]``, ``k``, ``v`` ``[kv, T, d]``."""
    n_kv, g, n, d = q.shape
    out = q.new_empty(n_kv, g, n, v.shape[-1], dtype=torch.float32)
    lse = q.new_empty(n_kv, g, n, dtype=torch.float32)
    sink = None if sinks is None else rearrange(sinks.float(), "(kv g) -> kv g 1", kv=n_kv)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        k0 = _key_start(a, window)
        qc = rearrange(q[:, :, a:b].float() * scale, "kv g r d -> kv (g r) d")
        s = torch.bmm(qc, k[:, k0:b].float().transpose(1, 2)).view(n_kv, g, b - a, b - k0)
        _mask_block(s, a, k0, window)
        m = s.amax(-1)
        if sink is not None:
            m = torch.maximum(m, sink)
        s.sub_(m[..., None]).exp_()
        z = s.sum(-1)
        if sink is not None:
            z = z + (sink - m).exp()
        o = torch.bmm(s.view(n_kv, g * (b - a), b - k0), v[:, k0:b].float())
        out[:, :, a:b] = o.view(n_kv, g, b - a, -1) / z[..., None]
        lse[:, :, a:b] = m + z.log()
    return out.view(n_kv * g, n, -1), lse.view(n_kv * g, n)


def _forward(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, scale: float,
             window: int | None, budget: int, cpu_kernels: bool = True
             ) -> tuple[Tensor, Tensor]:
    """Output ``[1, head, T, d]`` (input dtype) and ``lse`` ``[head, T]`` float32."""
    n_heads, n = q.shape[1], q.shape[2]
    n_kv = k.shape[1]
    if q.device.type == "cpu" and window is None and cpu_kernels:
        # The CPU flash kernel returns the log-normaliser too (GQA handled inside).
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True, scale=scale)
        lse = lse[0].float()
        if sinks is not None:  # the sink joins each row's normaliser
            full = torch.logaddexp(lse, sinks.float()[:, None])
            out = out * (lse - full).exp().to(out.dtype)[None, :, :, None]
            lse = full
        return out, lse
    chunk = choose_chunk(n_heads, n if window is None else min(n, window + 256), budget,
                         n_buffers=2)
    qg = rearrange(q[0], "(kv g) t d -> kv g t d", kv=n_kv)
    out, lse = _forward_chunked(qg, k[0], v[0], sinks, scale, window, chunk)
    return out[None].to(q.dtype), lse


class FusedAttention(torch.autograd.Function):
    """Causal attention (GQA, sinks, sliding window) whose backward pools Step-Saliency.

    ``forward(q, k, v, sinks, scale, window, plan, state)`` with ``q`` ``[1, head, T, d]``,
    ``k``, ``v`` ``[1, kv_head, T, d]``, ``sinks`` ``[head]`` or None; returns the output
    ``[1, T, head, d]`` (Hugging Face's layout). In backward it returns the gradients of
    ``q``, ``k``, ``v`` and ``sinks`` (unless ``plan.input_grads`` is False) and, when
    ``plan.pool``, adds ``|A * dL/dA|`` of each block of query rows into ``plan.sums``.
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, window, plan, state):  # type: ignore[override]
        out, lse = _forward(q, k, v, sinks, scale, window, state.budget, state.cpu_kernels)
        ctx.save_for_backward(q, k, v, sinks if sinks is not None else q.new_empty(0), out, lse)
        ctx.scale, ctx.window, ctx.plan, ctx.state = scale, window, plan, state
        ctx.has_sinks = sinks is not None
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, sinks, out, lse = ctx.saved_tensors
        plan, state, scale, window = ctx.plan, ctx.state, ctx.scale, ctx.window
        grads = None
        kernel = q.device.type == "cpu" and window is None and state.cpu_kernels
        if plan.input_grads and kernel:
            # The CPU flash backward, given the sink-inclusive lse and output, is exact
            # with sinks too: it recomputes A = exp(q k^T s - lse) and uses dO . O.
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out.transpose(1, 2), q, k, v, out, lse[None], 0.0, True, scale=scale)
        if plan.pool or (plan.input_grads and not kernel):
            blocks = _backward_blocks(q, k, v, out, lse, grad_out, scale, window, plan, state,
                                      grads=plan.input_grads and not kernel)
            grads = grads if grads is not None else blocks
        if plan.pool:
            if plan.sums is not None and plan.sums.device.type != "cpu":
                plan.sums = plan.sums.cpu()  # maps grow as steps^2: keep them off the GPU
            if state.on_layer_done is not None:
                state.on_layer_done(plan.layer)
        if not plan.input_grads:
            return None, None, None, None, None, None, None, None
        dsinks = None
        if ctx.has_sinks and ctx.needs_input_grad[3]:
            # d lse / d sink = p_sink; d L / d sink = -p_sink * dO . O per row
            delta = (grad_out[0].float() * out[0].transpose(0, 1).float()).sum(-1)  # [T, head]
            p_sink = (sinks.float()[:, None] - lse).exp()  # [head, T]
            dsinks = -(p_sink * delta.T).sum(-1).to(sinks.dtype)
        dq, dk, dv = grads
        return dq, dk, dv, dsinks, None, None, None, None


def _backward_blocks(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     grad_out: Tensor, scale: float, window: int | None, plan: LayerPlan,
                     state: EngineState, *, grads: bool
                     ) -> tuple[Tensor, Tensor, Tensor] | None:
    """Attention backward block by block of query rows: pools ``|A * dL/dA|`` into
    ``plan.sums`` when ``plan.pool``, and returns ``dq``, ``dk``, ``dv`` when ``grads``."""
    _, n_heads, n, d = q.shape
    n_kv, dv_ = k.shape[1], v.shape[-1]
    g = n_heads // n_kv
    # float32, query heads grouped under their key/value head, [kv, g, T, d], so one
    # matmul per key/value head serves its whole group (keys and values never repeated).
    # The extra column of q holds -lse against a column of ones in k: q k^T s - lse in one
    # matmul, and exp of it is the pattern.
    qa = q.new_empty(n_kv, g, n, d + 1, dtype=torch.float32)
    qa[..., :d] = rearrange(q[0], "(kv g) t d -> kv g t d", kv=n_kv)
    qa[..., :d] *= scale
    qa[..., d] = rearrange(lse, "(kv g) t -> kv g t", kv=n_kv).neg()
    ka = k.new_ones(n_kv, n, d + 1, dtype=torch.float32)
    ka[..., :d] = k[0]
    vf = v[0].float()
    do = rearrange(grad_out[0].float(), "t (kv g) d -> kv g t d", kv=n_kv)
    if grads:
        kf = ka[..., :d].contiguous()
        # rowsum(A * dL/dA) = dO . O (the sink has no value), [kv, g, T]
        delta = (do * rearrange(out[0].float(), "(kv g) t d -> kv g t d", kv=n_kv)).sum(-1)
        dq = q.new_empty(n_kv, g, n, d, dtype=torch.float32)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
    if plan.pool and plan.sums is None:
        plan.sums = q.new_zeros(n_heads, len(state.starts), len(state.starts),
                                dtype=torch.float32)
    chunk = min(n, plan.chunk or choose_chunk(n_heads, n, state.budget))
    # reused [kv, (g rows), key] blocks: A, P (then dS), and |P| when P is needed signed
    bufs = [q.new_empty(n_kv * g * chunk * n, dtype=torch.float32)
            for _ in range(2 + (plan.pool and grads))]
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        r, k0 = b - a, _key_start(a, window)
        shape = (n_kv, g * r, b - k0)
        size = n_kv * g * r * (b - k0)
        att, p = (buf[:size].view(shape) for buf in bufs[:2])
        qc = qa[:, :, a:b].reshape(n_kv, g * r, d + 1)
        doc = do[:, :, a:b].reshape(n_kv, g * r, dv_)
        torch.bmm(qc, ka[:, k0:b].transpose(1, 2), out=att)
        if window is None:  # exp, then zero the future keys of the diagonal block
            att.exp_()
            att.view(n_kv, g, r, b - k0)[..., a - k0:].tril_()
        else:
            _mask_block(att.view(n_kv, g, r, b - k0), a, k0, window)
            att.exp_()  # A, the pattern (sink column excluded)
        if grads:
            dv[:, k0:b].baddbmm_(att.transpose(1, 2), doc)
        torch.bmm(doc, vf[:, k0:b].transpose(1, 2), out=p)  # dL/dA
        if grads:
            p.mul_(att)  # P = A * dL/dA, signed, for dS
            sal = torch.abs(p, out=bufs[2][:size].view(shape)) if plan.pool else p
        else:
            sal = p.abs_().mul_(att)  # |A * dL/dA| = A |dL/dA| (A >= 0)
        if plan.pool:
            pool_block(sal.view(n_heads, r, b - k0), state.starts, state.ends, row0=a,
                       key0=k0, out=plan.sums)
        if grads:
            p.addcmul_(att, delta[:, :, a:b].reshape(n_kv, g * r, 1), value=-1.0)  # dS
            dq[:, :, a:b] = torch.bmm(p, kf[:, k0:b]).view(n_kv, g, r, d)
            dk[:, k0:b].baddbmm_(p.transpose(1, 2), qc[..., :d])
    if not grads:
        return None
    dq.mul_(scale)  # dk needs no scale: qa held q * scale
    return (rearrange(dq, "kv g t d -> 1 (kv g) t d").to(q.dtype), dk[None].to(k.dtype),
            dv[None].to(v.dtype))


def _fused_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             s_aux: Tensor | None = None, **kwargs):
    """The function registered with ``AttentionInterface`` (Hugging Face's signature)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _STATE:  # registered globally; outside an engine run behave like sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    state = _STATE[-1]
    if attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise StepSalError("the fused engine runs one unpadded sequence without a KV cache; "
                           "use engine='hook_pattern' for batches or cached generation")
    if dropout:
        raise StepSalError("the fused engine needs the model in eval mode (attention dropout "
                           f"{dropout}); call model.eval()")
    layer = module.layer_idx
    state.calls[layer] = state.calls.get(layer, 0) + 1
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    plan = state.plans.get(layer) or LayerPlan(layer, pool=False)
    if not plan.pool and s_aux is None and sliding_window is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                             enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None
    out = FusedAttention.apply(query, key, value, s_aux, scale, sliding_window, plan, state)
    return out, None


# ---- the model-touching part ----------------------------------------------------------------


def _register() -> None:
    from transformers import AttentionInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, _fused_attention_forward)


@contextmanager
def fused_attention(model: Model, spans: Sequence[tuple[int, int]], layers: Sequence[int], *,
                    chunk: int | None = None, budget: int | None = None,
                    on_layer_done: Callable[[int], None] | None = None
                    ) -> Iterator[EngineState]:
    """Run ``model.original_model`` with the fused attention for the ``with`` body.

    Swaps each layer's ``AttentionBridge`` for its Hugging Face attention module and the
    config's attention implementation for :data:`ATTN_IMPLEMENTATION`; restores both
    (and nothing else is changed) on exit, also after an exception.

    Parameters
    ----------
    model
        A ``TransformerBridge`` (:func:`stepsal_lens.load_lrm`).
    spans
        Token span of each step.
    layers
        Layers whose saliency is pooled (the others run plain sdpa).
    chunk
        Query rows per block in backward; default from ``budget``.
    budget
        Bytes for a layer's backward blocks; default :func:`default_budget`.
    on_layer_done
        Called with the layer index when a layer's map is complete.

    Yields
    ------
    EngineState
        ``state.plans[layer].sums`` holds ``[head, step, step]`` float32 sums after
        backward (divide with :func:`step_means`).
    """
    hf = model.original_model
    device = next(model.parameters()).device
    starts, ends = step_bounds(spans, device)
    lowest = min(layers)
    plans = {l: LayerPlan(l, pool=True, chunk=chunk, input_grads=l != lowest) for l in layers}
    state = EngineState(starts, ends, plans,
                        budget if budget is not None else default_budget(device),
                        on_layer_done)
    slots = attention_slots(model)
    _register()
    old_impl = hf.config._attn_implementation
    swapped: list[tuple[torch.nn.Module, torch.nn.Module]] = []
    handle = None
    try:
        for hf_layer, bridge_attn, hf_attn in slots:
            hf_layer.self_attn = hf_attn
            swapped.append((hf_layer, bridge_attn))
        hf.config._attn_implementation = ATTN_IMPLEMENTATION
        # The gradient path starts at the input of the lowest measured layer: the layers
        # below run without a graph, and nothing needs gradients below it.
        handle = model.blocks[lowest].register_forward_pre_hook(_grad_from_here, with_kwargs=True)
        _STATE.append(state)
        yield state
    finally:
        if _STATE and _STATE[-1] is state:
            _STATE.pop()
        if handle is not None:
            handle.remove()
        hf.config._attn_implementation = old_impl
        for hf_layer, bridge_attn in swapped:
            hf_layer.self_attn = bridge_attn


def _grad_from_here(module, args, kwargs):
    """Forward pre-hook: the block's input becomes a leaf that requires grad."""
    if args:
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
    return args, kwargs


def final_hidden(model: Model, tokens: Int[Tensor, "1 token"]) -> Float[Tensor, "1 token d_model"]:
    """The last hidden state (after the final norm) of ``model.original_model``.

    Inside :func:`fused_attention` it has a gradient path from the lowest measured layer
    (weights stay frozen)."""
    return model.original_model.model(input_ids=tokens, use_cache=False).last_hidden_state
