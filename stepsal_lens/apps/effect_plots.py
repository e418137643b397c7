"""Figures of a :class:`~stepsal_lens.StepEffects` (what ``StepEffects.plot`` draws) and the
effect map the causal explorer shows. Nothing here imports the causal tools themselves,
so the result object can call it.

Examples
--------
>>> from stepsal_lens.apps.effect_plots import effect_map
>>> effect_map.__name__
'effect_map'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from stepsal_lens.apps.plots import new_figure, segment_boundaries
from stepsal_lens.core.metrics import normalize_rows

if TYPE_CHECKING:
    from stepsal_lens.results.effects import StepEffects

__all__ = ["effect_map", "plot_effects"]


def plot_effects(effects: StepEffects, *, layers: Sequence[int] | None = None,
                 title: str | None = None, log: bool = True):
    """The effect matrix (and per-layer matrices, if computed) with Q/T/S boundaries.

    ``log`` shows ``log10`` of the effects (zeros at the floor), which spreads out KL
    values spanning orders of magnitude.
    """
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
