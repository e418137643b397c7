"""Notebook explorers for Step-Saliency (ipywidgets + plotly, circuitsvis for tokens).

``explore(result)`` opens one trace: a layer slider, a head selector (mean or one head),
a scale (raw / row-normalised / log), the step map with question / thinking / summary
boundaries (hover shows both steps' text), and the per-layer lock-in and thinking-share
curves with the current layer marked. Given the model and trace, clicking a cell (or
``explorer.select_cell(i, j)``) shows that step pair's token-level saliency and attention
with circuitsvis. Every explorer also carries a static PNG, so an exported notebook still
shows the map.

Examples
--------
>>> import tempfile
>>> from stepsal_lens import Trace, load_lrm, step_saliency
>>> from stepsal_lens.widgets import explore
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp()), format="think-tags")
>>> trace = Trace.from_segments("Start with 7. Add 5. What is the result?",
...     "We start with the number 7. Adding 5 to 7 gives 12.", "The result is 12.", model)
>>> ex = explore(step_saliency(model, trace), model=model, trace=trace)
>>> ex.layer.value = 1  # the heatmap follows the slider
>>> ex.heatmap.layout.title.text
'layer 1, head mean, row-normalised'
"""

from __future__ import annotations

import base64
import html
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stepsal_lens.errors import StepSalError
from stepsal_lens.plots import figure_png, img_tag, segment_boundaries

__all__ = ["BINS", "GroupComparison", "StepExplorer", "StepFlowComparison", "binned_map",
           "compare", "compare_stepflow", "explore", "step_map"]

SCALES = ("raw", "row-normalised", "log")
_SEG_COLOR = {"question": "#1f77b4", "thinking": "#2ca02c", "summary": "#d62728"}


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return html.escape(text if len(text) <= n else text[:n - 1] + "…")


def step_map(result: Any, layer_index: int, head: int | None = None,
             scale: str = "row-normalised") -> np.ndarray:
    """The ``[step, step]`` map an explorer shows: one layer (index into
    ``result.layers``), one head or the head mean, on a raw / row-normalised / log scale."""
    from stepsal_lens.metrics import normalize_rows

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


class StepExplorer:
    """One trace's Step-Saliency in a notebook (made by :func:`explore`).

    Attributes: ``layer`` (IntSlider, index into ``result.layers``), ``head`` (Dropdown),
    ``scale`` (ToggleButtons), ``heatmap`` and ``curves`` (plotly FigureWidgets),
    ``detail`` (Output with the token view of the selected step pair), ``widget`` (the
    whole layout).
    """

    def __init__(self, result: Any, *, model: Any = None, trace: Any = None):
        import ipywidgets as w
        import plotly.graph_objects as go

        if model is not None and trace is None or trace is not None and model is None:
            raise StepSalError("pass both model= and trace= to drill down to tokens, or neither")
        self.result, self.model, self.trace = result, model, trace
        self._tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        layers = list(result.layers)
        self.layer = w.IntSlider(value=0, min=0, max=len(layers) - 1,
                                 description="layer", readout=False, continuous_update=False)
        self.layer_label = w.Label(f"layer {layers[0]}")
        self.head = w.Dropdown(options=[("mean", -1)] + [(f"head {h}", h) for h in
                                                         range(result.maps.shape[1])],
                               value=-1, description="head")
        self.scale = w.ToggleButtons(options=list(SCALES), value="row-normalised")
        texts = [s.text for s in result.steps]
        custom = [[[_short(texts[i]), _short(texts[j])] for j in range(len(texts))]
                  for i in range(len(texts))]
        self.heatmap = go.FigureWidget(go.Heatmap(
            z=self._z(), customdata=custom, colorscale="Magma",
            hovertemplate=("query step %{y}: %{customdata[0]}<br>key step %{x}: "
                           "%{customdata[1]}<br>value %{z:.4g}<extra></extra>")))
        self.heatmap.update_layout(
            width=560, height=520, margin=dict(l=50, r=20, t=40, b=40),
            xaxis=dict(title="key step", constrain="domain"),
            yaxis=dict(title="query step", autorange="reversed", scaleanchor="x"),
            shapes=self._boundaries(), title=dict(text=self._title()))
        self.heatmap.data[0].on_click(self._on_click)
        self.curves = go.FigureWidget()
        metrics = result.metrics() if hasattr(result, "metrics") else None
        for name in ("lock_in", "thinking_share"):
            if metrics is not None and name in metrics:
                self.curves.add_scatter(x=layers, y=metrics[name].tolist(), name=name,
                                        mode="lines+markers")
        self.curves.update_layout(width=420, height=320, margin=dict(l=40, r=10, t=40, b=40),
                                  title=dict(text="per-layer metrics"),
                                  xaxis=dict(title="layer"), shapes=[self._marker()])
        self.detail = w.Output()
        self.detail.append_stdout("click a cell to see that step pair's tokens\n"
                                  if model is not None else
                                  "pass model= and trace= to drill down to tokens\n")
        for control in (self.layer, self.head, self.scale):
            control.observe(self._redraw, names="value")
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

    def _boundaries(self) -> list[dict[str, Any]]:
        shapes = []
        for seg, a, b in segment_boundaries(self.result.segments):
            shapes.append(dict(type="rect", x0=a - 0.5, x1=b - 0.5, y0=a - 0.5, y1=b - 0.5,
                               line=dict(color=_SEG_COLOR.get(seg, "#888"), width=2)))
        return shapes

    def _marker(self) -> dict[str, Any]:
        x = self.result.layers[self.layer.value]
        return dict(type="line", x0=x, x1=x, y0=0, y1=1, yref="paper",
                    line=dict(color="#888", dash="dot"))

    def _redraw(self, _change=None) -> None:
        self.layer_label.value = f"layer {self.result.layers[self.layer.value]}"
        with self.heatmap.batch_update():
            self.heatmap.data[0].z = self._z()
            self.heatmap.layout.title.text = self._title()
        self.curves.layout.shapes = [self._marker()]

    # ---- drilling down ----------------------------------------------------------------------
    def _on_click(self, trace, points, state) -> None:
        if points.point_inds:
            i, j = points.point_inds[0]
            self.select_cell(int(i), int(j))

    def token_view(self, query_step: int, key_step: int):
        """A circuitsvis view of one step pair: the key step's tokens coloured by the
        saliency and by the attention they receive from the query step's tokens (mean
        over those tokens); choose the colouring in the view. Its JavaScript is inlined
        (no CDN), so it renders offline."""
        import circuitsvis as cv
        from IPython.display import HTML

        if self.model is None:
            raise StepSalError("this explorer has no model; explore(result, model=..., "
                               "trace=...) to drill down to tokens")
        n = len(self.result.steps)
        if not (0 <= query_step < n and 0 <= key_step < n):
            raise StepSalError(f"steps must be in [0, {n}); got ({query_step}, {key_step})")
        from stepsal_lens.saliency import token_saliency

        layer, head, _ = self._current()
        real_layer = self.result.layers[layer]
        if real_layer not in self._tokens:
            self._tokens[real_layer] = token_saliency(self.model, self.trace, real_layer,
                                                      target=self.result.meta.get("target", "lm"))
        sal, att = self._tokens[real_layer]
        pick = (lambda x: x.mean(0)) if head is None else (lambda x: x[head])
        qa, qb = self.trace.steps[query_step].token_span
        ka, kb = self.trace.steps[key_step].token_span
        tokens = self.trace.str_tokens()[ka:kb]
        values = torch.stack([pick(sal)[qa:qb, ka:kb].mean(0), pick(att)[qa:qb, ka:kb].mean(0)], -1)
        view = cv.tokens.colored_tokens_multi(tokens=tokens, values=values,
                                              labels=["saliency", "attention"])
        return HTML(view.local_src)

    def select_cell(self, query_step: int, key_step: int) -> None:
        """Show the token view of one step pair in :attr:`detail`."""
        from IPython.display import HTML

        steps = self.result.steps
        n = len(steps)
        if not (0 <= query_step < n and 0 <= key_step < n):
            raise StepSalError(f"steps must be in [0, {n}); got ({query_step}, {key_step})")
        views = [HTML(f"<b>query step {query_step}</b> ({steps[query_step].segment}): "
                      f"{_short(steps[query_step].text, 300)}<br><b>key step {key_step}</b>"
                      f" ({steps[key_step].segment}): {_short(steps[key_step].text, 300)}")]
        if self.model is not None:
            views += [HTML("<p>saliency and attention each key token receives from the query "
                           "step (pick one in the view)</p>"),
                      self.token_view(query_step, key_step)]
        self.detail.outputs = ()
        for view in views:
            self.detail.append_display_data(view)

    # ---- display ----------------------------------------------------------------------------
    def static_png(self) -> bytes:
        """The current map as a PNG (what an exported notebook shows)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.6, 4.0), constrained_layout=True)
        im = ax.imshow(self._z(), cmap="magma", interpolation="nearest")
        for _, a, _b in segment_boundaries(self.result.segments)[1:]:
            ax.axhline(a - 0.5, color="cyan", lw=0.8)
            ax.axvline(a - 0.5, color="cyan", lw=0.8)
        ax.set_title(self._title())
        ax.set_xlabel("key step")
        ax.set_ylabel("query step")
        fig.colorbar(im, ax=ax, shrink=0.8)
        return figure_png(fig, dpi=90)

    def _repr_mimebundle_(self, **kwargs):
        return _with_static_image(self.widget, self.static_png(), self._title(), **kwargs)


def explore(result: Any, *, model: Any = None, trace: Any = None) -> StepExplorer:
    """Open a :class:`~stepsal_lens.StepSaliency` in an interactive explorer.

    Parameters
    ----------
    result
        From :func:`~stepsal_lens.step_saliency`.
    model, trace
        The model and trace it came from: enables clicking a cell to see that step
        pair's token-level saliency and attention (circuitsvis).
    """
    return StepExplorer(result, model=model, trace=trace)


# ---- groups of traces ------------------------------------------------------------------------

#: Bins per segment when maps of traces with different step counts are averaged.
BINS = {"question": 1, "thinking": 6, "summary": 2}


def binned_map(result: Any, layer_index: int, bins: dict[str, int] | None = None) -> np.ndarray:
    """A head-mean, row-normalised map resampled to fixed segment-relative bins, so traces
    with different numbers of steps can be averaged: the question is one bin, the
    thinking and summary steps are spread evenly over their bins (``BINS``). Bins no
    step falls in are NaN."""
    bins = dict(BINS if bins is None else bins)
    m = step_map(result, layer_index)
    segs = list(result.segments)
    offsets, index = {}, 0
    for seg in ("question", "thinking", "summary"):
        offsets[seg], index = index, index + bins[seg]
    where = []
    for seg in ("question", "thinking", "summary"):
        members = [i for i, s in enumerate(segs) if s == seg]
        for k, _ in enumerate(members):
            where.append(offsets[seg] + k * bins[seg] // len(members))
    order = [i for seg in ("question", "thinking", "summary")
             for i, s in enumerate(segs) if s == seg]
    bin_of = np.empty(len(segs), dtype=int)
    bin_of[order] = where
    total = np.zeros((index, index))
    count = np.zeros((index, index))
    np.add.at(total, (bin_of[:, None], bin_of[None, :]), m)
    np.add.at(count, (bin_of[:, None], bin_of[None, :]), 1)
    with np.errstate(invalid="ignore"):
        return total / np.where(count == 0, np.nan, count)


def _with_static_image(widget: Any, png: bytes, alt: str, **kwargs: Any):
    """The widget's display data plus a PNG and an ``<img>`` fallback, which an HTML
    export shows when it has no widget state."""
    bundle = widget._repr_mimebundle_(**kwargs)
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    data["image/png"] = base64.b64encode(png).decode()
    data["text/html"] = img_tag(png, alt)
    return bundle


def _show(out, *items) -> None:
    from IPython.display import Image

    out.outputs = ()
    for item in items:
        out.append_display_data(Image(item) if isinstance(item, bytes) else item)


def _pair_png(a: np.ndarray, b: np.ndarray, titles: tuple[str, str, str], suptitle: str,
              edges: Sequence[float] = ()) -> bytes:
    """Two maps on one colour scale and their difference ``b - a`` (or as titled)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5), constrained_layout=True)
    vmax = float(np.nanmax([a, b])) or 1.0
    for ax, m, title in zip(axes[:2], (a, b), titles):
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(title)
    fig.colorbar(im, ax=axes[:2].tolist(), shrink=0.8)
    diff = b - a
    lim = float(np.nanmax(np.abs(diff))) or 1.0
    im = axes[2].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[2].set_title(titles[2])
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    for ax in axes:
        for e in edges:
            ax.axhline(e, color="cyan", lw=0.8)
            ax.axvline(e, color="cyan", lw=0.8)
    fig.suptitle(suptitle)
    return figure_png(fig, dpi=90)


class _Panel:
    """Shared layout: a layer slider redrawing matplotlib views into Output widgets."""

    def __init__(self, n_layers: int, layers: list[int]):
        import ipywidgets as w

        self.layers = layers
        self.layer = w.IntSlider(value=0, min=0, max=n_layers - 1, description="layer",
                                 readout=False, continuous_update=False)
        self.layer_label = w.Label(f"layer {layers[0]}")
        self.maps = w.Output()
        self.curves = w.Output()
        self.layer.observe(lambda _c: self._redraw(), names="value")

    def _redraw(self) -> None:
        self.layer_label.value = f"layer {self.layers[self.layer.value]}"
        _show(self.maps, self.maps_png())

    def _repr_mimebundle_(self, **kwargs):
        return _with_static_image(self.widget, self.maps_png(), "maps", **kwargs)


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

    from stepsal_lens.metrics import layer_metrics

    return pd.concat([layer_metrics(r) for r in results], ignore_index=True)


class GroupComparison(_Panel):
    """Correct vs wrong traces (made by :func:`compare`)."""

    def __init__(self, correct: Any, wrong: Any, *, bins: dict[str, int] | None = None):
        import ipywidgets as w

        from stepsal_lens.report import plot_condition_curves

        self.correct = _check_group(correct, "correct_results")
        self.wrong = _check_group(wrong, "wrong_results")
        if list(self.correct[0].layers) != list(self.wrong[0].layers):
            raise StepSalError("the two groups cover different layers")
        self.bins = dict(BINS if bins is None else bins)
        super().__init__(len(self.correct[0].layers), list(self.correct[0].layers))
        self.metrics = {"correct": _group_metrics(self.correct),
                        "wrong": _group_metrics(self.wrong)}
        _show(self.curves, figure_png(plot_condition_curves(self.metrics), dpi=90))
        self._redraw()
        self.widget = w.VBox([w.HBox([self.layer, self.layer_label]), self.maps, self.curves])

    def group_map(self, group: str) -> np.ndarray:
        """Mean binned map of one group (``"correct"`` or ``"wrong"``) at the current layer."""
        results = self.correct if group == "correct" else self.wrong
        stack = np.stack([binned_map(r, self.layer.value, self.bins) for r in results])
        with warnings.catch_warnings():  # a bin empty in every trace stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(stack, axis=0)

    def maps_png(self) -> bytes:
        edges = (self.bins["question"] - 0.5, self.bins["question"] + self.bins["thinking"] - 0.5)
        return _pair_png(self.group_map("wrong"), self.group_map("correct"),
                         (f"wrong (n={len(self.wrong)})", f"correct (n={len(self.correct)})",
                          "correct - wrong"),
                         f"layer {self.layers[self.layer.value]}: head-mean, row-normalised, "
                         f"binned (Q | thinking | summary)", edges)


def compare(correct_results: Any, wrong_results: Any, *,
            bins: dict[str, int] | None = None) -> GroupComparison:
    """Group-mean maps of correct and wrong traces side by side (with their difference)
    and the per-layer lock-in / thinking-share curves with 95% bands. Maps of traces
    with different step counts are averaged on segment-relative bins
    (:func:`binned_map`)."""
    return GroupComparison(correct_results, wrong_results, bins=bins)


class StepFlowComparison(_Panel):
    """One question with and without StepFlow (made by :func:`compare_stepflow`)."""

    def __init__(self, off: Any, on: Any, *, text_off: str | None = None,
                 text_on: str | None = None):
        import ipywidgets as w
        import pandas as pd

        from stepsal_lens.metrics import layer_metrics

        if list(off.layers) != list(on.layers):
            raise StepSalError("the two results cover different layers")
        self.off, self.on = off, on
        super().__init__(len(off.layers), list(off.layers))
        m_off, m_on = layer_metrics(off), layer_metrics(on)
        cols = [c for c in ("lock_in", "context_share", "thinking_share") if c in m_off]
        table = pd.DataFrame({"layer": m_off["layer"]})
        for c in cols:
            table[f"{c} off"], table[f"{c} on"] = m_off[c], m_on[c]
        self.table = table
        self.texts = w.HTML(
            "<div style='display:flex;gap:1em'>" + "".join(
                f"<div style='flex:1'><b>{label}</b><pre style='white-space:pre-wrap'>"
                f"{html.escape(t or '')}</pre></div>"
                for label, t in (("StepFlow off", text_off or off.meta.get("text", "")),
                                 ("StepFlow on", text_on or on.meta.get("text", "")))) + "</div>")
        _show(self.curves, w.HTML(table.round(4).to_html(index=False)))
        self._redraw()
        self.widget = w.VBox([w.HBox([self.layer, self.layer_label]), self.maps, self.curves,
                              self.texts])

    def maps_png(self) -> bytes:
        i = self.layer.value
        same = [s.text for s in self.off.steps] == [s.text for s in self.on.steps]
        off, on = ((step_map(self.off, i), step_map(self.on, i)) if same
                   else (binned_map(self.off, i), binned_map(self.on, i)))
        return _pair_png(off, on, ("StepFlow off", "StepFlow on", "on - off"),
                         f"layer {self.layers[i]}: head-mean, row-normalised"
                         + ("" if same else " (different texts: binned)"))


def compare_stepflow(off: Any, on: Any, *, text_off: str | None = None,
                     text_on: str | None = None) -> StepFlowComparison:
    """The same question (or the same trace teacher-forced) without and with StepFlow:
    maps side by side with their difference, per-layer metrics, and the two texts
    (escaped). ``off`` / ``on`` are :class:`~stepsal_lens.StepSaliency` results."""
    return StepFlowComparison(off, on, text_off=text_off, text_on=text_on)
