"""Correct vs wrong traces, their step maps averaged over binned steps
(:class:`GroupComparison`, opened by :func:`compare_groups`); :class:`Panel` is the layout
the comparisons share.

Examples
--------
>>> binned_segments({"question": 1, "thinking": 2, "summary": 1})
['question', 'thinking', 'thinking', 'summary']
"""

from __future__ import annotations

import uuid
import warnings
from typing import Any

import numpy as np

from stepsal_lens.errors import StepSalError
from stepsal_lens.apps.plots import figure_png, plot_condition_curves, plot_map_pair
from stepsal_lens.apps.step_explorer import StaticTwin, step_map, view_class
from stepsal_lens.core.metrics import layer_metrics

__all__ = ["BINS", "GroupComparison", "Panel", "binned_map", "binned_segments", "binned_ticks",
           "compare_groups", "fit_bins"]


# ---- groups of traces ------------------------------------------------------------------------

#: Most bins per segment when maps of traces with different step counts are averaged
#: (:func:`fit_bins` lowers them so that no bin is empty).
BINS = {"question": 1, "thinking": 6, "summary": 2}
_ORDER = ("question", "thinking", "summary")


def fit_bins(results: Any, bins: dict[str, int] | None = None) -> dict[str, int]:
    """Bins per segment for a set of results: at most ``bins`` (default :data:`BINS`) and
    at most the fewest steps any result has in that segment, so every bin holds a step of
    every trace (no empty bins); at least one bin per segment."""
    bins = dict(BINS if bins is None else bins)
    results = list(results)
    return {seg: max(1, min([bins[seg]] + [list(r.segments).count(seg) or bins[seg]
                                           for r in results])) for seg in _ORDER}


def binned_segments(bins: dict[str, int]) -> list[str]:
    """The segment of each bin, in order (question, thinking, summary)."""
    return [seg for seg in _ORDER for _ in range(bins[seg])]


def binned_ticks(bins: dict[str, int]) -> list[str]:
    """Tick labels of the bins: ``Q``, ``T1``..``Tn``, ``S1``..``Sm`` (no number when a
    segment has one bin)."""
    out = []
    for seg in _ORDER:
        letter = seg[0].upper()
        out += [letter] if bins[seg] == 1 else [f"{letter}{k + 1}" for k in range(bins[seg])]
    return out


def binned_map(result: Any, layer_index: int, bins: dict[str, int] | None = None) -> np.ndarray:
    """A head-mean, row-normalised map resampled to fixed segment-relative bins, so traces
    with different numbers of steps can be averaged: the question is one bin, the
    thinking and summary steps are spread evenly over their bins (``BINS``). Bins no
    step falls in are NaN."""
    bins = dict(BINS if bins is None else bins)
    m = step_map(result, layer_index)
    segs = list(result.segments)
    offsets, index = {}, 0
    for seg in _ORDER:
        offsets[seg], index = index, index + bins[seg]
    where = []
    for seg in _ORDER:
        members = [i for i, s in enumerate(segs) if s == seg]
        for k, _ in enumerate(members):
            where.append(offsets[seg] + k * bins[seg] // len(members))
    order = [i for seg in _ORDER for i, s in enumerate(segs) if s == seg]
    bin_of = np.empty(len(segs), dtype=int)
    bin_of[order] = where
    total = np.zeros((index, index))
    count = np.zeros((index, index))
    np.add.at(total, (bin_of[:, None], bin_of[None, :]), m)
    np.add.at(count, (bin_of[:, None], bin_of[None, :]), 1)
    with np.errstate(invalid="ignore"):
        return total / np.where(count == 0, np.nan, count)


class Panel(StaticTwin):
    """Shared layout: a layer slider redrawing a PNG of two maps and their difference."""

    def __init__(self, n_layers: int, layers: list[int]):
        import ipywidgets as w

        self.layers = layers
        self.static_key = uuid.uuid4().hex[:12]
        self.layer = w.IntSlider(value=0, min=0, max=n_layers - 1, description="layer",
                                 readout=False, continuous_update=False)
        self.layer_label = w.Label(f"layer {layers[0]}")
        self.maps = w.Image(format="png")
        self.hider = view_class()(kind="hide", static_key=self.static_key)
        self.layer.observe(lambda _c: self.redraw(), names="value")

    def _alt(self) -> str:
        return f"layer {self.layers[self.layer.value]}: {type(self).__name__} maps"

    def static_png(self) -> bytes:
        return self.maps_png()

    def maps_png(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def redraw(self) -> None:
        self.layer_label.value = f"layer {self.layers[self.layer.value]}"
        self.maps.value = self.maps_png()
        self.update_static()


def _check_group(results: Any, what: str) -> list[Any]:
    results = list(results)
    if not results:
        raise StepSalError(f"{what} is empty; pass a list of StepSaliency results")
    layers = list(results[0].layers)
    if any(list(r.layers) != layers for r in results):
        raise StepSalError(f"the results in {what} cover different layers; compute them with "
                           f"the same layers=")
    return results


def _group_metrics(results: list[Any]):
    import pandas as pd

    return pd.concat([layer_metrics(r) for r in results], ignore_index=True)


class GroupComparison(Panel):
    """Correct vs wrong traces (made by :func:`compare_groups`)."""

    def __init__(self, correct: Any, wrong: Any, *, bins: dict[str, int] | None = None):
        import ipywidgets as w


        self.correct = _check_group(correct, "correct_results")
        self.wrong = _check_group(wrong, "wrong_results")
        if list(self.correct[0].layers) != list(self.wrong[0].layers):
            raise StepSalError("the two groups cover different layers")
        self.bins = fit_bins([*self.correct, *self.wrong], bins)
        super().__init__(len(self.correct[0].layers), list(self.correct[0].layers))
        self.metrics = {"correct": _group_metrics(self.correct),
                        "wrong": _group_metrics(self.wrong)}
        self.curves = w.Image(format="png", value=figure_png(
            plot_condition_curves(self.metrics), dpi=80))
        self.redraw()
        self.widget = w.VBox([w.HBox([self.layer, self.layer_label]), self.maps, self.curves,
                              self.hider])

    def group_map(self, group: str) -> np.ndarray:
        """Mean binned map of one group (``"correct"`` or ``"wrong"``) at the current layer."""
        results = self.correct if group == "correct" else self.wrong
        stack = np.stack([binned_map(r, self.layer.value, self.bins) for r in results])
        with warnings.catch_warnings():  # a bin empty in every trace stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(stack, axis=0)

    def maps_png(self) -> bytes:
        fig = plot_map_pair(
            self.group_map("wrong"), self.group_map("correct"), binned_segments(self.bins),
            tick_labels=binned_ticks(self.bins),
            titles=(f"wrong ({len(self.wrong)} traces)",
                    f"correct ({len(self.correct)} traces)", "correct - wrong"),
            suptitle=f"layer {self.layers[self.layer.value]}: head-mean, row-normalised, "
                     f"group mean on segment bins (Q | T1..T{self.bins['thinking']} | S)",
            unit="bin")
        return figure_png(fig, dpi=80)


def compare_groups(correct_results: Any, wrong_results: Any, *,
            bins: dict[str, int] | None = None) -> GroupComparison:
    """Group-mean maps of correct and wrong traces side by side (with their difference)
    and the per-layer lock-in / thinking-share curves with 95% bands. Maps of traces
    with different step counts are averaged on segment-relative bins
    (:func:`binned_map`; :func:`fit_bins` picks bins that no trace leaves empty)."""
    return GroupComparison(correct_results, wrong_results, bins=bins)
