"""Results and settings that travel with them: plain data, JSON/safetensors IO."""

from stepsal_lens.results.config import SMI_VARIANTS, StepFlowConfig, default_layer_split

__all__ = ["SMI_VARIANTS", "StepFlowConfig", "default_layer_split"]
