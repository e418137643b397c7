"""Gradient plumbing shared by the saliency engines and :func:`~stepsal_lens.token_saliency`:
activation gradients only, layer checkpointing, a checked ``backward`` of the target.

Examples
--------
>>> import torch
>>> backward_target(torch.tensor(1.0, requires_grad=True) * 2, "lm")
>>> backward_target(torch.tensor(float("nan"), requires_grad=True), "lm")
Traceback (most recent call last):
...
stepsal_lens.errors.StepSalError: the saliency target 'lm' is nan: the model gives non-finite logits on this trace; check its weights for NaN/inf (torch.isfinite on each parameter) and load it in float32
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.typing import Model

__all__ = ["activation_grads_only", "backward_target", "checkpointed", "require_grad"]


@contextmanager
def activation_grads_only(model: Model) -> Iterator[None]:
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


@contextmanager
def checkpointed(model: Model, enabled: bool) -> Iterator[None]:
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


def require_grad(x: Tensor, hook: Any) -> Tensor:
    """A hook that makes its activation a leaf with a gradient (``hook_embed``)."""
    return x.detach().requires_grad_(True)


def backward_target(loss: Any, name: str) -> None:
    """``loss.backward()`` after checking that the target ``name`` gave a finite scalar
    that depends on the logits."""
    if not isinstance(loss, Tensor):
        raise StepSalError(f"the saliency target {name!r} returned a {type(loss).__name__}; "
                           f"it must return a scalar tensor computed from the logits")
    if loss.dim() != 0:
        raise StepSalError(f"the saliency target must be a scalar; {name!r} gave shape "
                           f"{tuple(loss.shape)}")
    if not bool(torch.isfinite(loss)):
        raise StepSalError(f"the saliency target {name!r} is {loss.item()}: the model gives "
                           f"non-finite logits on this trace; check its weights for NaN/inf "
                           f"(torch.isfinite on each parameter) and load it in float32")
    if not loss.requires_grad:
        raise StepSalError(f"the saliency target {name!r} does not depend on the logits (no "
                           f"gradient); compute it from the logits it is given")
    loss.backward()
