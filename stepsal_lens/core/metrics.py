"""Shallow Lock-in and Deep Decay metrics, block metrics, and correct-vs-wrong statistics.

All metrics read the head-mean step map of each layer; the share metrics use its
row-normalised form ``Mn[i, j] = M[i, j] / sum_j M[i, j]`` ("where step i draws its
information from"). Definitions (docs/concepts.md):

- ``lock_in[l]``: mean over thinking rows from the second thinking step on of ``Mn[l,i,i]``.
- ``context_share[l]``: mean over the same rows of ``sum_{j<i} Mn[l,i,j]``.
- ``thinking_share[l]``: mean over summary rows of ``sum_{j in thinking} Mn[l,i,j]``.
- ``summary_self_share[l]``: mean over summary rows of ``sum_{j in summary} Mn[l,i,j]``.
- ``last_k_share[l]``: mean over summary rows of the share on the last ``k`` thinking steps.
- ``final_block_intensity[l]`` / ``analysis_block_intensity[l]``: mean of the summary x
  summary / thinking x thinking block of the head-mean map; ``final_heat_anomaly`` is
  their ratio.
- ``decay``: least-squares slope of ``thinking_share`` over the deepest half of the layers.

Rows with no saliency at all (every entry exactly 0, e.g. steps after the last token of
an ``answer`` target) carry no shares: they are left out of the row means, and a metric
with no row left is NaN. NaN in a map propagates to every metric that reads it; nothing
here turns NaN into a number.

Examples
--------
>>> import torch
>>> from stepsal_lens.core.metrics import layer_metrics
>>> segments = ["question", "thinking", "thinking", "summary"]
>>> maps = torch.eye(4).expand(3, 1, 4, 4)  # [layer, head, step, step]: pure lock-in
>>> layer_metrics(maps, segments)["lock_in"].tolist()
[1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.typing import LayerStepMap
from stepsal_lens._checks import check_type

__all__ = [
    "METRICS",
    "block_metrics",
    "compare",
    "decay",
    "layer_metrics",
    "normalize_rows",
    "trace_metrics",
]

#: Per-layer metric columns of :func:`layer_metrics`.
METRICS = ("lock_in", "context_share", "thinking_share", "summary_self_share", "last_k_share",
           "final_block_intensity", "analysis_block_intensity", "final_heat_anomaly")


def normalize_rows(maps: LayerStepMap) -> LayerStepMap:
    """Divide each row by its sum: ``Mn[i, j] = M[i, j] / sum_j M[i, j]``.

    An all-zero row (no saliency) stays zero; a row holding NaN or inf comes out NaN.

    >>> normalize_rows(torch.tensor([[[1.0, 3.0], [0.0, 0.0]],
    ...                              [[float("nan"), 1.0], [2.0, 2.0]]])).tolist()
    [[[0.25, 0.75], [0.0, 0.0]], [[nan, nan], [0.5, 0.5]]]
    """
    total = maps.sum(-1, keepdim=True)
    return torch.where(total == 0, torch.zeros_like(maps), maps / total)


def _unpack(result: Any, segments: Sequence[str] | None):
    """(head-mean maps [layer, step, step] float64, segments, layer ids)."""
    if isinstance(result, Tensor):
        if segments is None:
            raise StepSalError("pass segments=[...] (one per step) with a raw maps tensor")
        maps, layers = result, list(range(result.shape[0]))
    else:
        maps, layers = result.maps, list(result.layers)
        segments = result.segments if segments is None else segments
    if maps.dim() == 4:
        maps = maps.mean(1)
    if maps.dim() != 3 or maps.shape[-1] != maps.shape[-2] or maps.shape[-1] != len(segments):
        raise StepSalError(f"maps must be [layer, (head,) step, step] with one segment per "
                           f"step; got shape {tuple(maps.shape)} and {len(segments)} segments")
    return maps.double(), list(segments), layers


def _mean_rows(values: Tensor, rows: list[int], empty: Tensor) -> Tensor:
    """Per layer, the mean of ``values[:, rows]`` over the rows that are not ``empty``
    (``[layer, step]``: all-zero rows); NaN where no row is left. NaN values propagate."""
    nan = torch.full(values.shape[:1], float("nan"), dtype=values.dtype)
    if not rows:
        return nan
    keep = ~empty[:, rows]
    n = keep.sum(1)
    total = torch.where(keep, values[:, rows], torch.zeros_like(values[:, rows])).sum(1)
    return torch.where(n > 0, total / n.clamp_min(1), nan)


def layer_metrics(result: Any, segments: Sequence[str] | None = None, *, k: int = 3):
    """Per-layer failure-mode metrics of one trace.

    Parameters
    ----------
    result
        A :class:`~stepsal_lens.StepSaliency`, or a maps tensor ``[layer, head, step,
        step]`` / ``[layer, step, step]`` together with ``segments``.
    segments
        Segment name of each step (taken from ``result`` when it is a StepSaliency).
    k
        Number of last thinking steps for ``last_k_share``.

    Returns
    -------
    pandas.DataFrame
        One row per layer, a column per metric in :data:`METRICS`. NaN where a segment
        needed by the metric is missing (e.g. no summary), where all its rows are
        all-zero (left out of the means), or where the maps hold NaN.
    """
    if not hasattr(result, "maps") and not isinstance(result, (torch.Tensor, np.ndarray)):
        check_type(result, torch.Tensor, "result", "a StepSaliency (from step_saliency) or a "
                   "maps tensor [layer, head, step, step] with segments=")
    import pandas as pd

    maps, segments, layers = _unpack(result, segments)
    norm = normalize_rows(maps)
    empty = maps.sum(-1) == 0  # [layer, step]: rows without any saliency
    seg = np.array(segments)
    thinking = np.flatnonzero(seg == "thinking").tolist()
    summary = np.flatnonzero(seg == "summary").tolist()
    rows = thinking[1:]
    diag = torch.diagonal(norm, dim1=-2, dim2=-1)
    earlier = torch.tril(norm, diagonal=-1).sum(-1)
    col = {
        "lock_in": _mean_rows(diag, rows, empty),
        "context_share": _mean_rows(earlier, rows, empty),
        "thinking_share": _mean_rows(norm[:, :, thinking].sum(-1), summary, empty),
        "summary_self_share": _mean_rows(norm[:, :, summary].sum(-1), summary, empty),
        "last_k_share": _mean_rows(norm[:, :, thinking[-k:]].sum(-1), summary, empty)
        if thinking else _mean_rows(diag, [], empty),
    }
    col.update(block_metrics(maps, segments))
    df = pd.DataFrame({name: v.numpy() for name, v in col.items()})
    df.insert(0, "layer", layers)
    return df


def block_metrics(maps: Float[Tensor, "layer step step"],
                  segments: Sequence[str]) -> dict[str, Tensor]:
    """The paper code's block metrics per layer from head-mean maps ``[layer, step, step]``."""
    seg = np.array(segments)
    t = torch.from_numpy(np.flatnonzero(seg == "thinking"))
    s = torch.from_numpy(np.flatnonzero(seg == "summary"))
    nan = torch.full(maps.shape[:1], float("nan"), dtype=maps.dtype)
    final = maps[:, s][:, :, s].mean((1, 2)) if len(s) else nan
    analysis = maps[:, t][:, :, t].mean((1, 2)) if len(t) else nan
    return {"final_block_intensity": final, "analysis_block_intensity": analysis,
            "final_heat_anomaly": torch.where(analysis == 0, nan, final / analysis)}


def decay(thinking_share: Sequence[float] | np.ndarray) -> float:
    """Least-squares slope of ``thinking_share`` over the deepest half of the layers
    (negative = the summary loses the thinking with depth); NaN when any of those layers
    is NaN (a missing value is never skipped over).

    >>> round(decay([0.9, 0.8, 0.6, 0.4]), 6)
    -0.2
    """
    from scipy import stats

    y = np.asarray(thinking_share, dtype=float)
    x = np.arange(len(y))[len(y) // 2:]
    y = y[len(y) // 2:]
    if len(y) < 2 or not np.isfinite(y).all():
        return float("nan")
    return float(stats.linregress(x, y).slope)


def trace_metrics(result: Any, segments: Sequence[str] | None = None, *, k: int = 3) -> dict:
    """Per-layer metrics as lists plus the scalar ``decay`` (the ``metrics.json`` document)."""
    df = layer_metrics(result, segments, k=k)
    doc: dict[str, Any] = {"layer": df["layer"].tolist()}
    for name in METRICS:
        doc[name] = [None if np.isnan(v) else float(v) for v in df[name]]
    d = decay(df["thinking_share"].to_numpy())
    doc["decay"] = None if np.isnan(d) else d
    doc["k"] = k
    return doc


def compare(correct: Sequence[Any], wrong: Sequence[Any], *, metrics: Sequence[str] = METRICS,
            k: int = 3):
    """Per-layer comparison of two groups of traces (e.g. correct vs wrong).

    Parameters
    ----------
    correct, wrong
        StepSaliency results (or per-layer metric DataFrames from :func:`layer_metrics`).
    metrics
        Metric names to compare.

    Returns
    -------
    pandas.DataFrame
        One row per (metric, layer): ``mean_correct``, ``mean_wrong``, ``diff``
        (correct - wrong), ``t`` and ``p`` of Welch's t-test, Cohen's ``d`` (pooled SD),
        ``n_correct``, ``n_wrong``. NaN values (e.g. traces without a summary) are left
        out per metric.
    """
    import pandas as pd
    from scipy import stats

    if len(correct) < 2 or len(wrong) < 2:
        raise StepSalError(f"compare needs at least 2 traces per group; got {len(correct)} "
                           f"correct and {len(wrong)} wrong")
    frames = [[r if isinstance(r, pd.DataFrame) else layer_metrics(r, k=k) for r in group]
              for group in (correct, wrong)]
    rows = []
    for name in metrics:
        a = np.stack([f[name].to_numpy() for f in frames[0]])  # [trace, layer]
        b = np.stack([f[name].to_numpy() for f in frames[1]])
        for i, layer in enumerate(frames[0][0]["layer"]):
            x, y = a[:, i][~np.isnan(a[:, i])], b[:, i][~np.isnan(b[:, i])]
            if len(x) >= 2 and len(y) >= 2:
                test = stats.ttest_ind(x, y, equal_var=False)
                t, p = float(test.statistic), float(test.pvalue)
                pooled = np.sqrt(((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1))
                                 / (len(x) + len(y) - 2))
                d = (x.mean() - y.mean()) / pooled if pooled > 0 else float("nan")
            else:
                t = p = d = float("nan")
            rows.append({"metric": name, "layer": int(layer),
                         "mean_correct": x.mean() if len(x) else float("nan"),
                         "mean_wrong": y.mean() if len(y) else float("nan"),
                         "diff": (x.mean() - y.mean()) if len(x) and len(y) else float("nan"),
                         "t": t, "p": p, "d": d, "n_correct": len(x), "n_wrong": len(y)})
    return pd.DataFrame(rows)
