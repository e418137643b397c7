"""Step-Saliency: attention x gradient on ``hook_pattern``, pooled into step-to-step maps.

For layer ``l``, head ``h``, query ``q`` and key ``k``::

    I[l,h,q,k] = | A[l,h,q,k] * dL/dA[l,h,q,k] |
    M[l,h,i,j] = mean_{q in step i, k in step j} I[l,h,q,k]

Two engines compute the same maps. ``fused`` (the default) swaps a fused attention into
the bridge's Hugging Face model for the call: its backward recomputes ``A`` block by
block of query rows and pools ``|A * dL/dA|`` at once, at about the cost of one plain
forward+backward pass (:mod:`stepsal_lens.lens.fused`). ``hook_pattern`` is the readable
reference: a forward hook keeps each layer's pattern (a view autograd saves anyway) and
the backward hook multiplies it by the incoming gradient and pools it, so no layer's
token-level saliency outlives its hook; it also runs the users' hooks (StepFlow, knockouts),
so a hooked model uses it. ``low_memory=True`` checkpoints every layer and recomputes one
at a time in backward, with either engine.

Examples
--------
>>> import tempfile
>>> from stepsal_lens import Trace, load_lrm, step_saliency
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp()), format="think-tags")
>>> trace = Trace.from_segments("Start with 7. Add 5. What is the result?",
...     "We start with the number 7. Adding 5 to 7 gives 12.", "The result is 12.", model)
>>> sal = step_saliency(model, trace)
>>> tuple(sal.maps.shape), sal.meta["engine"]  # [n_layers, n_heads, n_steps, n_steps]
((2, 4, 4, 4), 'fused')
>>> bool((sal.maps[:, :, 0, 1:] == 0).all())  # the question cannot attend to later steps
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from stepsal_lens.core.pooling import pool_saliency, step_means
from stepsal_lens._checks import check_layer_list
from stepsal_lens.errors import StepSalError
from stepsal_lens.lens.targets import (_TARGETS, Target, _check_target_kwargs, get_lean_target,
                                       get_target)
from stepsal_lens.results.saliency import StepSaliency
from stepsal_lens.segments.association import model_name
from stepsal_lens.segments.trace import Trace, check_trace
from stepsal_lens._checks import check_whole

__all__ = ["ENGINES", "check_layers", "replay", "step_saliency", "token_saliency", "trace_tokens"]


# ---- result -------------------------------------------------------------------------------


# ---- hooks --------------------------------------------------------------------------------

@contextmanager
def _activation_grads_only(model):
    """Turn off weight gradients (saliency needs only activation gradients) and restore
    the caller's flags afterwards, also on error."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _saliency_hooks(layers: Sequence[int], step_of_token: Tensor, n_steps: int,
                    out: dict[int, Tensor], bar):
    """Forward hooks keep each pattern; backward hooks pool ``|A * dA|`` and drop it."""
    patterns: dict[int, Tensor] = {}
    fwd, bwd = [], []
    for layer in layers:
        name = f"blocks.{layer}.attn.hook_pattern"

        def keep(pattern, hook, layer=layer):
            patterns[layer] = pattern.detach()

        def pool_grad(grad, hook, layer=layer):
            out[layer] = pool_saliency(patterns.pop(layer), grad, step_of_token, n_steps)
            bar.update(1)

        fwd.append((name, keep))
        bwd.append((name, pool_grad))
    return fwd, bwd


@contextmanager
def _checkpointed(model, enabled: bool):
    """Activation checkpointing of the wrapped Hugging Face layers: the forward keeps only
    each layer's input and backward recomputes one layer at a time, so one layer's
    attention graph is alive at once. The hooks fire again on the recompute, which is
    where the pattern with a gradient path is kept and pooled."""
    if not enabled:
        yield
        return
    hf = model.original_model
    # transformers renamed gradient_checkpointing_* to activation_checkpointing_* in 5.x
    was_training = model.training
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        disable = hf.activation_checkpointing_disable
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = hf.gradient_checkpointing_disable
    model.train()  # HF layers checkpoint only in training mode; these models have no dropout
    try:
        yield
    finally:
        disable()
        model.train(was_training)


def _require_grad(x, hook):
    return x.detach().requires_grad_(True)


def _refuse_float16(model) -> None:
    """float16 has too little exponent range for attention gradients: on a trained model
    most rows of ``dL/dA`` underflow to exactly 0, so the maps (and every share metric)
    would silently read 0. bfloat16 keeps float32's range at the same memory."""
    if any(p.dtype == torch.float16 for p in model.parameters()):
        raise StepSalError("Step-Saliency does not run on a float16 model: float16 underflows "
                           "the attention gradients (whole rows of the maps come out exactly "
                           "0); load it with load_lrm(..., dtype='bfloat16') (same memory, "
                           "float32's range) or dtype='float32'")


def _backward(loss: Any, target: Any) -> None:
    """``loss.backward()`` after checking that the target is finite."""
    target = target if isinstance(target, str) else getattr(target, "__name__", "custom")
    if not isinstance(loss, Tensor):
        raise StepSalError(f"the saliency target {target!r} returned a {type(loss).__name__}; "
                           f"it must return a scalar tensor computed from the logits")
    if loss.dim() != 0:
        raise StepSalError(f"the saliency target must be a scalar; {target!r} gave shape "
                           f"{tuple(loss.shape)}")
    if not bool(torch.isfinite(loss)):
        raise StepSalError(f"the saliency target {target!r} is {loss.item()}: the model gives "
                           f"non-finite logits on this trace; check its weights for NaN/inf "
                           f"(torch.isfinite on each parameter) and load it in float32")
    if not loss.requires_grad:
        raise StepSalError(f"the saliency target {target!r} does not depend on the logits (no "
                           f"gradient); compute it from the logits it is given")
    loss.backward()


def _refuse_non_finite(maps: Tensor, layers: Sequence[int], what: str) -> None:
    """Raise when any layer's saliency is NaN or infinite (never report it as a number)."""
    bad = [l for l, m in zip(layers, maps) if not bool(torch.isfinite(m).all())]
    if bad:
        raise StepSalError(f"the {what} of layers {bad} are not finite (NaN/inf attention "
                           f"gradients, though the target was finite): the model's weights "
                           f"or activations hold non-finite values; check its weights for "
                           f"NaN/inf and load it in float32")


def token_saliency(model, trace: Trace, layer: int, *, target: str | Target = "lm",
                   **target_kwargs: Any) -> tuple[Float[Tensor, "head query key"],
                                                  Float[Tensor, "head query key"]]:
    """Token-level saliency ``|A * dL/dA|`` and attention ``A`` of one layer, unpooled.

    What :func:`step_saliency` pools into its maps, for drilling from a step pair down to
    tokens; ``[n_heads, n_tokens, n_tokens]`` float32 each, so keep traces short.
    """
    check_trace(trace, "trace")
    check_whole(layer, "layer")
    fn = get_target(target)
    _check_target_kwargs(fn, target, target_kwargs)
    if not 0 <= layer < model.cfg.n_layers:
        raise StepSalError(f"layer {layer} is not valid for a model with {model.cfg.n_layers} "
                           f"layers")
    _refuse_float16(model)
    tokens = trace_tokens(model, trace)
    kept: dict[str, Tensor] = {}
    name = f"blocks.{layer}.attn.hook_pattern"

    def keep(pattern, hook):
        kept["pattern"] = pattern.detach()

    def saliency(grad, hook):
        kept["saliency"] = (kept["pattern"].float() * grad.float()).abs()[0].cpu()

    with _activation_grads_only(model), torch.enable_grad():
        with model.hooks(fwd_hooks=[(name, keep), ("hook_embed", _require_grad)],
                         bwd_hooks=[(name, saliency)]):
            _backward(fn(model(tokens).float(), trace, **target_kwargs), target)
    _refuse_non_finite(kept["saliency"][None], [layer], "token saliencies")
    return kept["saliency"], kept["pattern"][0].float().cpu()


#: Step-Saliency engines: ``fused`` (attention x gradient pooled inside a fused attention
#: backward, :mod:`stepsal_lens.lens.fused`) and ``hook_pattern`` (hooks on the bridge's eager
#: ``hook_pattern``: the readable reference, and the one that sees users' hooks).
ENGINES = ("auto", "fused", "hook_pattern")


def _choose_engine(model, engine: str) -> tuple[str, str]:
    """The engine to run and why."""
    from stepsal_lens.lens.fused import attention_hooks_in_use

    if engine not in ENGINES:
        raise StepSalError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    if engine == "hook_pattern":
        return engine, "requested"
    hooked = attention_hooks_in_use(model)
    from stepsal_lens.lens.knockout import has_sinks

    if engine == "auto" and not hooked and has_sinks(model) \
            and next(model.parameters()).dtype != torch.float32:
        # measured on a gpt-oss checkpoint with harmony's long prompt: the fused sink path
        # in bfloat16 is off by 13.6% of the map maximum, the hook_pattern engine by 1.6%
        return "hook_pattern", "attention sinks in a low-precision model"
    if not hooked:
        return "fused", "requested" if engine == "fused" else "default"
    if engine == "fused":
        raise StepSalError(
            f"the fused engine does not run the bridge's hooks, and hooks are attached to "
            f"{hooked[:4]}{' ...' if len(hooked) > 4 else ''}; use engine='hook_pattern' "
            f"(or engine='auto'), or remove the hooks (model.reset_hooks())")
    return "hook_pattern", f"hooks attached to {hooked[:4]}{' ...' if len(hooked) > 4 else ''}"


def check_layers(layers: Any, n_layers: int) -> list[int]:
    """Sorted distinct layer indices (None: all), refused when out of range, empty or not
    whole numbers (:func:`stepsal_lens._checks.check_layer_list`)."""
    if layers is None:
        return list(range(n_layers))
    return list(check_layer_list(layers, "layers", n_layers))


def trace_tokens(model, trace: Trace) -> Tensor:
    """``[1, n_tokens]`` ids on the model's device, refused when the trace was cut with
    another tokenizer: its tokenizer fingerprint differs from the model's
    (:meth:`Trace.check_tokenizer <stepsal_lens.Trace.check_tokenizer>`; a trace without a
    fingerprint is accepted) or its ids lie beyond the model's vocabulary. Every function
    that runs a model on a trace goes through it."""
    check = getattr(trace, "check_tokenizer", None)
    if check is not None:
        check(model)
    if int(trace.token_ids.min()) < 0 or int(trace.token_ids.max()) >= model.cfg.d_vocab:
        raise StepSalError("the trace has token ids beyond the model's vocabulary; build the "
                           "Trace with this model (Trace.from_text(text, model))")
    return trace.token_ids[None].to(next(model.parameters()).device)


def _hook_pattern_maps(model, trace: Trace, fn: Target, layers: list[int], low_memory: bool,
                       bar, target_kwargs: dict[str, Any], target: Any = None) -> list[Tensor]:
    device = next(model.parameters()).device
    tokens = trace.token_ids[None].to(device)
    out: dict[int, Tensor] = {}
    with _activation_grads_only(model), torch.enable_grad():
        fwd, bwd = _saliency_hooks(layers, trace.step_of_token.to(device), trace.n_steps,
                                   out, bar)
        fwd.append(("hook_embed", _require_grad))
        with _checkpointed(model, low_memory), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            logits = model(tokens)
            _backward(fn(logits.float(), trace, **target_kwargs), target)
    return [out[l] for l in layers]


def _fused_maps(model, trace: Trace, target: str | Target, layers: list[int],
                low_memory: bool, chunk_size: int | None, bar,
                target_kwargs: dict[str, Any]) -> list[Tensor]:
    from stepsal_lens.lens import fused

    fn, lean = get_target(target), get_lean_target(target)
    hf = model.original_model
    tokens = trace.token_ids[None].to(next(model.parameters()).device)
    spans = [s.token_span for s in trace.steps]
    maps: dict[int, Tensor] = {}

    def done(layer: int) -> None:
        bar.update(1)

    with _activation_grads_only(model), torch.enable_grad(), _checkpointed(model, low_memory):
        with fused.fused_attention(model, spans, layers, chunk=chunk_size,
                                   on_layer_done=done) as state:
            hidden = fused.final_hidden(model, tokens)
            unembed = hf.get_output_embeddings()
            if lean is not None:
                loss = lean(hidden, unembed, trace, **target_kwargs)
            else:
                loss = fn(unembed(hidden).float(), trace, **target_kwargs)
            del hidden
            _backward(loss, target)
        for layer in layers:
            sums = state.plans[layer].sums
            if sums is None:  # the target does not depend on this layer's attention
                sums = torch.zeros(model.cfg.n_heads, trace.n_steps, trace.n_steps)
            maps[layer] = step_means(sums, state.starts, state.ends).cpu()
    return [maps[l] for l in layers]


def step_saliency(model, trace: Trace, *, target: str | Target = "lm",
                  layers: Sequence[int] | None = None, engine: str = "auto",
                  low_memory: bool = False, chunk_size: int | None = None,
                  progress: bool = False, **target_kwargs: Any) -> StepSaliency:
    """Step-Saliency of a trace: ``|A * dL/dA|`` of every attention pattern, pooled per
    step pair.

    Parameters
    ----------
    model
        A ``TransformerBridge`` from :func:`stepsal_lens.load_lrm`.
    trace
        The :class:`~stepsal_lens.Trace` (built with this model's tokenizer).
    target
        ``"lm"`` (mean next-token loss over the whole trace, as Hugging Face computes
        it for ``labels=input_ids``), ``"summary"`` (the same restricted to summary
        tokens), ``"answer"`` (log-prob of the answer's tokens; ``answer=`` or the last
        ``\\boxed{}``), ``"logit"`` (``position=``, ``token=``; the model's own logit, as
        Hugging Face computes it), or a registered/callable target.
    layers
        Layers to measure (default: all).
    engine
        ``"fused"``: the attention x gradient product is formed and pooled inside a
        fused attention backward, one block of query rows at a time (time and memory
        close to one plain forward+backward; :mod:`stepsal_lens.lens.fused`).
        ``"hook_pattern"``: hooks on the bridge's ``hook_pattern`` (the readable
        reference; it runs the users' hooks, e.g. StepFlow's). ``"auto"`` (default):
        fused, unless hooks are attached to the model. ``meta["engine"]`` records which
        ran and ``meta["engine_reason"]`` why.
    low_memory
        Activation checkpointing per layer: backward recomputes one layer at a time, so
        one layer's activations are alive. Same maps; about one extra forward pass of
        time. Runs the model in training mode for the call (these models have no dropout).
    chunk_size
        Fused engine: query rows per block (default: from a memory budget, 48 MiB of
        blocks on CPU, a quarter of free memory up to 4 GiB on CUDA).
    progress
        Show a tqdm bar over layers.
    **target_kwargs
        Passed to the target (``answer``, ``position``, ``token``).

    Returns
    -------
    StepSaliency
        ``maps`` ``[len(layers), n_heads, n_steps, n_steps]`` float32.

    Raises
    ------
    StepSalError
        On a float16 model (its attention gradients underflow to 0: load in bfloat16 or
        float32), when the target is NaN/inf, or when any map is NaN/inf; a non-finite
        result is never returned.
    """
    check_trace(trace, "trace")
    fn = get_target(target)
    _check_target_kwargs(fn, target, target_kwargs)
    n_layers = model.cfg.n_layers
    layers = check_layers(layers, n_layers)
    _refuse_float16(model)
    trace_tokens(model, trace)
    if chunk_size is not None and chunk_size < 1:
        raise StepSalError(f"chunk_size must be a positive number of query rows; got {chunk_size}")
    used, reason = _choose_engine(model, engine)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(layers), desc=f"step saliency ({used})", unit="layer",
               disable=not progress)
    try:
        if used == "fused":
            maps = _fused_maps(model, trace, target, layers, low_memory, chunk_size, bar,
                               target_kwargs)
        else:
            maps = _hook_pattern_maps(model, trace, fn, layers, low_memory, bar, target_kwargs,
                                      target)
    finally:
        bar.close()
    maps = torch.stack(maps).cpu()
    _refuse_non_finite(maps, layers, "saliency maps")
    from stepsal_lens._version import __version__
    from stepsal_lens.lens.stepflow import active_stepflow

    flow = active_stepflow(model)
    meta = {
        "model": model_name(model),
        "stepsal_lens": __version__,
        "stepflow": None if flow is None else flow.config.to_dict(),
        "format": trace.format.name,
        "target": target if isinstance(target, str) else getattr(target, "__name__", "custom"),
        "n_layers": n_layers,
        "n_heads": int(maps.shape[1]),
        "d_vocab": int(model.cfg.d_vocab),
        "tokenizer": getattr(trace, "tokenizer_fingerprint", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "truncated": trace.truncated,
        "engine": used,
        "engine_reason": reason,
        "low_memory": low_memory,
        "text": trace.text,
        **{f"target_{k}": v for k, v in target_kwargs.items()},
    }
    return StepSaliency(maps, layers, list(trace.steps), trace.token_ids.clone(), meta)


def replay(result: StepSaliency, model: Any, fn: Callable[..., Any], *args: Any,
           **kwargs: Any) -> Any:
    """Call ``fn(model, *args, target=..., **target_kwargs, **kwargs)`` the way this
    result was made: the same target and target arguments, inside the same StepFlow
    settings (if it was made with StepFlow on). The explorer's token drill-down uses
    it, so the tokens shown pool exactly to the map shown."""
    from contextlib import nullcontext

    from stepsal_lens.results.config import StepFlowConfig
    from stepsal_lens.lens.stepflow import stepflow

    made_with = result.meta.get("tokenizer")
    if made_with is not None and getattr(model, "tokenizer", None) is not None:
        from stepsal_lens.fingerprint import tokenizer_fingerprint

        theirs = tokenizer_fingerprint(model)
        if theirs != made_with:
            raise StepSalError(
                f"this result was computed with tokenizer {made_with} (model "
                f"{result.meta.get('model')!r}), but the model {model_name(model)!r} has "
                f"tokenizer {theirs}; replay it with the model it was computed with")
    target = result.meta.get("target", "lm")
    if target not in _TARGETS:
        raise StepSalError(f"this result was made with target {target!r}, which is not "
                           f"registered; register it with register_target({target!r}, fn) "
                           f"to replay it")
    target_kwargs = {k[len("target_"):]: v for k, v in result.meta.items()
                     if k.startswith("target_")}
    flow = result.meta.get("stepflow")
    ctx = stepflow(model, StepFlowConfig.from_dict(flow)) if flow else nullcontext()
    with ctx:
        return fn(model, *args, target=target, **target_kwargs, **kwargs)
