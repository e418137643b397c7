"""The Step-Saliency explorer with a "saliency | causal effect" toggle on the map
(:func:`causal_explorer`, opened by ``explore(result, effects=effects)``).

Examples
--------
>>> causal_explorer.__name__
'causal_explorer'
"""

from __future__ import annotations

from typing import Any

import torch

from stepsal_lens.apps.effect_plots import effect_map
from stepsal_lens.apps.step_explorer import StepExplorer
from stepsal_lens.errors import StepSalError
from stepsal_lens.results.effects import StepEffects
from stepsal_lens.typing import Model

__all__ = ["causal_explorer"]


def causal_explorer(result: Any, effects: StepEffects, *, model: Model = None,
                    trace: Any = None):
    """The Step-Saliency explorer with a "saliency | causal effect" toggle on the map.

    In causal mode the map is :func:`effect_map` for the slider's layer (the cut in that
    layer alone when ``effects`` has ``per_layer``, else in all layers). Also reached
    as ``explore(result, effects=effects)``.
    """
    class CausalExplorer(StepExplorer):
        """StepExplorer plus a source toggle (``source``: ToggleButtons)."""

        def __init__(self):
            import ipywidgets as w

            if not torch.equal(result.token_ids.long(), effects.token_ids.long()):
                raise StepSalError("the saliency and the effects come from different token "
                                   "ids; compute both on the same Trace")
            self.effects = effects
            self.source = w.ToggleButtons(options=["saliency", "causal effect"],
                                          value="saliency")
            super().__init__(result, model=model, trace=trace)
            self.source.observe(self.redraw, names="value")
            self.widget = w.VBox([self.source, *self.widget.children])

        def _z(self):
            if getattr(self, "source", None) is None or self.source.value == "saliency":
                return super()._z()
            layer, _head, scale = self.current()
            return effect_map(self.effects, self.result.layers[layer], scale)

        def _title(self):
            if getattr(self, "source", None) is None or self.source.value == "saliency":
                return super()._title()
            layer, _head, scale = self.current()
            real = self.result.layers[layer]
            where = (f"cut in layer {real}" if self.effects.per_layer is not None
                     and real in self.effects.layers else "cut in all layers")
            return f"causal effect ({where}), {scale}"

    return CausalExplorer()
