"""The demo report's section for the causal tools (its figures live in
:mod:`~stepsal_lens.apps.effect_plots`, importable from here too; its explorer in
:mod:`~stepsal_lens.apps.causal_explorer`).

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


from stepsal_lens.apps.effect_plots import effect_map, plot_effects
from stepsal_lens.apps.escape import esc
from stepsal_lens.apps.plots import figure_png, img_tag, new_figure
from stepsal_lens.core.causal import correlation_summary, saliency_effect_correlation
from stepsal_lens.errors import StepSalError
from stepsal_lens.lens.causal import step_effects
from stepsal_lens.segments.trace import Trace
from stepsal_lens.typing import Model

__all__ = ["causality_section", "demo_causality", "effect_map", "plot_effects"]


def demo_causality(model: Model, saliencies: Sequence[Any], *, limit: int = 8) -> dict | None:
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
