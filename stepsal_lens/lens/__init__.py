"""The only package that imports TransformerLens or touches the bridge: loading, targets,
the saliency engines, StepFlow's hooks, generation, knockout and the causal loops."""
