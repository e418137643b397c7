"""Static views of step maps: matplotlib figures and small HTML pieces.

Every figure is made with matplotlib's object-oriented API (:class:`Figure`, never
``pyplot``), so nothing here changes the process's matplotlib backend: a notebook's inline
figures and the user's own ``plt.plot`` keep working. A :class:`Figure` shows itself in a
notebook as a PNG (``_repr_png_``), with or without pyplot's inline integration.

Examples
--------
>>> import torch
>>> from stepsal_lens.apps.plots import plot_step_maps
>>> fig = plot_step_maps(torch.rand(4, 5, 5), ["question"] + ["thinking"] * 3 + ["summary"])
>>> len(fig.axes)  # 4 maps + a colour bar
5
>>> fig._repr_png_()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import matplotlib.figure
import numpy as np
from jaxtyping import Float
from torch import Tensor

from stepsal_lens.apps.escape import esc

__all__ = ["SEGMENT_COLORS", "Figure", "draw_step_map", "figure_png", "img_tag",
           "map_colors", "plot_map_pair", "plot_step_maps", "segment_boundaries",
           "segment_ticks", "token_html"]

#: One colour per segment, used by every map's boxes, legends and token views.
SEGMENT_COLORS = {"question": "#1f77b4", "thinking": "#2ca02c", "summary": "#d62728"}
_SEG_LETTER = {"question": "Q", "thinking": "T", "summary": "S"}


class Figure(matplotlib.figure.Figure):
    """A matplotlib figure that needs no pyplot: it renders with Agg on its own canvas
    and shows itself in a notebook as a PNG."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=90)
        return buf.getvalue()


def new_figure(width: float | int, height: float | int) -> Figure:
    """An empty :class:`Figure` with constrained layout (pyplot is never involved)."""
    return Figure(figsize=(width, height), layout="constrained")


def figure_png(fig: Any, *, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def img_tag(png: bytes, alt: str, *, css_class: str | None = None) -> str:
    """A self-contained ``<img>`` tag (PNG inlined as base64, ``alt`` escaped)."""
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return (f'<img alt="{esc(alt)}"{cls} '
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


def segment_ticks(segments: Sequence[str]) -> list[str]:
    """One tick label per step: its segment letter and index (``Q0``, ``T1``, ``S9``)."""
    return [f"{_SEG_LETTER.get(s, s[:1].upper())}{i}" for i, s in enumerate(segments)]


def map_colors(values: np.ndarray, *, vmin: float, vmax: float,
               cmap: str = "magma") -> list[list[str | None]]:
    """Hex colours of a map's cells on ``cmap`` (``None`` where the value is NaN), so the
    live view and the static PNG use the same colours."""
    import matplotlib

    scale = matplotlib.colormaps[cmap]
    span = (vmax - vmin) or 1.0
    out: list[list[str | None]] = []
    for row in np.asarray(values, dtype=float):
        out.append([None if np.isnan(v) else matplotlib.colors.to_hex(
            scale(float(np.clip((v - vmin) / span, 0, 1)))) for v in row])
    return out


def _segment_legend(ax: Any, segments: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    present = [s for s in SEGMENT_COLORS if s in set(segments)]
    ax.legend(handles=[Patch(facecolor="none", edgecolor=SEGMENT_COLORS[s], lw=2, label=s)
                       for s in present], loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=len(present), frameon=False, fontsize=8, handlelength=1.2)


def draw_step_map(ax: Any, m: np.ndarray, segments: Sequence[str], *, vmin: float | None = None,
                  vmax: float | None = None, cmap: str = "magma", title: str = "",
                  tick_labels: Sequence[str] | None = None, legend: bool = True,
                  unit: str = "step") -> Any:
    """Draw one ``[step, step]`` map on ``ax``: query steps down, key steps across, a box
    per segment (coloured as in :data:`SEGMENT_COLORS`, with a legend), one tick per step
    (``tick_labels``, default ``Q0 T1 ... S9``). Returns the image for a colour bar."""
    import matplotlib
    from matplotlib.patches import Rectangle

    n = len(segments)
    im = ax.imshow(np.ma.masked_invalid(m), vmin=vmin, vmax=vmax, interpolation="nearest",
                   cmap=matplotlib.colormaps[cmap].with_extremes(bad="#dddddd"))
    for seg, a, b in segment_boundaries(segments):
        ax.add_patch(Rectangle((a - 0.5, a - 0.5), b - a, b - a, fill=False, lw=1.6,
                               edgecolor=SEGMENT_COLORS.get(seg, "#888888")))
    labels = list(segment_ticks(segments) if tick_labels is None else tick_labels)
    step = max(1, int(np.ceil(n / 16)))  # at most ~16 labels per axis
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [labels[t] for t in ticks], fontsize=7, rotation=90)
    ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=7)
    ax.set_xlabel(f"key {unit} (source)")
    ax.set_ylabel(f"query {unit} (reader)")
    if title:
        ax.set_title(title, fontsize=10)
    if legend:
        _segment_legend(ax, segments)
    return im


def plot_step_maps(maps: Float[Tensor, "layer step step"], segments: Sequence[str], *,
                   layers: Sequence[int] | None = None, n_panels: int = 4,
                   normalize: bool = True, title: str | None = None) -> Figure:
    """Head-mean step maps of a few layers, shallow to deep, with Q/T/S boxes.

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
    from stepsal_lens.core.metrics import normalize_rows

    n_layers = maps.shape[0]
    layers = list(range(n_layers)) if layers is None else list(layers)
    picks = sorted(set(np.linspace(0, n_layers - 1, min(n_panels, n_layers)).round().astype(int)))
    data = normalize_rows(maps.double()) if normalize else maps.double()
    vmax = float(data[picks].max()) or 1.0
    fig = new_figure(3.2 * len(picks) + 0.8, 3.9)
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    for k, (ax, i) in enumerate(zip(axes, picks)):
        im = draw_step_map(ax, data[i].numpy(), segments, vmin=0.0, vmax=vmax,
                           title=f"layer {layers[i]}", legend=k == 0)
        if k:
            ax.set_ylabel("")
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8,
                 label="share of the row (row-normalised saliency)" if normalize
                 else "saliency (mean |A·dL/dA|)")
    if title:
        fig.suptitle(title)
    return fig


def plot_map_pair(a: np.ndarray, b: np.ndarray, segments: Sequence[str], *,
                  titles: tuple[str, str, str], suptitle: str,
                  tick_labels: Sequence[str] | None = None, unit: str = "step",
                  colorbar_label: str = "share of the row (row-normalised saliency)") -> Figure:
    """Two maps on one colour scale and their difference ``b - a`` (titled by ``titles``),
    with segment boxes, a legend, a tick per row and labelled colour bars."""
    fig = new_figure(12, 4.3)
    axes = fig.subplots(1, 3)
    finite = np.concatenate([np.ravel(a), np.ravel(b)])
    finite = finite[np.isfinite(finite)]
    vmax = float(finite.max()) if len(finite) else 1.0
    for k, (ax, m, title) in enumerate(zip(axes[:2], (a, b), titles)):
        im = draw_step_map(ax, m, segments, vmin=0.0, vmax=vmax or 1.0, title=title,
                           tick_labels=tick_labels, legend=k == 0, unit=unit)
    fig.colorbar(im, ax=axes[:2].tolist(), shrink=0.8, label=colorbar_label)
    diff = b - a
    lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
    im = draw_step_map(axes[2], diff, segments, vmin=-(lim or 1.0), vmax=lim or 1.0,
                       cmap="RdBu_r", title=titles[2], tick_labels=tick_labels, legend=False,
                       unit=unit)
    fig.colorbar(im, ax=axes[2], shrink=0.8, label=f"difference ({titles[2]})")
    for ax in axes[1:]:
        ax.set_ylabel("")
    fig.suptitle(suptitle)
    return fig


def token_html(tokens: Sequence[str], rows: dict[str, Any], *,
               caption: str = "", colors: Sequence[str] | None = None,
               legend: dict[str, str] | None = None,
               titles: Sequence[str] | None = None) -> str:
    """A self-contained token view (no JavaScript): one line of tokens per row of values
    in ``rows`` (label -> one value in [0, 1] per token), each token shaded by its value
    and titled with it; or, with ``colors``, tokens on fixed background colours (one per
    token) explained by ``legend`` (label -> colour). Every string (tokens, ``caption``,
    labels, titles, colours) is plain text, escaped here with
    :func:`~stepsal_lens.apps.escape.esc`."""
    def chip(text: str, bg: str, title: str) -> str:
        shown = esc(text).replace("\n", "↵")
        return (f"<span title='{esc(title)}' style='background:{esc(bg)};padding:1px 0;"
                f"border-radius:2px;white-space:pre'>{shown}</span>")

    parts = [f"<div style='font-family:monospace;font-size:13px;line-height:1.9'>"]
    if caption:
        parts.append(f"<div style='font-family:sans-serif;margin-bottom:4px'>{esc(caption)}</div>")
    if legend:
        parts.append("<div style='font-family:sans-serif;font-size:12px'>" + " ".join(
            f"<span style='background:{esc(c)};padding:0 6px;border-radius:2px'>"
            f"{esc(label)}</span>" for label, c in legend.items()) + "</div>")
    if colors is not None:
        names = titles if titles is not None else [f"token {i}" for i in range(len(tokens))]
        parts.append("<div>" + "".join(chip(t, c, f"token {i}: {n}") for i, (t, c, n)
                                       in enumerate(zip(tokens, colors, names))) + "</div>")
    for label, values in rows.items():
        chips = "".join(chip(t, f"rgba(214,39,40,{float(np.clip(v, 0, 1)):.3f})",
                             f"{label} {float(v):.3f}") for t, v in zip(tokens, values))
        parts.append(f"<div><b style='font-family:sans-serif;display:inline-block;"
                     f"width:6em'>{esc(label)}</b>{chips}</div>")
    parts.append("</div>")
    return "".join(parts)
