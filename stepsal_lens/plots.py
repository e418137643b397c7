"""Static matplotlib views of step maps (used by the command line and reports).

Examples
--------
>>> import torch
>>> from stepsal_lens.plots import plot_step_maps
>>> fig = plot_step_maps(torch.rand(4, 5, 5), ["question"] + ["thinking"] * 3 + ["summary"])
>>> len(fig.axes)  # 4 maps + a colour bar
5
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["figure_png", "img_tag", "plot_step_maps", "segment_boundaries"]

_SEG_LETTER = {"question": "Q", "thinking": "T", "summary": "S"}


def figure_png(fig: Any, *, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    """A self-contained ``<img>`` tag (PNG inlined as base64, ``alt`` escaped)."""
    return (f'<img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')


def segment_boundaries(segments: Sequence[str]) -> list[tuple[str, int, int]]:
    """Runs of equal segments as ``(name, first_step, last_step_exclusive)``."""
    runs: list[tuple[str, int, int]] = []
    for i, seg in enumerate(segments):
        if runs and runs[-1][0] == seg:
            runs[-1] = (seg, runs[-1][1], i + 1)
        else:
            runs.append((seg, i, i + 1))
    return runs


def plot_step_maps(maps: Float[Tensor, "layer step step"], segments: Sequence[str], *,
                   layers: Sequence[int] | None = None, n_panels: int = 4,
                   normalize: bool = True, title: str | None = None) -> Any:
    """Head-mean step maps of a few layers, shallow to deep, with Q/T/S boundaries.

    Parameters
    ----------
    maps
        ``[layer, step, step]`` head-mean maps.
    segments
        Segment of each step.
    layers
        Layer labels of ``maps``' rows (default ``0..L-1``).
    n_panels
        Number of layers shown, evenly spaced from the first to the last.
    normalize
        Show row-normalised maps (where each step draws from).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from stepsal_lens.metrics import normalize_rows

    n_layers = maps.shape[0]
    layers = list(range(n_layers)) if layers is None else list(layers)
    picks = sorted(set(np.linspace(0, n_layers - 1, min(n_panels, n_layers)).round().astype(int)))
    data = normalize_rows(maps.double()) if normalize else maps.double()
    vmax = float(data[picks].max()) or 1.0
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks) + 0.8, 3.4),
                             squeeze=False, constrained_layout=True)
    runs = segment_boundaries(segments)
    for ax, i in zip(axes[0], picks):
        im = ax.imshow(data[i].numpy(), cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        for _, a, b in runs[1:]:
            ax.axhline(a - 0.5, color="cyan", lw=0.8)
            ax.axvline(a - 0.5, color="cyan", lw=0.8)
        ticks = [(a + b - 1) / 2 for _, a, b in runs]
        labels = [_SEG_LETTER.get(s, s[:1].upper()) for s, _, _ in runs]
        ax.set_xticks(ticks, labels)
        ax.set_yticks(ticks, labels)
        ax.set_title(f"layer {layers[i]}")
        ax.set_xlabel("key step")
    axes[0][0].set_ylabel("query step")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8,
                 label="row-normalised saliency" if normalize else "saliency")
    if title:
        fig.suptitle(title)
    return fig
