"""The Step-Saliency explorer of one trace (:class:`StepExplorer`, opened by
:func:`~stepsal_lens.apps.widgets.explore`) and what every explorer shares: the anywidget
views and the static PNG twin (:class:`StaticTwin`).


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
>>> from stepsal_lens.apps.step_explorer import SCALES
>>> SCALES
('raw', 'row-normalised', 'log')
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsal_lens.apps.escape import esc
from stepsal_lens.errors import StepSalError
from stepsal_lens.apps.plots import (
    SEGMENT_COLORS,
    draw_step_map,
    figure_png,
    img_tag,
    map_colors,
    new_figure,
    segment_boundaries,
    segment_ticks,
    token_html,
)
from stepsal_lens.typing import Model
from stepsal_lens.core.metrics import normalize_rows
from stepsal_lens.lens.saliency import replay, token_saliency
from stepsal_lens.lens.saliency import trace_tokens as model_trace_tokens

__all__ = ["SCALES", "StaticTwin", "StepExplorer", "step_map", "token_values", "trace_tokens",
           "view_class"]

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


def view_class():
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


class StaticTwin:
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

    def update_static(self) -> None:
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


class StepExplorer(StaticTwin):
    """One trace's Step-Saliency in a notebook (made by :func:`explore`).

    Attributes: ``layer`` (IntSlider, index into ``result.layers``), ``head`` (Dropdown),
    ``scale`` (ToggleButtons), ``heatmap`` and ``curves`` (SVG views whose state is the
    data they draw: ``heatmap.z``, ``heatmap.title``, ...), ``detail`` (Output with the
    token view of the selected step pair), ``widget`` (the whole layout).
    """

    def __init__(self, result: Any, *, model: Model = None, trace: Any = None):
        import ipywidgets as w

        if model is not None and trace is None or trace is not None and model is None:
            raise StepSalError("pass both model= and trace= to drill down to tokens, or neither")
        if model is not None:
            model_trace_tokens(model, trace)  # refuses a model with another tokenizer
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
        view = view_class()
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
            control.observe(self.redraw, names="value")
        self.heatmap.observe(self._on_select, names="selected")
        self.widget = w.VBox([
            w.HBox([self.layer, self.layer_label, self.head]), self.scale,
            w.HBox([self.heatmap, self.curves]), self.detail])

    # ---- drawing --------------------------------------------------------------------------
    def current(self) -> tuple[int, int | None, str]:
        head = self.head.value
        return self.layer.value, (None if head == -1 else head), self.scale.value

    def _z(self) -> np.ndarray:
        return step_map(self.result, *self.current())

    def _title(self) -> str:
        layer, head, scale = self.current()
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

    def redraw(self, _change=None) -> None:
        self.layer_label.value = f"layer {self.result.layers[self.layer.value]}"
        self._draw()
        self.update_static()

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

        layer, head, _ = self.current()
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
        layer, head, _ = self.current()
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
