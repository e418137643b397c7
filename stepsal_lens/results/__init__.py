"""Results and the settings that travel with them: plain data, safetensors + JSON files."""

from stepsal_lens.results.config import SMI_VARIANTS, StepFlowConfig, default_layer_split
from stepsal_lens.results.saliency import StepSaliency
from stepsal_lens.results.stats import StepFlowStats

__all__ = ["SMI_VARIANTS", "StepFlowConfig", "StepFlowStats", "StepSaliency",
           "default_layer_split"]
