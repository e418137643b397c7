"""The causal tools' math, pure: KL per position, receiver-head scores, rank correlations.

The model-facing loops live in :mod:`stepsal_lens.lens.causal`; the definitions
(effect matrix, vertical score, receiver kurtosis) in docs/circuits.md.

Examples
--------
>>> import torch
>>> from stepsal_lens.core.causal import lower_triangle_spearman
>>> a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 3.0, 0.0]])
>>> rho, p, n = lower_triangle_spearman(a, 2 * a)
>>> round(rho, 6), n
(1.0, 3)
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from stepsal_lens.errors import StepSalError

__all__ = [
    "correlation_summary",
    "kl_per_position",
    "lower_triangle_spearman",
    "receiver_kurtosis",
    "saliency_effect_correlation",
    "vertical_scores",
]


def kl_per_position(logits_p: Float[Tensor, "pos vocab"],
                    logits_q: Float[Tensor, "pos vocab"]) -> Float[Tensor, " pos"]:
    """``KL(softmax(p) || softmax(q))`` per position, in nats, float32, clamped at 0.

    Examples
    --------
    >>> p = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    >>> [round(x, 4) for x in kl_per_position(p, torch.zeros(2, 2)).tolist()]
    [0.0, 0.3278]
    """
    lp = logits_p.float().log_softmax(-1)
    lq = logits_q.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)


def vertical_scores(maps: Float[Tensor, "*head step step"], k: int = 4
                    ) -> Float[Tensor, "*head key_step"]:
    """Mean of each column over the rows at least ``k`` steps below it.

    ``out[..., j] = mean_{i >= j + k} maps[..., i, j]`` for the key steps ``j`` that have
    such rows (``j < n_steps - k``), so the last dimension is ``n_steps - k``.

    >>> m = torch.arange(16.0).reshape(4, 4)
    >>> vertical_scores(m, k=2).tolist()   # column 0: rows 2, 3; column 1: row 3
    [10.0, 13.0]
    """
    if k < 1:
        raise StepSalError(f"k must be at least 1 step; got {k}")
    n = maps.shape[-1]
    if n - k < 1:
        return maps.new_zeros((*maps.shape[:-2], 0))
    i = torch.arange(n, device=maps.device)[:, None]
    j = torch.arange(n, device=maps.device)[None, :]
    below = (i >= j + k).to(maps.dtype)
    sums = (maps * below).sum(-2)[..., : n - k]
    return sums / below.sum(0)[: n - k]


def receiver_kurtosis(maps: Float[Tensor, "*head step step"], k: int = 4
                      ) -> Float[Tensor, "*head"]:
    """Kurtosis over key steps of the :func:`vertical_scores` (receiver-head score).

    Convention: ``scipy.stats.kurtosis(..., fisher=True, bias=True)`` -- excess kurtosis
    (a normal distribution scores 0), the biased (population) estimator. NaN with fewer
    than 2 scored steps or when every score is equal.

    >>> m = torch.zeros(8, 8); m[:, 1] = 1.0          # every later step reads step 1
    >>> round(float(receiver_kurtosis(m, k=2)), 3)    # one spike among 6 scores
    1.2
    """
    from scipy import stats

    v = vertical_scores(maps.double(), k).cpu().numpy()
    if v.shape[-1] < 2:
        return torch.full(v.shape[:-1], float("nan"))
    flat = np.ptp(v, axis=-1) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kurt = stats.kurtosis(v, axis=-1, fisher=True, bias=True)
    kurt = np.where(flat, np.nan, kurt)
    return torch.as_tensor(np.asarray(kurt), dtype=torch.float32)


def lower_triangle_spearman(a: Float[Tensor, "step step"], b: Float[Tensor, "step step"]
                            ) -> tuple[float, float, int]:
    """Spearman's rho (``scipy.stats.spearmanr``) between two step maps over ``i > j``.

    Returns ``(rho, p, n_pairs)``; rho and p are NaN with fewer than 3 pairs or when
    either side is constant.

    >>> a = torch.tensor([[0., 0, 0], [1, 0, 0], [2, 3, 0]])
    >>> lower_triangle_spearman(a, a * 10)[:2]
    (1.0, 0.0)
    """
    from scipy import stats

    n = a.shape[-1]
    i, j = torch.tril_indices(n, n, -1)
    x, y = a[i, j].double().cpu().numpy(), b[i, j].double().cpu().numpy()
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), len(x)
    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue), len(x)


def saliency_effect_correlation(saliencies: Any, effects: Any):
    """Per layer, Spearman's rho between the head-mean Step-Saliency map and the effect
    matrix, over the lower triangle (query step after key step).

    Parameters
    ----------
    saliencies, effects
        A :class:`~stepsal_lens.StepSaliency` and a :class:`StepEffects` of the same trace,
        or two equally long lists of them.

    Returns
    -------
    pandas.DataFrame
        One row per (trace, layer): ``rho``, ``p``, ``n_pairs`` against the effects of the
        cut in every layer, and ``rho_same_layer``/``p_same_layer`` against the cut in that
        layer alone when the effects have ``per_layer``. NaN where a side is constant.

    Examples
    --------
    >>> import torch
    >>> from stepsal_lens import Step, StepEffects, StepSaliency
    >>> steps = [Step(i, "thinking", "s", (0, 1), (i, i + 1)) for i in range(4)]
    >>> m = torch.tril(torch.rand(4, 4), -1)
    >>> sal = StepSaliency(m.expand(2, 3, 4, 4), [0, 1], steps, torch.arange(4))
    >>> eff = StepEffects(m * 5, steps, torch.arange(4))
    >>> saliency_effect_correlation(sal, eff).rho.tolist()
    [1.0, 1.0]
    """
    import pandas as pd

    sal_list = saliencies if isinstance(saliencies, (list, tuple)) else [saliencies]
    eff_list = effects if isinstance(effects, (list, tuple)) else [effects]
    if len(sal_list) != len(eff_list):
        raise StepSalError(f"got {len(sal_list)} saliencies and {len(eff_list)} effects; pass one "
                           f"of each per trace")
    rows = []
    for t, (sal, eff) in enumerate(zip(sal_list, eff_list)):
        if not torch.equal(sal.token_ids.long(), eff.token_ids.long()):
            raise StepSalError(f"trace {t}: the saliency and the effects come from different "
                               f"token ids; compute both on the same Trace")
        if sal.n_steps != eff.n_steps:
            raise StepSalError(f"trace {t}: {sal.n_steps} saliency steps vs {eff.n_steps} effect "
                               f"steps; compute both on the same Trace")
        head_mean = sal.maps.mean(1)
        for li, layer in enumerate(sal.layers):
            rho, p, n_pairs = lower_triangle_spearman(head_mean[li], eff.effects)
            row = {"trace": t, "layer": layer, "rho": rho, "p": p, "n_pairs": n_pairs}
            if eff.per_layer is not None and layer in eff.layers:
                row["rho_same_layer"], row["p_same_layer"], _ = lower_triangle_spearman(
                    head_mean[li], eff.layer_map(layer))
            rows.append(row)
    return pd.DataFrame(rows)


def correlation_summary(df):
    """Per layer over traces: mean, std, median, min and max of rho, and tests that the
    mean is 0 (one-sample t-test; Wilcoxon signed-rank from 6 traces on).

    ``df`` is :func:`saliency_effect_correlation`'s output; NaN rows are skipped. The
    same for ``rho_same_layer`` when present (prefixed ``same_layer_``).

    >>> import pandas as pd
    >>> df = pd.DataFrame({"trace": [0, 1, 2], "layer": [0, 0, 0], "rho": [0.5, 0.6, 0.7]})
    >>> s = correlation_summary(df)
    >>> round(float(s.mean_rho[0]), 2), int(s.n[0])
    (0.6, 3)
    """
    import pandas as pd
    from scipy import stats

    out = []
    for layer, grp in df.groupby("layer"):
        row: dict[str, Any] = {"layer": layer}
        for col, prefix in (("rho", ""), ("rho_same_layer", "same_layer_")):
            if col not in grp:
                continue
            x = grp[col].dropna().to_numpy()
            row[f"{prefix}n"] = len(x)
            row[f"{prefix}mean_rho"] = float(x.mean()) if len(x) else float("nan")
            row[f"{prefix}std_rho"] = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
            row[f"{prefix}median_rho"] = float(np.median(x)) if len(x) else float("nan")
            row[f"{prefix}min_rho"] = float(x.min()) if len(x) else float("nan")
            row[f"{prefix}max_rho"] = float(x.max()) if len(x) else float("nan")
            t = p = w = float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if len(x) > 1 and np.ptp(x) > 0:
                    res = stats.ttest_1samp(x, 0.0)
                    t, p = float(res.statistic), float(res.pvalue)
                if len(x) >= 6 and (x != 0).any():
                    w = float(stats.wilcoxon(x).pvalue)
            row[f"{prefix}t"], row[f"{prefix}p_ttest"], row[f"{prefix}p_wilcoxon"] = t, p, w
        out.append(row)
    return pd.DataFrame(out)
