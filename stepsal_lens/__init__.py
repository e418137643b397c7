"""stepsal_lens: Step-Saliency, failure-mode diagnostics and StepFlow for reasoning models.

The public API is re-exported here; everything else lives in its module.
"""

from stepsal_lens.errors import StepSalError
from stepsal_lens.formats import ReasoningFormat, get_format, list_formats, register_format
from stepsal_lens.models import (
    ModelInfo,
    attach,
    detect_format,
    format_of,
    info_of,
    list_models,
    load_lrm,
    register_model,
)
from stepsal_lens.results import StepFlowConfig, default_layer_split
from stepsal_lens.metrics import compare, layer_metrics, trace_metrics
from stepsal_lens import stepflow  # the module is callable: `with stepflow(model):`
from stepsal_lens.stepflow import (
    SegmentTracker,
    StepFlow,
    StepFlowStats,
    odds_equal_bridge,
    step_momentum,
)
from stepsal_lens.saliency import (
    StepSaliency,
    list_targets,
    register_target,
    step_saliency,
    token_saliency,
)
from stepsal_lens.causal import (
    ReceiverHeads,
    StepEffects,
    correlation_summary,
    patch_step,
    receiver_heads,
    saliency_effect_correlation,
    step_attention,
    step_effects,
)
from stepsal_lens.knockout import Knockout, Suppression, step_knockout
from stepsal_lens.trace import Step, Trace, list_splitters, regex_splitter, register_splitter
from stepsal_lens.generation import Generation, generate
from stepsal_lens.widgets import explore

__version__ = "0.1.0"

__all__ = [
    "Generation",
    "ModelInfo",
    "Knockout",
    "ReasoningFormat",
    "ReceiverHeads",
    "SegmentTracker",
    "Step",
    "StepSalError",
    "StepFlow",
    "StepFlowConfig",
    "StepEffects",
    "StepFlowStats",
    "StepSaliency",
    "Suppression",
    "Trace",
    "attach",
    "compare",
    "correlation_summary",
    "default_layer_split",
    "detect_format",
    "explore",
    "format_of",
    "generate",
    "get_format",
    "info_of",
    "layer_metrics",
    "list_formats",
    "list_models",
    "list_splitters",
    "list_targets",
    "load_lrm",
    "patch_step",
    "receiver_heads",
    "odds_equal_bridge",
    "regex_splitter",
    "register_format",
    "register_model",
    "register_splitter",
    "register_target",
    "saliency_effect_correlation",
    "step_attention",
    "step_effects",
    "step_knockout",
    "step_momentum",
    "step_saliency",
    "stepflow",
    "token_saliency",
    "trace_metrics",
]
