"""Engines: how the model runs, as objects chosen once with the reason recorded.

Two engines compute the same numbers. :data:`HOOK_PATTERN` is the readable reference:
TransformerLens's eager attention with hooks on the bridge's hook points (it also runs
the users' hooks). :data:`FUSED` runs the Hugging Face model inside the bridge: Step-Saliency
pooled inside a fused attention backward (:mod:`stepsal_lens.lens.fused`), StepFlow's OEB as
an attention function and SMI as module hooks (:mod:`stepsal_lens.lens.fused_stepflow`).
An :class:`Engine`'s methods are the operations that differ:

* :meth:`Engine.saliency_maps`: the per-layer step maps of a trace for a target;
* :meth:`Engine.attach_stepflow`: StepFlow on the model for a block (a
  :class:`~stepsal_lens.lens.flow_state.StepFlowState` fed by the engine);
* :meth:`Engine.generate_tokens`: the KV-cached generation loop.

:func:`choose` is the one rule for ``engine="auto"``; the result carries ``reason``.

Examples
--------
>>> from stepsal_lens import load_lrm
>>> model = load_lrm("tiny-lrm")
>>> engine = choose(model)
>>> engine.name, engine.reason
('fused', 'default')
>>> choose(model, needs_hooks=True, purpose="stepflow").name
'hook_pattern'
>>> list_engines()
['auto', 'fused', 'hook_pattern']
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from stepsal_lens.core.pooling import pool_saliency, step_means
from stepsal_lens.errors import StepSalError
from stepsal_lens.lens import fused
from stepsal_lens.lens.bridge_mode import RUNNING_MARK, attention_hooks_in_use, attention_slots
from stepsal_lens.lens.flow_state import StepFlowState
from stepsal_lens.lens.fused_stepflow import fused_hooks
from stepsal_lens.lens.fused_stepflow import generate_tokens as fused_generate_tokens
from stepsal_lens.lens.grads import (activation_grads_only, backward_target, checkpointed,
                                     require_grad)
from stepsal_lens.lens.knockout import has_sinks
from stepsal_lens.lens.models import require_hooks
from stepsal_lens.lens.targets import Target
from stepsal_lens.segments.trace import Trace
from stepsal_lens.typing import Model

__all__ = ["ENGINES", "FUSED", "HOOK_PATTERN", "Engine", "FusedEngine", "HookPatternEngine",
           "choose", "get_engine", "list_engines"]

#: What ``engine=`` accepts: an engine's name, or ``"auto"`` (:func:`choose`).
ENGINES = ("auto", "fused", "hook_pattern")

#: Why ``auto`` runs ``hook_pattern`` in a ``stepflow`` block.
BLOCK_REASON = ("a stepflow block may use the bridge's hooks (run_with_cache, step_saliency); "
                "pass engine='fused' for forward passes and generation only")


def _layer_of(name: str) -> int:
    return int(name.split(".")[1])


@dataclass(frozen=True)
class Engine:
    """An engine and why it was chosen (``reason``: ``"requested"``, ``"default"``, or
    what ruled the other engine out)."""

    name: str
    reason: str = "requested"

    def because(self, reason: str) -> Engine:
        """The same engine with another reason."""
        return replace(self, reason=reason)

    def saliency_maps(self, model: Model, trace: Trace, target: Target, layers: list[int],
                      *, low_memory: bool, chunk_size: int | None, bar: Any) -> list[Tensor]:
        """``[head, step, step]`` float32 maps of ``layers`` (in order) for ``target``."""
        raise NotImplementedError

    def attach_stepflow(self, sf: StepFlowState) -> Any:
        """A context manager: ``sf`` edits every forward pass of ``sf.model`` in the block;
        everything is undone on exit, also after an exception."""
        raise NotImplementedError

    def generate_tokens(self, model: Model, tokens: Tensor, mask: Tensor, *,
                        max_new_tokens: int, temperature: float, stop_tokens: Sequence[int],
                        pad_token: int) -> Tensor:
        """Left-padded prompts -> prompts plus completions (the bridge's ``generate``
        rules, so every engine gives the same tokens)."""
        raise NotImplementedError


@dataclass(frozen=True)
class HookPatternEngine(Engine):
    """Hooks on the bridge's hook points: the readable reference."""

    name: str = "hook_pattern"

    def saliency_maps(self, model: Model, trace: Trace, target: Target, layers: list[int],
                      *, low_memory: bool, chunk_size: int | None, bar: Any) -> list[Tensor]:
        # Forward hooks keep each pattern; backward hooks pool |A * dA| and drop it, so no
        # layer's token-level saliency outlives its hook.
        device = next(model.parameters()).device
        tokens = trace.token_ids[None].to(device)
        step_of_token = trace.step_of_token.to(device)
        patterns: dict[int, Tensor] = {}
        out: dict[int, Tensor] = {}
        fwd, bwd = [], []
        for layer in layers:
            name = f"blocks.{layer}.attn.hook_pattern"

            def keep(pattern, hook, layer=layer):
                patterns[layer] = pattern.detach()

            def pool_grad(grad, hook, layer=layer):
                out[layer] = pool_saliency(patterns.pop(layer), grad, step_of_token,
                                           trace.n_steps)
                bar.update(1)

            fwd.append((name, keep))
            bwd.append((name, pool_grad))
        fwd.append(("hook_embed", require_grad))
        with activation_grads_only(model), torch.enable_grad():
            with checkpointed(model, low_memory), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                logits = model(tokens)
                backward_target(target.loss(logits.float(), trace), target.name)
        return [out[l] for l in layers]

    def stepflow_hooks(self, sf: StepFlowState) -> list[tuple[str, Any]]:
        """``(hook name, function)`` pairs of StepFlow on the bridge's hook points."""
        def oeb(pattern: Tensor, hook: Any) -> Tensor:
            layer = _layer_of(hook.name)
            sf.check_batch(pattern)
            n_q, n_k = pattern.shape[-2:]
            groups = sf.oeb_groups(layer, n_q, n_k)
            if groups is None:
                return pattern
            return sf.oeb_apply(pattern, groups, layer, sf.count(layer, "oeb"))

        def keep_values(v: Tensor, hook: Any) -> None:
            sf.keep_values(v, _layer_of(hook.name))

        def smi(act: Tensor, hook: Any) -> Tensor:
            return sf.smi(act, _layer_of(hook.name))

        c = sf.config
        out = [(f"blocks.{l}.attn.hook_pattern", oeb) for l in c.oeb_layers if c.tau_max > 0]
        if not sf.smi_on:
            return out
        if sf.variant.site == "resid_post":
            return out + [(f"blocks.{l}.hook_resid_post", smi) for l in c.smi_layers]
        for l in c.smi_layers:  # hook_v fires before hook_z in the same layer
            out += [(f"blocks.{l}.attn.hook_v", keep_values), (f"blocks.{l}.attn.hook_z", smi)]
        return out

    @contextmanager
    def attach_stepflow(self, sf: StepFlowState) -> Iterator[StepFlowState]:
        model = sf.model
        hooks = self.stepflow_hooks(sf)
        require_hooks(model, [name for name, _ in hooks])

        def before_forward(module: Any, args: tuple, kwargs: dict) -> None:
            tokens = args[0] if args else kwargs.get("input")
            if isinstance(tokens, (str, list)):
                tokens = model.to_tokens(tokens)
            sf.follow(tokens, kwargs.get("attention_mask"),
                      kwargs.get("past_key_values") is None)

        with ExitStack() as stack:
            handle = model.register_forward_pre_hook(before_forward, with_kwargs=True)
            stack.callback(handle.remove)
            stack.enter_context(model.hooks(fwd_hooks=hooks))
            yield sf

    def generate_tokens(self, model: Model, tokens: Tensor, mask: Tensor, *,
                        max_new_tokens: int, temperature: float, stop_tokens: Sequence[int],
                        pad_token: int) -> Tensor:
        return model.generate(
            tokens, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
            stop_at_eos=True, eos_token_id=list(stop_tokens), verbose=False,
            return_type="tokens")


@dataclass(frozen=True)
class FusedEngine(Engine):
    """The Hugging Face model inside the bridge, at about Hugging Face's speed."""

    name: str = "fused"

    def saliency_maps(self, model: Model, trace: Trace, target: Target, layers: list[int],
                      *, low_memory: bool, chunk_size: int | None, bar: Any) -> list[Tensor]:
        hf = model.original_model
        tokens = trace.token_ids[None].to(next(model.parameters()).device)
        spans = [s.token_span for s in trace.steps]
        maps: dict[int, Tensor] = {}

        def done(layer: int) -> None:
            bar.update(1)

        with activation_grads_only(model), torch.enable_grad(), checkpointed(model, low_memory):
            with fused.fused_attention(model, spans, layers, chunk=chunk_size,
                                       on_layer_done=done) as state:
                hidden = fused.final_hidden(model, tokens)
                unembed = hf.get_output_embeddings()
                if target.lean is not None:
                    loss = target.lean_loss(hidden, unembed, trace)
                else:
                    loss = target.loss(unembed(hidden).float(), trace)
                del hidden
                backward_target(loss, target.name)
            for layer in layers:
                sums = state.plans[layer].sums
                if sums is None:  # the target does not depend on this layer's attention
                    sums = torch.zeros(model.cfg.n_heads, trace.n_steps, trace.n_steps)
                maps[layer] = step_means(sums, state.starts, state.ends).cpu()
        return [maps[l] for l in layers]

    def attach_stepflow(self, sf: StepFlowState) -> Any:
        return fused_hooks(sf)

    def generate_tokens(self, model: Model, tokens: Tensor, mask: Tensor, *,
                        max_new_tokens: int, temperature: float, stop_tokens: Sequence[int],
                        pad_token: int) -> Tensor:
        return fused_generate_tokens(model, tokens, mask, max_new_tokens=max_new_tokens,
                                     temperature=temperature, stop_tokens=stop_tokens,
                                     pad_token=pad_token)


#: The engines, each with the reason ``"requested"``.
HOOK_PATTERN = HookPatternEngine()
FUSED = FusedEngine()
_BY_NAME = {e.name: e for e in (FUSED, HOOK_PATTERN)}


def list_engines() -> list[str]:
    """What ``engine=`` accepts (the CLI's ``--engine`` choices)."""
    return list(ENGINES)


def get_engine(name: str | Engine, reason: str = "requested") -> Engine:
    """An engine by name (not ``"auto"``: that is :func:`choose`); an Engine passes
    through."""
    if isinstance(name, Engine):
        return name
    if name not in _BY_NAME:
        raise StepSalError(f"StepFlow runs engine 'fused' or 'hook_pattern'; got {name!r} "
                           f"(stepflow(..., engine='auto') chooses one)")
    return _BY_NAME[name].because(reason)


def _hooked(names: list[str]) -> str:
    return f"{names[:4]}{' ...' if len(names) > 4 else ''}"


def choose(model: Model, want: str | Engine = "auto", needs_hooks: bool = False, *,
           purpose: str = "saliency") -> Engine:
    """The engine to run and why: the one rule for ``engine="auto"``.

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm`.
    want
        ``"auto"``, ``"fused"`` or ``"hook_pattern"`` (an :class:`Engine` passes through:
        it was chosen already).
    needs_hooks
        True where code may use the bridge's hooks (a ``stepflow`` block): ``"auto"``
        then means ``"hook_pattern"``.
    purpose
        ``"saliency"`` (Step-Saliency) or ``"stepflow"`` (a StepFlow block or generation
        run): StepFlow's fused engine runs inside Hugging Face mode too and needs each
        layer's Hugging Face attention; the messages name what was asked for.

    Notes
    -----
    ``"auto"`` runs ``hook_pattern`` when hooks are attached to the bridge (the fused
    engine would not run them) and for low-precision models with attention sinks
    (measured on a gpt-oss checkpoint with harmony's long prompt: the fused sink path in
    bfloat16 is off by 13.6% of the map maximum, the hook_pattern engine by 1.6%);
    ``"fused"`` refuses a hooked model, naming the hooks.
    """
    if isinstance(want, Engine):
        return want
    stepflow = purpose == "stepflow"
    if want not in ENGINES:
        what = "StepFlow engine" if stepflow else "engine"
        raise StepSalError(f"unknown {what} {want!r}; choose one of {list(ENGINES)}")
    if want == "hook_pattern":
        return HOOK_PATTERN
    if want == "auto" and needs_hooks:
        return HOOK_PATTERN.because(BLOCK_REASON)
    hooked = attention_hooks_in_use(model)
    if stepflow:  # the fused StepFlow engine runs inside Hugging Face mode as well
        hooked = [h for h in hooked if h != RUNNING_MARK]
    if hooked:
        if want == "fused":
            raise StepSalError(
                f"the fused StepFlow engine runs the Hugging Face model without the bridge's "
                f"hook points, and hooks are attached to {_hooked(hooked)}; use "
                f"engine='hook_pattern' (or 'auto'), or remove the hooks (model.reset_hooks())"
                if stepflow else
                f"the fused engine does not run the bridge's hooks, and hooks are attached to "
                f"{_hooked(hooked)}; use engine='hook_pattern' (or engine='auto'), or remove "
                f"the hooks (model.reset_hooks())")
        return HOOK_PATTERN.because(f"hooks attached to {_hooked(hooked)}")
    if stepflow:
        try:
            attention_slots(model)
        except StepSalError as err:
            if want == "fused":
                raise
            return HOOK_PATTERN.because(str(err))
    if want == "auto" and has_sinks(model) and next(model.parameters()).dtype != torch.float32:
        return HOOK_PATTERN.because("attention sinks in a low-precision model")
    return FUSED if want == "fused" else FUSED.because("default")
