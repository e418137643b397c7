"""Static reports: one self-contained HTML file (images inline).

Every value from the run's records (model name, splits, questions, texts, answers,
predictions, indices) is escaped with :func:`stepsal_lens.apps.escape.esc`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stepsal_lens.apps.escape import esc
from stepsal_lens.apps.plots import figure_png, img_tag

__all__ = ["plot_condition_curves", "plot_group_curves", "write_demo_report"]

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}pre{white-space:pre-wrap;overflow-wrap:anywhere;max-height:30em;overflow:auto;background:#f7f7f7;padding:.7em;font-size:13px}
img{max-width:100%}.ok{color:#1a7f37}.bad{color:#c4302b}
"""


def plot_condition_curves(groups: dict[str, Any], names=("lock_in", "thinking_share"),
                          colors: Sequence[str] = ("tab:green", "tab:red", "tab:blue")):
    """Per-layer means of several groups of per-(trace, layer) metrics, with 95% t bands.

    ``groups`` maps a label to a DataFrame with a ``layer`` column and the metric columns
    (one row per trace and layer); the legend counts traces, not rows. Returns a
    :class:`stepsal_lens.apps.plots.Figure` (no pyplot: the backend is left alone).
    """
    from scipy import stats

    from stepsal_lens.apps.plots import new_figure

    fig = new_figure(4.6 * len(names), 3.6)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    all_layers: set[int] = set()
    for ax, name in zip(axes, names):
        for (label, df), color in zip(groups.items(), colors):
            if not len(df):
                continue
            grp = df.groupby("layer")[name]
            mean, sem, count = grp.mean(), grp.sem(), grp.count()
            if mean.isna().all():
                continue
            all_layers.update(int(x) for x in mean.index)
            half = sem * stats.t.ppf(0.975, np.maximum(count - 1, 1))
            ax.plot(mean.index, mean.values, color=color, marker="o",
                    label=f"{label} ({int(count.max())} traces)")
            ax.fill_between(mean.index, (mean - half).values, (mean + half).values,
                            color=color, alpha=0.2)
        ax.set_title(f"{name} (mean, 95% band)", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes:
        if all_layers:
            ax.set_xticks(sorted(all_layers))
    return fig


def plot_group_curves(metrics, names=("lock_in", "thinking_share")):
    """Per-layer means of correct and wrong traces with 95% confidence bands."""
    return plot_condition_curves({"correct": metrics[metrics.correct == True],  # noqa: E712
                                  "wrong": metrics[metrics.correct == False]}, names)  # noqa: E712


def _stepflow_section(result: Any, flow: dict[str, Any], out: Path) -> str:
    base, sf = result.records, flow["records"]
    splits = sorted({r["split"] for r in base}, key=[r["split"] for r in base].index)
    rows = []
    for split in [*splits, "all"]:
        pick = lambda recs: [r["correct"] for r in recs if split in ("all", r["split"])]  # noqa: E731
        b, s = pick(base), pick(sf)
        rows.append(f"<tr><td>{esc(split)}</td><td>{sum(b)}/{len(b)}</td>"
                    f"<td>{sum(s)}/{len(s)}</td></tr>")
    m = flow["mcnemar"]
    n_sf = max(1, len(sf))
    oeb = sum(r["stats"]["oeb"]["triggers"] for r in sf) / n_sf
    smi = sum(r["stats"]["smi"]["injections"] for r in sf) / n_sf
    changed = sum(a["text"] != b["text"] for a, b in zip(base, sf))
    parts = [
        "<h2>StepFlow</h2>",
        f"<p>The same questions generated again with StepFlow on "
        f"(<code>{esc(str(flow['settings']))}</code>). Per trace on average: "
        f"{oeb:.1f} OEB row rescales, {smi:.1f} SMI injections; {changed} of {len(base)} "
        f"generations changed.</p>",
        "<table><tr><th>split</th><th>baseline</th><th>StepFlow</th></tr>" + "".join(rows)
        + "</table>",
        f"<p>Paired exact McNemar test: {esc(m['a_only'])} right only without StepFlow, "
        f"{esc(m['b_only'])} right only with it, p = {m['mcnemar_p']:.3g}.</p>",
    ]
    if len(result.metrics) and len(flow["metrics"]):
        png = figure_png(plot_condition_curves({"baseline": result.metrics,
                                          "StepFlow": flow["metrics"]},
                                         colors=("tab:gray", "tab:blue")))
        (out / "stepflow_curves.png").write_bytes(png)
        parts.append("<p>Step-Saliency per layer, baseline traces vs StepFlow's traces "
                     "(measured with StepFlow on); 95% t bands.</p>"
                     + img_tag(png, "StepFlow curves"))
    return "".join(parts)


def _table(df, floats: str = "{:.4g}") -> str:
    head = "".join(f"<th>{esc(str(c))}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for v in row:
            text = floats.format(v) if isinstance(v, (float, np.floating)) else str(v)
            cells.append(f"<td>{esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _length_note(records: list[dict[str, Any]]) -> str:
    """Correct and wrong traces often differ in length; say by how much, so the
    per-layer differences are not read as failure modes alone."""
    def mean_steps(ok: bool) -> float:
        n = [r["n_steps"] for r in records if bool(r["correct"]) == ok and r.get("n_steps")]
        return sum(n) / len(n) if n else float("nan")

    right, wrong = mean_steps(True), mean_steps(False)
    return (f"<p><b>Length confound.</b> Correct traces have {right:.1f} steps on average, "
            f"wrong ones {wrong:.1f}: metrics that depend on the number of steps differ "
            f"for that reason too (on tiny-lrm, wrong answers come from longer chains). "
            f"Compare traces of equal length before reading a difference as a failure "
            f"mode.</p>")


def write_demo_report(result: Any, *, model_name: str = "") -> Path:
    """Write the demo's PNGs and ``report.html`` into ``result.out``."""
    from stepsal_lens.apps.plots import plot_step_maps

    out = Path(result.out)
    parts = [f"<h1>stepsal demo: {esc(model_name)}</h1>"]
    recs = result.records
    by_split: dict[str, list[bool]] = {}
    for r in recs:
        by_split.setdefault(r["split"], []).append(bool(r["correct"]))
    acc = "".join(f"<tr><td>{esc(s)}</td><td>{sum(v)}/{len(v)}</td>"
                  f"<td>{100 * sum(v) / len(v):.1f}%</td></tr>" for s, v in by_split.items())
    parts.append(f"<h2>Accuracy</h2><table><tr><th>split</th><th>correct</th><th>accuracy</th>"
                 f"</tr>{acc}<tr><td>all</td><td>{sum(r['correct'] for r in recs)}/{len(recs)}"
                 f"</td><td>{100 * result.accuracy:.1f}%</td></tr></table>")

    for correct, label in ((True, "correct"), (False, "wrong")):
        sal = next((s for s in result.saliencies if s.meta["correct"] == correct), None)
        if sal is None:
            parts.append(f"<h2>A {label} trace</h2><p>No {label} trace in this run.</p>")
            continue
        png = figure_png(plot_step_maps(sal.head_mean(), sal.segments, layers=sal.layers,
                                  title=f"{label} trace #{sal.meta['index']}"))
        (out / f"maps_{label}.png").write_bytes(png)
        rec = recs[sal.meta["index"]]
        parts.append(f"<h2>A {label} trace (#{esc(rec['index'])}, {esc(rec['split'])})</h2>"
                     f"<p>Head-mean, row-normalised step maps; Q/T/S = question / thinking / "
                     f"summary.</p>{img_tag(png, f'{label} maps')}"
                     f"<p>answer {esc(str(rec['answer']))}, prediction "
                     f"{esc(str(rec['prediction']))}</p>"
                     f"<pre>{esc(rec['text'])}</pre>")

    if len(result.metrics):
        png = figure_png(plot_group_curves(result.metrics))
        (out / "curves.png").write_bytes(png)
        parts.append("<h2>Lock-in and thinking share by layer</h2><p>Means with 95% "
                     "confidence bands (t interval over traces).</p>" + img_tag(png, "curves"))
    if result.comparison is not None:
        cmp = result.comparison[result.comparison.metric.isin(
            ["lock_in", "context_share", "thinking_share", "last_k_share"])]
        parts.append("<h2>Correct minus wrong, per layer</h2><p>Welch's t-test p-values and "
                     "Cohen's d; no correction for multiple comparisons.</p>"
                     + _length_note(recs) + _table(cmp, floats="{:.3g}"))
    else:
        parts.append("<h2>Correct vs wrong</h2><p>Fewer than two traces in a group: no "
                     "comparison.</p>")
    if getattr(result, "stepflow", None):
        parts.append(_stepflow_section(result, result.stepflow, out))
    if getattr(result, "causal", None):
        from stepsal_lens.apps.circuits import causality_section

        parts.append(causality_section(result.causal, out))
    rows = "".join(
        f"<tr><td>{esc(r['index'])}</td><td>{esc(r['split'])}</td>"
        f"<td class='{'ok' if r['correct'] else 'bad'}'>{'yes' if r['correct'] else 'no'}</td>"
        f"<td>{esc(str(r['answer']))}</td><td>{esc(str(r['prediction']))}</td>"
        f"<td style='text-align:left'>{esc(r['question'])}</td></tr>" for r in recs)
    parts.append("<h2>All traces</h2><table><tr><th>#</th><th>split</th><th>correct</th>"
                 f"<th>answer</th><th>prediction</th><th>question</th></tr>{rows}</table>")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>stepsal demo</title>"
           f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
