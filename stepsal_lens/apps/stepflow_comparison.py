"""One question with and without StepFlow (:class:`StepFlowComparison`, opened by
:func:`compare_stepflow`).

Examples
--------
>>> compare_stepflow.__name__
'compare_stepflow'
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stepsal_lens.apps.escape import esc
from stepsal_lens.errors import StepSalError
from stepsal_lens.apps.plots import figure_png, plot_map_pair
from stepsal_lens.apps.group_comparison import (Panel, binned_map, binned_segments, binned_ticks,
                                                fit_bins)
from stepsal_lens.apps.step_explorer import step_map
from stepsal_lens.core.metrics import layer_metrics

__all__ = ["StepFlowComparison", "compare_stepflow"]


def _trace_text(result: Any) -> str:
    return result.meta.get("text") or "\n".join(s.text for s in result.steps)


class StepFlowComparison(Panel):
    """One question with and without StepFlow (made by :func:`compare_stepflow`)."""

    def __init__(self, off: Any, on: Any, *, text_off: str | None = None,
                 text_on: str | None = None):
        import ipywidgets as w
        import pandas as pd

        if list(off.layers) != list(on.layers):
            raise StepSalError("the two results cover different layers")
        self.off, self.on = off, on
        super().__init__(len(off.layers), list(off.layers))
        self.same_steps = [s.text for s in off.steps] == [s.text for s in on.steps]
        self.bins = fit_bins([off, on]) if not self.same_steps else None
        m_off, m_on = layer_metrics(off), layer_metrics(on)
        cols = [c for c in ("lock_in", "context_share", "thinking_share") if c in m_off]
        table = pd.DataFrame({"layer": m_off["layer"]})
        for c in cols:
            table[f"{c} off"], table[f"{c} on"] = m_off[c], m_on[c]
        self.table = table
        t_off = text_off if text_off is not None else _trace_text(off)
        t_on = text_on if text_on is not None else _trace_text(on)
        self.same_text = t_off == t_on
        note = ("The two texts are identical: StepFlow did not change this generation."
                if self.same_text else "The two texts differ.")
        self.texts = w.HTML(
            f"<p>{note} The maps were measured on: "
            f"{'the same steps' if self.same_steps else 'different steps (binned)'}.</p>"
            "<div style='display:flex;gap:1em'>" + "".join(
                f"<div style='flex:1'><b>{label}</b><pre style='white-space:pre-wrap'>"
                f"{esc(t or '')}</pre></div>"
                for label, t in (("StepFlow off", t_off), ("StepFlow on", t_on))) + "</div>")
        self.curves = w.HTML(table.round(4).to_html(index=False, escape=True))
        self.redraw()
        self.widget = w.VBox([w.HBox([self.layer, self.layer_label]), self.maps, self.curves,
                              self.texts, self.hider])

    def maps_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """The off and on maps at the current layer (binned when the steps differ)."""
        i = self.layer.value
        if self.same_steps:
            return step_map(self.off, i), step_map(self.on, i)
        return binned_map(self.off, i, self.bins), binned_map(self.on, i, self.bins)

    def maps_png(self) -> bytes:
        off, on = self.maps_pair()
        if self.same_steps:
            segments, ticks, unit = list(self.off.segments), None, "step"
        else:
            segments, ticks, unit = (binned_segments(self.bins), binned_ticks(self.bins),
                                     "bin")
        fig = plot_map_pair(off, on, segments, tick_labels=ticks, unit=unit,
                            titles=("StepFlow off", "StepFlow on", "on - off"),
                            suptitle=f"layer {self.layers[self.layer.value]}: head-mean, "
                                     f"row-normalised"
                                     + ("" if self.same_steps else " (different steps: binned)"))
        return figure_png(fig, dpi=80)


def compare_stepflow(off: Any, on: Any, *, text_off: str | None = None,
                     text_on: str | None = None) -> StepFlowComparison:
    """The same question (or the same trace teacher-forced) without and with StepFlow:
    maps side by side with their difference, per-layer metrics, and the two texts
    (escaped, with a note when they are identical). ``off`` / ``on`` are
    :class:`~stepsal_lens.StepSaliency` results; pass the texts their traces came from
    (by default the texts of their steps)."""
    return StepFlowComparison(off, on, text_off=text_off, text_on=text_on)
