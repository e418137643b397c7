"""Pure tensor math, fully typed, no model and no hooks: pooling saliency into step maps,
OEB and SMI, failure-mode metrics, the causal tools' statistics and knockout masks."""
