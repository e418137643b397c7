"""What both fused engines ask of a bridge: its hooks in use, its Hugging Face attention
modules, and whether it runs as the plain Hugging Face model right now.

The fused Step-Saliency engine (:mod:`stepsal_lens.lens.fused`) and the fused StepFlow
engine (:mod:`stepsal_lens.lens.fused_stepflow`) both run the Hugging Face model inside
the bridge without (some of) the bridge's hook points; the engine chooser
(:func:`stepsal_lens.lens.engines.choose`) reads these facts to decide. Neither engine
imports the other: this module is below both.

Examples
--------
>>> from stepsal_lens import load_lrm
>>> model = load_lrm("tiny-lrm")
>>> attention_hooks_in_use(model), is_running(model)
([], False)
>>> with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)]):
...     attention_hooks_in_use(model)
['blocks.0.attn.hook_pattern']
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from stepsal_lens.errors import StepSalError
from stepsal_lens.typing import Model

__all__ = ["MODEL_HOOKS", "RUNNING_MARK", "attention_hooks_in_use", "attention_slots",
           "is_running", "running"]

#: How :func:`attention_hooks_in_use` names a model inside the fused StepFlow engine's
#: :func:`~stepsal_lens.lens.fused_stepflow.hugging_face_mode` (so that the fused saliency
#: engine stays out).
RUNNING_MARK = "<Hugging Face mode (fused StepFlow)>"
#: How :func:`attention_hooks_in_use` names forward hooks on the bridge module itself.
MODEL_HOOKS = "<model forward hooks>"

# Hugging Face models currently running without the bridge's components
_RUNNING: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def is_running(model: Model) -> bool:
    """Whether ``model`` runs as the plain Hugging Face model now (e.g. inside a fused
    StepFlow block)."""
    return getattr(model, "original_model", None) in _RUNNING


@contextmanager
def running(hf: nn.Module) -> Iterator[nn.Module]:
    """Mark the Hugging Face model ``hf`` as running without the bridge's components for
    the block (:func:`is_running` says so meanwhile)."""
    _RUNNING.add(hf)
    try:
        yield hf
    finally:
        _RUNNING.discard(hf)


def attention_hooks_in_use(model: Model) -> list[str]:
    """Names of the bridge's hook points and modules with hooks attached (the fused engine
    does not run ``hook_pattern`` and friends, so it refuses a hooked model)."""
    from transformer_lens.hook_points import HookPoint

    names = [name for name, hp in model.hook_dict.items()
             if isinstance(hp, HookPoint) and (hp.fwd_hooks or hp.bwd_hooks
                                               or hp._forward_hooks or hp._backward_hooks)]
    if model._forward_pre_hooks or model._forward_hooks:
        names.append(MODEL_HOOKS)
    if is_running(model):  # the bridge's components are swapped out (fused StepFlow)
        names.append(RUNNING_MARK)
    return sorted(set(names))


def attention_slots(model: Model) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """(Hugging Face decoder layer, its AttentionBridge, the Hugging Face attention) per
    layer; refused, naming the ``hook_pattern`` engine, where the bridge hides them."""
    slots = []
    for layer, block in enumerate(model.blocks):
        hf_layer = getattr(block, "original_component", None)
        bridge_attn = getattr(hf_layer, "self_attn", None)
        hf_attn = getattr(bridge_attn, "original_component", None)
        if hf_attn is None or getattr(hf_attn, "layer_idx", layer) != layer:
            raise StepSalError(f"the fused engine cannot find layer {layer}'s Hugging Face "
                               f"attention in this bridge; use engine='hook_pattern'")
        slots.append((hf_layer, bridge_attn, hf_attn))
    return slots
