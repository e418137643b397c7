"""The fused StepFlow engine: OEB as an attention function, SMI as module hooks.

The ``hook_pattern`` engine (:mod:`stepsal_lens.lens.stepflow`) edits
``blocks.{l}.attn.hook_pattern`` and ``blocks.{l}.hook_resid_post`` of the bridge, whose
attention is re-implemented eagerly so that those hook points exist. This engine gets the
same results from the Hugging Face model inside the bridge, at about Hugging Face's speed:

* **Where it runs.** ``bridge.original_model`` stays a valid Hugging Face model, but the
  bridge has swapped its own components (block, attention, norm, linear and embedding
  bridges, each with hook points) into it. For the duration, :func:`hugging_face_mode`
  puts every original Hugging Face module back in its place and sets the config's
  attention implementation to :data:`ATTN_IMPLEMENTATION`, registered with transformers'
  ``AttentionInterface`` (with sdpa's mask builder); both are restored in ``finally``.
  The bridge's hook points do not run in the meantime, so hooks attached to them are
  refused rather than silently skipped.
* **OEB** (:func:`stepflow_attention`). Layers without OEB and the query rows OEB never
  touches (the question and template tokens of a prompt, in front of its first thinking
  or summary query) run Hugging Face's sdpa. The other rows get the pattern written out
  explicitly, ``A = softmax(q k^T * scale + mask)`` (GPT-OSS's sinks join the normaliser,
  sliding-window layers get Hugging Face's sliding mask), in blocks of query rows; the
  pure core :func:`~stepsal_lens.core.interventions.apply_oeb` edits ``A`` with the same
  and bridge masks the ``hook_pattern`` engine builds from the tracker's labels, and the
  output is ``A v``. GPT-OSS has no sdpa in Hugging Face (its sinks): its layers all take
  the explicit path, which is Hugging Face's eager attention.
* **SMI** runs as plain PyTorch hooks: a forward hook on each SMI layer's Hugging Face
  decoder layer (its output is ``hook_resid_post``), or, for ``smi_variant="paper_code"``,
  a forward hook on ``v_proj`` (``hook_v``) and a forward pre-hook on ``o_proj`` (its
  input, split per head, is ``hook_z``). The update itself is
  :func:`~stepsal_lens.core.interventions.step_momentum`, with the same windows and state as the
  other engine (one :class:`~stepsal_lens.lens.flow_state.StepFlowState` serves both).
* **Following the passes.** A forward pre-hook on the Hugging Face model feeds each pass's
  token ids to the :class:`~stepsal_lens.SegmentTracker`: a pass without a
  cache, or with an empty one (Hugging Face's ``generate`` passes one), starts over; a
  KV-cached step appends.
* **Generation.** :func:`generate_tokens` is a KV-cached loop on the Hugging Face model
  with the bridge's ``generate`` rules (its sampling function, stop tokens, finished rows
  padded, left-padded prompts with positions from the mask), so both engines give the
  same tokens. :func:`stepsal_lens.lens.generation.generate` uses it by default.

Examples
--------
>>> import tempfile, torch
>>> from stepsal_lens import load_lrm, stepflow
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp(), n_layers=4),
...                  format="think-tags")
>>> tokens = model.to_tokens("Start with 7. Add 5.\\n<think>\\nWe start with the number 7. "
...                          "Adding 5 to 7 gives 12.\\n</think>\\n\\nThe result is 12.")
>>> with stepflow(model, tau_max=0.5, alpha=1.0, engine="fused") as fused:
...     a = model(tokens)
>>> with stepflow(model, tau_max=0.5, alpha=1.0, engine="hook_pattern") as hooked:
...     b = model(tokens)
>>> fused.engine, bool((a - b).abs().max() < 1e-5)
('fused', True)
>>> fused.stats.to_dict()["smi"] == hooked.stats.to_dict()["smi"]
True

Notes
-----
Inside a ``stepflow(..., engine="fused")`` block the bridge's hook points do not fire:
``run_with_cache``, ``model.hooks(...)`` and :func:`~stepsal_lens.step_saliency` need
``engine="hook_pattern"`` (the default of a ``stepflow`` block), and a fresh pass with
hooks attached to the bridge raises. Everything is restored when the block ends, also
after an exception.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformer_lens import utilities as tl_utils
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from stepsal_lens.errors import StepSalError
from stepsal_lens.lens.bridge_mode import (MODEL_HOOKS, RUNNING_MARK, attention_hooks_in_use,
                                           is_running, running)
from stepsal_lens.lens.flow_state import StepFlowState
from stepsal_lens.typing import Model

__all__ = [
    "ATTN_IMPLEMENTATION",
    "fused_hooks",
    "generate_tokens",
    "hugging_face_mode",
    "stepflow_attention",
]

#: Name under which the engine's attention function is registered with transformers.
ATTN_IMPLEMENTATION = "stepsal_stepflow"

#: Bytes of float32 ``[batch, head, row, key]`` blocks the explicit attention keeps alive.
_BLOCK_BUDGET = 64 * 2**20

# Hugging Face attention module -> the StepFlow state whose OEB it runs (absent: plain
# attention)
_OWNERS: weakref.WeakKeyDictionary[nn.Module, StepFlowState] = weakref.WeakKeyDictionary()


# ---- the Hugging Face model without the bridge's components --------------------------------


def _unwrap(root: nn.Module, swaps: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Replace every bridge component under ``root`` by the module it wraps, recording
    each swap (parent, name, bridge component) so that it can be undone."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    for name, child in list(root._modules.items()):
        if child is None:
            continue
        if isinstance(child, GeneralizedComponent):
            original = child._modules.get("_original_component")
            if original is None:
                continue  # a bridge-only component: leave it (and what it holds) alone
            swaps.append((root, name, child))
            root._modules[name] = original
            child = original
        _unwrap(child, swaps)


@contextmanager
def hugging_face_mode(model: Model) -> Iterator[nn.Module]:
    """Run ``model.original_model`` as the plain Hugging Face model for the block.

    Every bridge component inside it is replaced by the Hugging Face module it wraps, and
    the attention implementation is :data:`ATTN_IMPLEMENTATION` (Hugging Face's sdpa,
    except where a :class:`~stepsal_lens.lens.flow_state.StepFlowState` of the fused engine owns the
    layer, and except attention with sinks, which runs eagerly). Both are restored on
    exit, also after an exception. Re-entrant. The config's ``output_attentions`` (which
    the bridge turns on) is off meanwhile: no attention weights are returned.

    Parameters
    ----------
    model
        A ``TransformerBridge`` (:func:`~stepsal_lens.load_lrm`).

    Yields
    ------
    torch.nn.Module
        ``model.original_model``.

    Examples
    --------
    >>> from stepsal_lens import load_lrm
    >>> model = load_lrm("tiny-lrm")
    >>> tokens = model.to_tokens("Start with 3. Add 4.")
    >>> with hugging_face_mode(model) as hf:
    ...     logits = hf(tokens).logits
    >>> bool((logits - model(tokens)).abs().max() < 1e-4)
    True
    """
    hf = model.original_model
    if is_running(model):
        yield hf
        return
    _register()
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    old_impl, old_weights = hf.config._attn_implementation, hf.config.output_attentions
    try:
        _unwrap(hf, swaps)
        hf.config._attn_implementation = ATTN_IMPLEMENTATION
        # the bridge asks for attention weights by default; nothing here returns them, and
        # collecting them costs a tenth of a generation step
        hf.config.output_attentions = False
        with running(hf):
            yield hf
    finally:
        hf.config._attn_implementation = old_impl
        hf.config.output_attentions = old_weights
        for parent, name, component in reversed(swaps):
            parent._modules[name] = component


def _register() -> None:
    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, stepflow_attention)
    if ATTN_IMPLEMENTATION not in AttentionMaskInterface._global_mapping:
        # sdpa's masks: None where is_causal serves, else boolean [batch, 1, query, key]
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _decoder_layers(hf: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if layers is None:
        raise StepSalError(f"the fused StepFlow engine cannot find the decoder layers of this "
                           f"{type(hf).__name__}; use engine='hook_pattern'")
    return layers


# ---- the attention function ----------------------------------------------------------------


def _row_mask(mask: Tensor | None, a: int, b: int, n_q: int, n_k: int, device
              ) -> Tensor | None:
    """The attention mask of query rows ``a:b``: Hugging Face's (boolean, or additive
    float) or, where it passed None, the causal mask aligned to the last keys."""
    if mask is not None:
        return mask[:, :, a:b]
    if n_q == 1:
        return None  # one new token sees every key
    q_pos = torch.arange(n_k - n_q + a, n_k - n_q + b, device=device)[:, None]
    return (torch.arange(n_k, device=device)[None, :] <= q_pos)[None, None]


def _explicit_rows(query: Tensor, key: Tensor, mask: Tensor | None, scale: float,
                   sinks: Tensor | None) -> Tensor:
    """Post-softmax attention ``[batch, head, row, key]`` (float32) of the given query
    rows, as Hugging Face's eager attention computes it (sink column dropped). Query heads
    are grouped under their key/value head, so keys are never repeated."""
    b, h, n, d = query.shape
    kv, n_k = key.shape[1], key.shape[2]
    if query.dtype != torch.float32:
        query, key = query.float(), key.float()
    q = query.reshape(b, kv, h // kv * n, d)
    s = torch.matmul(q, key.transpose(2, 3)).view(b, h, n, n_k) * scale
    if mask is not None:
        s = torch.where(mask, s, torch.finfo(s.dtype).min) if mask.dtype == torch.bool \
            else s + mask.float()
    if sinks is None:
        return torch.softmax(s, dim=-1)
    sink = sinks.float().reshape(1, -1, 1, 1).expand(b, -1, n, 1)
    full = torch.cat([s, sink], dim=-1)
    full = full - full.amax(dim=-1, keepdim=True)
    return torch.softmax(full, dim=-1)[..., :-1]


def _times_values(pattern: Tensor, value: Tensor) -> Tensor:
    """``pattern @ value`` with query heads grouped under their key/value head:
    ``[batch, head, row, key]`` x ``[batch, kv_head, key, d]`` -> ``[batch, row, head, d]``."""
    b, h, n, n_k = pattern.shape
    kv = value.shape[1]
    if pattern.dtype != value.dtype:
        pattern = pattern.to(value.dtype)
    out = torch.matmul(pattern.view(b, kv, h // kv * n, n_k), value)
    return out.view(b, h, n, -1).transpose(1, 2)


def stepflow_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0,
                       scaling: float | None = None, sliding_window: int | None = None,
                       s_aux: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """The attention function registered as :data:`ATTN_IMPLEMENTATION`.

    Hugging Face's signature: ``query`` ``[batch, head, query, d_head]`` and ``key``,
    ``value`` ``[batch, kv_head, key, d_head]`` (post-RoPE, key/value heads not
    repeated, the cache already appended), ``attention_mask`` from sdpa's mask builder
    (None, or boolean ``[batch, 1, query, key]``, sliding window included), ``s_aux`` the
    GPT-OSS sinks ``[head]``. Returns the output ``[batch, query, head, d_head]`` and None
    (no weights).

    In an OEB layer of a fused StepFlow the rows from the first thinking or summary query
    on are computed explicitly and edited by
    :func:`~stepsal_lens.core.interventions.apply_oeb`; rows in front of it and other
    layers run sdpa. Attention with sinks is computed explicitly everywhere (Hugging Face
    has no sdpa for it).
    """
    sf = _OWNERS.get(module)
    layer = module.layer_idx
    oeb = sf is not None and sf.edits_oeb(layer)
    n_q, n_k = query.shape[2], key.shape[2]
    r0 = 0 if s_aux is not None else n_q
    if oeb and n_q == 1:  # a generation step: explicit when it has groups to edit
        sf.once_per_pass("checked", lambda: sf.check_batch(query))
        if sf.oeb_groups(layer, 1, n_k) is not None:
            r0 = 0
    elif oeb:
        r0 = min(r0, sf.first_edited_row(query, n_q))
        # sdpa serves a block of leading rows on its own only without a cache offset
        if 0 < r0 < n_q and attention_mask is None and n_q != n_k:
            r0 = 0
    if r0 == n_q:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise StepSalError(f"the fused StepFlow engine needs the model in eval mode (attention "
                           f"dropout {dropout}); call model.eval()")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    parts = []
    if r0 > 0:
        if attention_mask is None:  # no cache offset here: rows :r0 see keys :r0 at most
            out, _ = sdpa_attention_forward(module, query[:, :, :r0], key[:, :, :r0],
                                            value[:, :, :r0], None, dropout=0.0,
                                            scaling=scaling, **kwargs)
        else:
            out, _ = sdpa_attention_forward(module, query[:, :, :r0], key, value,
                                            attention_mask[:, :, :r0], dropout=0.0,
                                            scaling=scaling, **kwargs)
        parts.append(out)
    count = oeb and sf.count(layer, "oeb")
    batch, heads = query.shape[:2]
    chunk = max(1, _BLOCK_BUDGET // (3 * 4 * batch * heads * n_k))
    for a in range(r0, n_q, chunk):
        b = min(a + chunk, n_q)
        mask = _row_mask(attention_mask, a, b, n_q, n_k, query.device)
        pattern = _explicit_rows(query[:, :, a:b], key, mask, scale, s_aux)
        groups = sf.oeb_groups(layer, n_q, n_k, rows=(a, b)) if oeb else None
        if groups is not None:
            pattern = sf.oeb_apply(pattern, groups, layer, count)
        parts.append(_times_values(pattern, value))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out.contiguous(), None


# ---- StepFlow's hooks on the Hugging Face model ---------------------------------------------


def _follow_pass(sf: StepFlowState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the Hugging Face model: feed the tracker. A fresh pass with
    hooks on the bridge's hook points (``run_with_cache``, ``model.hooks``,
    :func:`~stepsal_lens.step_saliency`) raises: they would silently not run."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        raise StepSalError("StepFlow follows token ids, and this pass has none (inputs_embeds?); "
                           "call the model with token ids inside the stepflow block")
    past = kwargs.get("past_key_values")
    fresh = past is None or past.get_seq_length() == 0
    if fresh:
        hooked = _bridge_hooks(sf.model)
        if hooked:
            raise StepSalError(
                f"hooks are attached to {hooked[:4]}{' ...' if len(hooked) > 4 else ''}, but "
                f"this stepflow block runs the fused engine, which does not run the bridge's "
                f"hook points (run_with_cache, model.hooks and step_saliency need them); open "
                f"the block with engine='hook_pattern' (the default)")
    sf.follow(ids, kwargs.get("attention_mask"), fresh)


def _bridge_hooks(model: Model) -> list[str]:
    """Hook points of the bridge with hooks attached (forward hooks on the bridge module
    itself still run under the fused engine, and so does the engine itself)."""
    return [h for h in attention_hooks_in_use(model) if h not in (MODEL_HOOKS, RUNNING_MARK)]


def _smi_resid_post(sf: StepFlowState, layer: int, module: nn.Module, args: tuple,
                    output: Any):
    """Forward hook on a decoder layer: its output is ``hook_resid_post``."""
    if isinstance(output, tuple):
        return (sf.smi(output[0], layer), *output[1:])
    return sf.smi(output, layer)


def _keep_values(sf: StepFlowState, layer: int, head_dim: int, module: nn.Module, args: tuple,
                 output: Tensor) -> None:
    """Forward hook on ``v_proj``: its output, split per key/value head, is ``hook_v``."""
    sf.keep_values(output.view(*output.shape[:-1], -1, head_dim), layer)


def _smi_z(sf: StepFlowState, layer: int, head_dim: int, module: nn.Module, args: tuple):
    """Forward pre-hook on ``o_proj``: its input, split per head, is ``hook_z``."""
    x = args[0]
    z = sf.smi(x.view(*x.shape[:-1], -1, head_dim), layer)
    return (z.reshape(x.shape), *args[1:])


@contextmanager
def fused_hooks(sf: StepFlowState) -> Iterator[StepFlowState]:
    """Turn ``sf`` on through the fused engine for the block (the fused engine's
    :meth:`~stepsal_lens.lens.engines.FusedEngine.attach_stepflow`); everything is undone
    on exit, also after an exception."""
    model = sf.model
    with ExitStack() as stack:
        hf = stack.enter_context(hugging_face_mode(model))
        layers = _decoder_layers(hf)
        for layer in layers:
            _OWNERS[layer.self_attn] = sf
            stack.callback(_OWNERS.pop, layer.self_attn, None)
        hooks = [hf.register_forward_pre_hook(partial(_follow_pass, sf), with_kwargs=True)]
        if sf.smi_on:
            for l in sf.config.smi_layers:
                if sf.variant.site == "resid_post":
                    hooks.append(layers[l].register_forward_hook(partial(_smi_resid_post, sf, l)))
                    continue
                attn = layers[l].self_attn
                d = attn.head_dim
                hooks += [attn.v_proj.register_forward_hook(partial(_keep_values, sf, l, d)),
                          attn.o_proj.register_forward_pre_hook(partial(_smi_z, sf, l, d))]
        for handle in hooks:
            stack.callback(handle.remove)
        yield sf


# ---- generation ------------------------------------------------------------------------------


@torch.no_grad()
def generate_tokens(model: Model, tokens: Int[Tensor, "batch pos"],
                    attention_mask: Int[Tensor, "batch pos"], *, max_new_tokens: int,
                    temperature: float = 0.0, stop_tokens: Sequence[int] = (),
                    pad_token: int | None = None) -> Int[Tensor, "batch total"]:
    """KV-cached generation on the Hugging Face model inside the bridge.

    The bridge's ``generate`` rules, so the tokens are the same: positions from the mask
    (left padding), greedy ``argmax`` or the bridge's sampling function at ``temperature``,
    a row that produced a stop token gets ``pad_token`` from then on, and the loop ends
    when every row has stopped or after ``max_new_tokens``. StepFlow applies when a
    ``stepflow(..., engine="fused")`` block is open on the model.

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm`.
    tokens, attention_mask
        Left-padded prompt ids and their mask (1 = real token).
    max_new_tokens
        Tokens to generate per row at most.
    temperature
        0: greedy; above 0: sampling from the global RNG.
    stop_tokens
        Ids that end a row.
    pad_token
        Id written into rows that have stopped (default: the first stop token).

    Returns
    -------
    Tensor
        ``[batch, pos + new]``: the prompt and what was generated.

    Examples
    --------
    >>> import torch
    >>> from stepsal_lens import load_lrm
    >>> model = load_lrm("tiny-lrm")
    >>> ids = model.to_tokens("Start with 3. Add 4.")
    >>> fast = generate_tokens(model, ids, torch.ones_like(ids), max_new_tokens=8)
    >>> slow = model.generate(ids, max_new_tokens=8, do_sample=False, stop_at_eos=False,
    ...                       verbose=False)
    >>> torch.equal(fast, slow)
    True
    """
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=tokens.device)
    pad = pad_token if pad_token is not None else (int(stops[0]) if len(stops) else 0)
    mask = attention_mask.to(tokens.device).long()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    padded = not bool(mask.all())  # without padding, no mask to build at every step
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    sampled: list[Tensor] = []
    with hugging_face_mode(model) as hf:
        out = hf(input_ids=tokens, attention_mask=mask if padded else None,
                 position_ids=positions, use_cache=True, logits_to_keep=1)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1, :]
            new = tl_utils.sample_logits(logits, temperature=float(temperature)).to(tokens.device)
            if len(stops):
                new[finished] = pad
                finished |= torch.isin(new, stops)
            sampled.append(new)
            if step == max_new_tokens - 1 or (len(stops) and bool(finished.all())):
                break
            if padded:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = hf(input_ids=new[:, None], attention_mask=mask if padded else None,
                     position_ids=positions, past_key_values=out.past_key_values,
                     use_cache=True, logits_to_keep=1)
    return torch.cat([tokens, torch.stack(sampled, dim=1)], dim=1)
