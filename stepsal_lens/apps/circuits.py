"""Figures, explorers and the demo report's section for the causal tools.

Examples
--------
>>> from stepsal_lens.apps.circuits import effect_map
>>> effect_map.__name__
'effect_map'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsal_lens.core.causal import correlation_summary, saliency_effect_correlation
from stepsal_lens.apps.escape import esc
from stepsal_lens.errors import StepSalError
from stepsal_lens.lens.causal import step_effects
from stepsal_lens.results.effects import StepEffects
from stepsal_lens.segments.trace import Trace

__all__ = ["causal_explorer", "causality_section", "demo_causality", "effect_map", "plot_effects"]


def plot_effects(effects: StepEffects, *, layers: Sequence[int] | None = None,
                 title: str | None = None, log: bool = True):
    """The effect matrix (and per-layer matrices, if computed) with Q/T/S boundaries.

    ``log`` shows ``log10`` of the effects (zeros at the floor), which spreads out KL
    values spanning orders of magnitude.
    """
    from stepsal_lens.apps.plots import new_figure

    from stepsal_lens.apps.plots import segment_boundaries

    panels = [("cut in all layers", effects.effects)]
    if effects.per_layer is not None:
        pick = effects.layers if layers is None else list(layers)
        panels += [(f"cut in layer {l} only", effects.layer_map(l)) for l in pick]
    data = [m.double() for _, m in panels]
    n = effects.n_steps
    below = torch.tril(torch.ones(n, n, dtype=torch.bool), -1)
    if log:
        pos = torch.cat([d[below & (d > 0)] for d in data])
        floor = float(pos.min()) if len(pos) else 1e-12
        data = [torch.log10(d.clamp_min(floor)).masked_fill(~below, float("nan")) for d in data]
    vmin = float(np.nanmin([np.nanmin(d.numpy()) for d in data])) if n > 1 else 0
    vmax = float(np.nanmax([np.nanmax(d.numpy()) for d in data])) if n > 1 else 1
    fig = new_figure(3.4 * len(panels) + 0.8, 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)
    runs = segment_boundaries(effects.segments)
    letters = {"question": "Q", "thinking": "T", "summary": "S"}
    for ax, (name, _), d in zip(axes[0], panels, data):
        im = ax.imshow(d.numpy(), cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        for _, a, _b in runs[1:]:
            ax.axhline(a - 0.5, color="cyan", lw=0.8)
            ax.axvline(a - 0.5, color="cyan", lw=0.8)
        ticks = [(a + b - 1) / 2 for _, a, b in runs]
        ax.set_xticks(ticks, [letters.get(s, s[:1]) for s, _, _ in runs])
        ax.set_yticks(ticks, [letters.get(s, s[:1]) for s, _, _ in runs])
        ax.set_title(name)
        ax.set_xlabel("key step (cut)")
    axes[0][0].set_ylabel("query step")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8,
                 label="log10 KL (nats)" if log else "KL (nats)")
    if title:
        fig.suptitle(title)
    return fig


def effect_map(effects: StepEffects, layer: int | None = None, scale: str = "row-normalised"
               ) -> np.ndarray:
    """The ``[step, step]`` effect map the explorer shows: the cut in ``layer`` alone
    (when per-layer effects exist for it) or in all layers, on the explorer's scales."""
    from stepsal_lens.core.metrics import normalize_rows

    m = effects.effects
    if layer is not None and effects.per_layer is not None and layer in effects.layers:
        m = effects.layer_map(layer)
    m = m.double()
    if scale == "row-normalised":
        m = normalize_rows(m)
    elif scale == "log":
        positive = m[m > 0]
        m = torch.log10(m.clamp_min(float(positive.min()) if len(positive) else 1e-12))
    return m.numpy()


def causal_explorer(result: Any, effects: StepEffects, *, model: Any = None,
                    trace: Any = None):
    """The Step-Saliency explorer with a "saliency | causal effect" toggle on the map.

    In causal mode the map is :func:`effect_map` for the slider's layer (the cut in that
    layer alone when ``effects`` has ``per_layer``, else in all layers). Also reached
    as ``explore(result, effects=effects)``.
    """
    from stepsal_lens.apps.widgets import StepExplorer

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
            self.source.observe(self._redraw, names="value")
            self.widget = w.VBox([self.source, *self.widget.children])

        def _z(self):
            if getattr(self, "source", None) is None or self.source.value == "saliency":
                return super()._z()
            layer, _head, scale = self._current()
            return effect_map(self.effects, self.result.layers[layer], scale)

        def _title(self):
            if getattr(self, "source", None) is None or self.source.value == "saliency":
                return super()._title()
            layer, _head, scale = self._current()
            real = self.result.layers[layer]
            where = (f"cut in layer {real}" if self.effects.per_layer is not None
                     and real in self.effects.layers else "cut in all layers")
            return f"causal effect ({where}), {scale}"

    return CausalExplorer()


def demo_causality(model: Any, saliencies: Sequence[Any], *, limit: int = 8) -> dict | None:
    """Effects of the first ``limit`` traces (with at least 3 steps) and their Spearman
    correlation with Step-Saliency per layer: ``{"per_trace", "summary"}`` DataFrames."""
    picked = [s for s in saliencies if s.n_steps >= 3][:limit]
    if not picked:
        return None
    effects = []
    for sal in picked:
        trace = Trace.from_token_ids(sal.token_ids, model)
        if [s.token_span for s in trace.steps] != [s.token_span for s in sal.steps]:
            raise StepSalError("the saliency's steps do not match its re-built trace")
        effects.append(step_effects(model, trace))
    per_trace = saliency_effect_correlation(picked, effects)
    per_trace["index"] = [picked[t].meta.get("index", t) for t in per_trace.trace]
    return {"per_trace": per_trace, "summary": correlation_summary(per_trace)}


def causality_section(causal: dict, out: Path) -> str:
    """The demo report's "Saliency vs causality" section (HTML), with its figure."""
    
    from stepsal_lens.apps.plots import new_figure

    from stepsal_lens.apps.plots import figure_png, img_tag

    per, summ = causal["per_trace"], causal["summary"]
    fig = new_figure(5, 3.2)
    ax = fig.subplots()
    for layer, grp in per.groupby("layer"):
        ax.scatter([layer] * len(grp), grp.rho, color="tab:gray", s=12)
    ax.errorbar(summ.layer, summ.mean_rho, yerr=summ.std_rho, color="tab:blue", marker="o",
                capsize=3, label="mean ± sd over traces")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("Spearman rho")
    ax.set_title("head-mean saliency vs effect matrix")
    ax.legend()
    png = figure_png(fig)
    (Path(out) / "causal_spearman.png").write_bytes(png)
    rows = "".join(
        f"<tr><td>{int(r.layer)}</td><td>{int(r.n)}</td><td>{r.mean_rho:.3f}</td>"
        f"<td>{r.std_rho:.3f}</td><td>{r.min_rho:.3f}</td><td>{r.max_rho:.3f}</td>"
        f"<td>{r.p_ttest:.3g}</td></tr>" for r in summ.itertuples())
    return ("<h2>Saliency vs causality</h2><p>On " + esc(str(per.trace.nunique()))
            + " traces: the causal effect of cutting each step off the later ones (mean KL of "
            "the next-token distributions, <code>step_effects</code>) against the head-mean "
            "Step-Saliency map, Spearman's rho over the lower triangle, per layer; t-test of "
            "mean rho = 0 over traces.</p><table><tr><th>layer</th><th>traces</th>"
            "<th>mean rho</th><th>sd</th><th>min</th><th>max</th><th>p</th></tr>" + rows
            + "</table>" + img_tag(png, "saliency vs causality"))
