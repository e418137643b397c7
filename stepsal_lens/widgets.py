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
import io
from typing import Any

import numpy as np
import torch

from stepsal_lens.errors import StepSalError
from stepsal_lens.plots import segment_boundaries

__all__ = ["StepExplorer", "explore"]

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
        """circuitsvis views of one step pair: key tokens coloured by the saliency and the
        attention they receive from the query step's tokens (mean over those tokens)."""
        import circuitsvis as cv

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
        sal_keys = pick(sal)[qa:qb, ka:kb].mean(0).tolist()
        att_keys = pick(att)[qa:qb, ka:kb].mean(0).tolist()
        return (cv.tokens.colored_tokens(tokens=tokens, values=sal_keys),
                cv.tokens.colored_tokens(tokens=tokens, values=att_keys))

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
            sal, att = self.token_view(query_step, key_step)
            views += [HTML("<p>saliency each key token receives from the query step</p>"), sal,
                      HTML("<p>attention each key token receives from the query step</p>"), att]
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
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return buf.getvalue()

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        png = self.static_png()
        data["image/png"] = base64.b64encode(png).decode()
        data["text/html"] = (f'<img alt="{html.escape(self._title())}" src="data:image/png;'
                             f'base64,{data["image/png"]}">')
        return bundle


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
