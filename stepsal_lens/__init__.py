"""stepsal_lens: Step-Saliency, failure-mode diagnostics and StepFlow for reasoning models.

The public API is re-exported here; everything else lives in its layer (docs/architecture.md):
``segments`` (what a step is), ``core`` (pure tensor math), ``lens`` (the only code that
touches TransformerLens), ``results`` (data and files), ``eval`` (answers, problems, runs)
and ``apps`` (CLI, demo, report, figures, explorers).
"""

from stepsal_lens._version import __version__
from stepsal_lens.errors import StepSalError
from stepsal_lens.segments.formats import ReasoningFormat, get_format, list_formats, register_format
from stepsal_lens.segments.splitters import list_splitters, regex_splitter, register_splitter
from stepsal_lens.segments.trace import Step, Trace
from stepsal_lens.segments.association import ModelInfo, attach, format_of, info_of
from stepsal_lens.segments.tracker import SegmentTracker
from stepsal_lens.core.interventions import odds_equal_bridge, step_momentum
from stepsal_lens.core.metrics import compare, layer_metrics, trace_metrics
from stepsal_lens.results import StepFlowConfig, StepFlowStats, StepSaliency, default_layer_split
from stepsal_lens.lens.models import detect_format, list_models, load_lrm, register_model
from stepsal_lens.lens.targets import list_targets, register_target
from stepsal_lens.lens.saliency import step_saliency, token_saliency
from stepsal_lens.lens.stepflow import StepFlow, stepflow
from stepsal_lens.results.generation import Generation
from stepsal_lens.lens.generation import generate
from stepsal_lens.lens.knockout import Knockout, step_knockout
from stepsal_lens.core.knockout import Suppression
from stepsal_lens.results.effects import ReceiverHeads, StepEffects
from stepsal_lens.core.causal import correlation_summary, saliency_effect_correlation
from stepsal_lens.lens.causal import patch_step, receiver_heads, step_attention, step_effects
from stepsal_lens.eval.runs import evaluate
from stepsal_lens.apps.widgets import explore
from stepsal_lens import zoo as _zoo  # noqa: E402, F401  (the bundled plug-in registers itself)

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
    "evaluate",
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
