"""Notebook explorers for Step-Saliency (ipywidgets controls + small SVG views).

``explore(result)`` opens one trace: a layer slider, a head selector (mean or one head),
a scale (raw / row-normalised / log), the step map with question / thinking / summary
boxes and a legend (hover shows both steps' text), and the per-layer lock-in and
thinking-share curves with the current layer marked. Given the model and trace, clicking a
cell (or ``explorer.select_cell(i, j)``) shows that step pair's token-level saliency and
attention, each scaled to the pair's maximum.

How an explorer survives saving: the views are an anywidget whose state is the data it
draws (cell colours, ticks, texts, curve points) plus a few kilobytes of its own
JavaScript, so a saved notebook stays small and a page reloaded with a live kernel
redraws the same map. Beside the widget, every explorer displays a static PNG of its
current view (kept up to date as the controls move); the live view hides it, and
wherever widgets cannot run (a fresh kernel, GitHub, an HTML export offline) the PNG is
what shows. Nothing here touches matplotlib's backend (:mod:`stepsal_lens.apps.plots`).

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

import base64
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsal_lens._checks import check_type
from stepsal_lens.apps.escape import esc
from stepsal_lens.errors import StepSalError
from stepsal_lens.apps.plots import (
    SEGMENT_COLORS,
    draw_step_map,
    figure_png,
    img_tag,
    map_colors,
    new_figure,
    plot_map_pair,
    segment_boundaries,
    segment_ticks,
    token_html,
)

__all__ = ["BINS", "GroupComparison", "StepExplorer", "StepFlowComparison", "binned_map",
           "binned_segments", "binned_ticks", "compare_groups", "compare_stepflow", "explore",
           "fit_bins", "step_map", "token_values", "trace_tokens"]

SCALES = ("raw", "row-normalised", "log")
_JS = Path(__file__).with_name("_views.js")
_CURVE_COLORS = {"lock_in": "#2ca02c", "thinking_share": "#d62728"}
_SCALE_LABEL = {"raw": "saliency (mean |A·dL/dA|)",
                "row-normalised": "share of the row (row-normalised)",
                "log": "log10 saliency"}


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def step_map(result: Any, layer_index: int, head: int | None = None,
             scale: str = "row-normalised") -> np.ndarray:
    """The ``[step, step]`` map an explorer shows: one layer (index into
    ``result.layers``), one head or the head mean, on a raw / row-normalised / log scale."""
    from stepsal_lens.core.metrics import normalize_rows

    if scale not in SCALES:
        raise StepSalError(f"scale must be one of {SCALES}; got {scale!r}")
    maps = result.maps[layer_index].double()
    m = maps.mean(0) if head is None else maps[head]
    if scale == "row-normalised":
        m = normalize_rows(m)
    elif scale == "log":
        positive = m[m > 0]
        floor = float(positive.min()) if len(positive) else 1e-12
        m = torch.log10(m.clamp_min(floor))
    return m.numpy()


def _view_class():
    """The anywidget class behind the explorer's views (made on first use, so importing
    this module does not import anywidget)."""
    global _View
    if _View is None:
        import anywidget
        import traitlets as t

        class StepView(anywidget.AnyWidget):
            """A heatmap (``kind="heatmap"``) or per-layer curves (``kind="curves"``)
            drawn as SVG from the data in its state; ``kind="hide"`` draws nothing and
            only hides its static twin."""

            _esm = _JS.read_text()
            kind = t.Unicode("heatmap").tag(sync=True)
            key = t.Unicode("").tag(sync=True)
            static_key = t.Unicode("").tag(sync=True)
            title = t.Unicode("").tag(sync=True)
            z = t.List([]).tag(sync=True)
            colors = t.List([]).tag(sync=True)
            ticks = t.List([]).tag(sync=True)
            texts = t.List([]).tag(sync=True)
            boxes = t.List([]).tag(sync=True)
            legend = t.Dict({}).tag(sync=True)
            colorbar = t.Dict({}).tag(sync=True)
            value_label = t.Unicode("value").tag(sync=True)
            selected = t.List([]).tag(sync=True)
            curves = t.Dict({}).tag(sync=True)

        _View = StepView
    return _View


_View: Any = None


def _finite_or_none(m: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else float(f"{v:.6g}") for v in row] for row in m]


class _StaticTwin:
    """A widget displayed together with a PNG of its current view: the PNG is its own
    output (``image/png`` and an ``<img>``), so every frontend that cannot run the widget
    shows it; the live view hides it with a CSS rule keyed by :attr:`static_key`."""

    static_key: str
    _static_handle: Any = None

    def static_png(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def _alt(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def static_bundle(self) -> dict[str, str]:
        """The static output's display data: PNG, ``<img>`` and plain-text alt."""
        png = self.static_png()
        return {"image/png": base64.b64encode(png).decode(),
                "text/html": img_tag(png, self._alt(),
                                     css_class=f"stepsal-static stepsal-static-{self.static_key}"),
                "text/plain": self._alt()}

    def _update_static(self) -> None:
        if self._static_handle is not None:
            self._static_handle.update(self.static_bundle(), raw=True)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        bundle = self.widget._repr_mimebundle_()
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data["text/plain"] = (f"{type(self).__name__}: a live widget (it needs its kernel); "
                              f"where it cannot run, the static image below shows")
        display(data, raw=True)
        self._static_handle = display(self.static_bundle(), raw=True, display_id=True)


class StepExplorer(_StaticTwin):
    """One trace's Step-Saliency in a notebook (made by :func:`explore`).

    Attributes: ``layer`` (IntSlider, index into ``result.layers``), ``head`` (Dropdown),
    ``scale`` (ToggleButtons), ``heatmap`` and ``curves`` (SVG views whose state is the
    data they draw: ``heatmap.z``, ``heatmap.title``, ...), ``detail`` (Output with the
    token view of the selected step pair), ``widget`` (the whole layout).
    """

    def __init__(self, result: Any, *, model: Any = None, trace: Any = None):
        import ipywidgets as w

        if model is not None and trace is None or trace is not None and model is None:
            raise StepSalError("pass both model= and trace= to drill down to tokens, or neither")
        if model is not None:
            from stepsal_lens.lens.saliency import trace_tokens

            trace_tokens(model, trace)  # refuses a model with another tokenizer
            if result.token_ids.tolist() != trace.token_ids.tolist():
                raise StepSalError(
                    f"the result covers {len(result.token_ids)} token ids and the trace "
                    f"{trace.n_tokens} other ones; pass the trace the result was computed on "
                    f"(Trace.from_token_ids(result.token_ids, model))")
        self.result, self.model, self.trace = result, model, trace
        self.static_key = uuid.uuid4().hex[:12]
        self._tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        layers = list(result.layers)
        self.layer = w.IntSlider(value=0, min=0, max=len(layers) - 1,
                                 description="layer", readout=False, continuous_update=False)
        self.layer_label = w.Label(f"layer {layers[0]}")
        self.head = w.Dropdown(options=[("mean", -1)] + [(f"head {h}", h) for h in
                                                         range(result.maps.shape[1])],
                               value=-1, description="head")
        self.scale = w.ToggleButtons(options=list(SCALES), value="row-normalised")
        segments = list(result.segments)
        view = _view_class()
        self.heatmap = view(
            kind="heatmap", key=uuid.uuid4().hex[:12], static_key=self.static_key,
            ticks=segment_ticks(segments), texts=[_short(s.text) for s in result.steps],
            boxes=[dict(segment=seg, a=a, b=b, color=SEGMENT_COLORS.get(seg, "#888888"))
                   for seg, a, b in segment_boundaries(segments)],
            legend={seg: c for seg, c in SEGMENT_COLORS.items() if seg in segments})
        metrics = result.metrics() if hasattr(result, "metrics") else None
        series = [dict(name=name, color=_CURVE_COLORS[name],
                       y=[None if not np.isfinite(v) else float(v) for v in metrics[name]])
                  for name in ("lock_in", "thinking_share")
                  if metrics is not None and name in metrics]
        self._curve_series = series
        self.curves = view(kind="curves")
        self.detail = w.Output()
        self.detail.append_stdout("click a cell to see that step pair's tokens\n"
                                  if model is not None else
                                  "pass model= and trace= to drill down to tokens\n")
        self._draw()
        for control in (self.layer, self.head, self.scale):
            control.observe(self._redraw, names="value")
        self.heatmap.observe(self._on_select, names="selected")
        self.widget = w.VBox([
            w.HBox([self.layer, self.layer_label, self.head]), self.scale,
            w.HBox([self.heatmap, self.curves]), self.detail])

    # ---- drawing --------------------------------------------------------------------------
    def _current(self) -> tuple[int, int | None, str]:
        head = self.head.value
        return self.layer.value, (None if head == -1 else head), self.scale.value

    def _z(self) -> np.ndarray:
        return step_map(self.result, *self._current())

    def _title(self) -> str:
        layer, head, scale = self._current()
        return (f"layer {self.result.layers[layer]}, head {'mean' if head is None else head}, "
                f"{scale}")

    _alt = _title

    def _range(self, z: np.ndarray) -> tuple[float, float]:
        finite = z[np.isfinite(z)]
        if not len(finite):
            return 0.0, 1.0
        lo = float(finite.min()) if self.scale.value == "log" else 0.0
        hi = float(finite.max())
        return lo, hi if hi > lo else lo + 1.0

    def _draw(self) -> None:
        import matplotlib

        z = self._z()
        lo, hi = self._range(z)
        scale = matplotlib.colormaps["magma"]
        with self.heatmap.hold_sync():
            self.heatmap.z = _finite_or_none(z)
            self.heatmap.colors = map_colors(z, vmin=lo, vmax=hi)
            self.heatmap.title = self._title()
            self.heatmap.value_label = _SCALE_LABEL[self.scale.value]
            self.heatmap.colorbar = dict(
                label=_SCALE_LABEL[self.scale.value], min=f"{lo:.3g}", max=f"{hi:.3g}",
                stops=[matplotlib.colors.to_hex(scale(x)) for x in np.linspace(0, 1, 9)])
        self.curves.curves = dict(
            title="per-layer metrics (this trace)", x=[int(x) for x in self.result.layers],
            x_title="layer", y_title="share of the row", series=self._curve_series,
            marker=int(self.result.layers[self.layer.value]))

    def _redraw(self, _change=None) -> None:
        self.layer_label.value = f"layer {self.result.layers[self.layer.value]}"
        self._draw()
        self._update_static()

    # ---- drilling down ----------------------------------------------------------------------
    def _on_select(self, change) -> None:
        cell = change["new"]
        if len(cell) == 2 and cell != change["old"]:
            self.select_cell(int(cell[0]), int(cell[1]))

    def _check_steps(self, query_step: int, key_step: int) -> None:
        n = len(self.result.steps)
        if not (0 <= query_step < n and 0 <= key_step < n):
            raise StepSalError(f"steps must be in [0, {n}); got ({query_step}, {key_step})")

    def token_values(self, query_step: int, key_step: int) -> dict[str, Any]:
        """What the token view of one step pair shows, at the current layer and head:
        ``tokens`` (the key step's tokens), ``saliency`` and ``attention`` (per key token,
        the mean over the query step's tokens, divided by the largest value in the pair, so
        the largest is 1), and ``saliency_max`` / ``attention_max`` (those divisors, in
        the raw units)."""
        if self.model is None:
            raise StepSalError("this explorer has no model; explore(result, model=..., "
                               "trace=...) to drill down to tokens")
        self._check_steps(query_step, key_step)
        from stepsal_lens.lens.saliency import replay, token_saliency

        layer, head, _ = self._current()
        real_layer = self.result.layers[layer]
        if real_layer not in self._tokens:
            self._tokens[real_layer] = replay(self.result, self.model, token_saliency,
                                              self.trace, real_layer)
        sal, att = self._tokens[real_layer]
        return token_values(sal, att, self.trace.steps[query_step].token_span,
                            self.trace.steps[key_step].token_span,
                            self.trace.str_tokens(), head)

    def token_view(self, query_step: int, key_step: int):
        """An HTML view of one step pair: the key step's tokens shaded by the saliency and
        by the attention they receive from the query step's tokens (mean over those
        tokens), each scaled to the pair's maximum (the scale is stated). Plain HTML: it
        shows offline and in any frontend."""
        from IPython.display import HTML

        v = self.token_values(query_step, key_step)
        layer, head, _ = self._current()
        caption = (f"layer {self.result.layers[layer]}, head "
                   f"{'mean' if head is None else head}: per key token, the mean over the "
                   f"query step's tokens, divided by the pair's maximum (darkest = 1). "
                   f"Maximum saliency {v['saliency_max']:.3g}, maximum attention "
                   f"{v['attention_max']:.3g}. Hover a token for its value.")
        return HTML(token_html(v["tokens"], {"saliency": v["saliency"],
                                             "attention": v["attention"]},
                               caption=caption))

    def select_cell(self, query_step: int, key_step: int) -> None:
        """Show the token view of one step pair in :attr:`detail`."""
        from IPython.display import HTML

        self._check_steps(query_step, key_step)
        steps = self.result.steps
        self.heatmap.selected = [query_step, key_step]
        views = [HTML(f"<b>query step {query_step}</b> ({esc(steps[query_step].segment)}): "
                      f"{esc(_short(steps[query_step].text, 300))}<br><b>key step "
                      f"{key_step}</b> ({esc(steps[key_step].segment)}): "
                      f"{esc(_short(steps[key_step].text, 300))}")]
        if self.model is not None:
            views += [HTML("<p>saliency and attention each key token receives from the query "
                           "step</p>"), self.token_view(query_step, key_step)]
        self.detail.outputs = ()
        for view in views:
            self.detail.append_display_data(view)

    # ---- display ----------------------------------------------------------------------------
    def static_png(self) -> bytes:
        """The current map as a PNG (what a frontend without the widget shows)."""
        z = self._z()
        lo, hi = self._range(z)
        fig = new_figure(5.2, 5.0)
        ax = fig.add_subplot()
        im = draw_step_map(ax, z, self.result.segments, vmin=lo, vmax=hi,
                           title=self._title())
        fig.colorbar(im, ax=ax, shrink=0.8, label=_SCALE_LABEL[self.scale.value])
        return figure_png(fig, dpi=80)


def token_values(saliency: torch.Tensor, attention: torch.Tensor, query_span: tuple[int, int],
                 key_span: tuple[int, int], str_tokens: list[str],
                 head: int | None = None) -> dict[str, Any]:
    """Per key token of ``key_span``, the mean over the query tokens of ``query_span`` of
    the token-level saliency and attention (``[head, query, key]``; head mean or one
    head), each divided by its maximum over the pair so the largest is 1 (an all-zero pair
    stays 0). Returns ``tokens``, ``saliency``, ``attention`` (numpy) and the divisors
    ``saliency_max``, ``attention_max``."""
    qa, qb = query_span
    ka, kb = key_span
    out: dict[str, Any] = {"tokens": list(str_tokens[ka:kb])}
    for name, x in (("saliency", saliency), ("attention", attention)):
        x = x.double()
        x = x.mean(0) if head is None else x[head]
        values = x[qa:qb, ka:kb].mean(0).numpy()
        top = float(values.max()) if values.size else 0.0
        out[name] = values / top if top > 0 else values
        out[f"{name}_max"] = top
    return out


def trace_tokens(trace: Any):
    """A trace's tokens coloured by their step, with a legend: each segment in its own
    hue (question blue, thinking green, summary red), neighbouring steps of a segment in
    alternating shades, tokens in no step (template markers, spaces between steps) grey.
    Plain HTML (hover a token for its step): small, and it shows offline.

    >>> trace_tokens(trace)  # doctest: +SKIP
    """
    import matplotlib
    from IPython.display import HTML

    shades = {seg: (matplotlib.colors.to_rgb(c)) for seg, c in SEGMENT_COLORS.items()}
    colors, titles = [], []
    for step in trace.step_of_token.tolist():
        if step < 0:
            colors.append("#e6e6e6")
            continue
        seg = trace.steps[step].segment
        r, g, b = shades.get(seg, (0.5, 0.5, 0.5))
        alpha = 0.45 if step % 2 else 0.22
        colors.append(f"rgba({int(r * 255)},{int(g * 255)},{int(b * 255)},{alpha})")
    legend = {"question (step 0)": "rgba(31,119,180,0.45)",
              "thinking steps (alternating shades)": "rgba(44,160,44,0.45)",
              "summary steps": "rgba(214,39,40,0.45)", "in no step": "#e6e6e6"}
    return HTML(token_html(trace.str_tokens(), {}, colors=colors, legend=legend,
                           titles=[f"step {s}" if s >= 0 else "no step"
                                   for s in trace.step_of_token.tolist()]))


def explore(result: Any, *, model: Any = None, trace: Any = None,
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
        effect" toggle on the map (:func:`stepsal_lens.lens.causal.causal_explorer`).
    """
    from stepsal_lens.results.saliency import StepSaliency

    check_type(result, StepSaliency, "result", "a StepSaliency",
               "pass what step_saliency(model, trace) returns")
    if effects is not None:
        from stepsal_lens.apps.circuits import causal_explorer

        return causal_explorer(result, effects, model=model, trace=trace)
    return StepExplorer(result, model=model, trace=trace)


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


class _Panel(_StaticTwin):
    """Shared layout: a layer slider redrawing a PNG of two maps and their difference."""

    def __init__(self, n_layers: int, layers: list[int]):
        import ipywidgets as w

        self.layers = layers
        self.static_key = uuid.uuid4().hex[:12]
        self.layer = w.IntSlider(value=0, min=0, max=n_layers - 1, description="layer",
                                 readout=False, continuous_update=False)
        self.layer_label = w.Label(f"layer {layers[0]}")
        self.maps = w.Image(format="png")
        self._hider = _view_class()(kind="hide", static_key=self.static_key)
        self.layer.observe(lambda _c: self._redraw(), names="value")

    def _alt(self) -> str:
        return f"layer {self.layers[self.layer.value]}: {type(self).__name__} maps"

    def static_png(self) -> bytes:
        return self.maps_png()

    def maps_png(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def _redraw(self) -> None:
        self.layer_label.value = f"layer {self.layers[self.layer.value]}"
        self.maps.value = self.maps_png()
        self._update_static()


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

    from stepsal_lens.core.metrics import layer_metrics

    return pd.concat([layer_metrics(r) for r in results], ignore_index=True)


class GroupComparison(_Panel):
    """Correct vs wrong traces (made by :func:`compare_groups`)."""

    def __init__(self, correct: Any, wrong: Any, *, bins: dict[str, int] | None = None):
        import ipywidgets as w

        from stepsal_lens.apps.report import plot_condition_curves

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
        self._redraw()
        self.widget = w.VBox([w.HBox([self.layer, self.layer_label]), self.maps, self.curves,
                              self._hider])

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


def _trace_text(result: Any) -> str:
    return result.meta.get("text") or "\n".join(s.text for s in result.steps)


class StepFlowComparison(_Panel):
    """One question with and without StepFlow (made by :func:`compare_stepflow`)."""

    def __init__(self, off: Any, on: Any, *, text_off: str | None = None,
                 text_on: str | None = None):
        import ipywidgets as w
        import pandas as pd

        from stepsal_lens.core.metrics import layer_metrics

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
        self._redraw()
        self.widget = w.VBox([w.HBox([self.layer, self.layer_label]), self.maps, self.curves,
                              self.texts, self._hider])

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
