"""Notebook explorers for Step-Saliency (ipywidgets controls + small SVG views).

One explorer per module: :mod:`~stepsal_lens.apps.step_explorer` (one trace),
:mod:`~stepsal_lens.apps.causal_explorer` (with causal effects),
:mod:`~stepsal_lens.apps.group_comparison` (correct vs wrong) and
:mod:`~stepsal_lens.apps.stepflow_comparison` (StepFlow off vs on); this module opens
them and keeps their names importable from one place.

``explore(result)`` opens one trace (:class:`~stepsal_lens.apps.step_explorer.StepExplorer`:
its module says what the views show and how an explorer survives saving a notebook).

Examples
--------
>>> import tempfile
>>> from stepsal_lens import Trace, load_lrm, step_saliency
>>> from stepsal_lens.apps.widgets import explore
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp()), format="think-tags")
>>> trace = Trace.from_segments("Start with 7. Add 5. What is the result?",
...     "We start with the number 7. Adding 5 to 7 gives 12.", "The result is 12.", model)
>>> ex = explore(step_saliency(model, trace), model=model, trace=trace)
>>> ex.layer.value = 1  # the heatmap follows the slider
>>> ex.heatmap.title
'layer 1, head mean, row-normalised'
"""

from __future__ import annotations

from typing import Any

from stepsal_lens._checks import check_type
from stepsal_lens.apps.causal_explorer import causal_explorer
from stepsal_lens.apps.group_comparison import (BINS, GroupComparison, binned_map,
                                                binned_segments, binned_ticks, compare_groups,
                                                fit_bins)
from stepsal_lens.apps.step_explorer import StepExplorer, step_map, token_values, trace_tokens
from stepsal_lens.apps.stepflow_comparison import StepFlowComparison, compare_stepflow
from stepsal_lens.typing import Model
from stepsal_lens.results.saliency import StepSaliency

__all__ = ["BINS", "GroupComparison", "StepExplorer", "StepFlowComparison", "binned_map",
           "binned_segments", "binned_ticks", "compare_groups", "compare_stepflow", "explore",
           "fit_bins", "step_map", "token_values", "trace_tokens"]


def explore(result: Any, *, model: Model = None, trace: Any = None,
            effects: Any = None) -> StepExplorer:
    """Open a :class:`~stepsal_lens.StepSaliency` in an interactive explorer.

    Parameters
    ----------
    result
        From :func:`~stepsal_lens.step_saliency`.
    model, trace
        The model and trace it came from: enables clicking a cell to see that step
        pair's token-level saliency and attention.
    effects
        A :class:`~stepsal_lens.StepEffects` of the same trace: adds a "saliency | causal
        effect" toggle on the map (:func:`stepsal_lens.apps.causal_explorer.causal_explorer`).
    """
    check_type(result, StepSaliency, "result", "a StepSaliency",
               "pass what step_saliency(model, trace) returns")
    if effects is not None:
        return causal_explorer(result, effects, model=model, trace=trace)
    return StepExplorer(result, model=model, trace=trace)
