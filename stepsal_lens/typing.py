"""Named tensor shapes used across the package (jaxtyping)."""

from __future__ import annotations

from typing import Any

from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["Pattern", "PatternGrad", "StepMap", "LayerStepMap", "TokenIds", "KeyMask", "Resid", "Model"]

#: Post-softmax attention pattern, query heads (GQA key/value heads expanded).
Pattern = Float[Tensor, "batch head query key"]
#: dL/dA for a pattern, same layout.
PatternGrad = Float[Tensor, "batch head query key"]
#: Step-to-step saliency for every layer and head.
StepMap = Float[Tensor, "layer head step step"]
#: Step-to-step map of one layer (head-mean or one head) or a stack over layers.
LayerStepMap = Float[Tensor, "*layer step step"]
#: Token ids of one sequence.
TokenIds = Int[Tensor, " token"]
#: Boolean key mask, broadcastable to a pattern.
KeyMask = Bool[Tensor, "..."]
#: Residual stream activations.
Resid = Float[Tensor, "batch pos d_model"]

#: A model the lens runs: a TransformerLens ``TransformerBridge`` from
#: :func:`~stepsal_lens.load_lrm` (the bridge types are not importable without
#: TransformerLens, so this names the role rather than the class).
Model = Any
