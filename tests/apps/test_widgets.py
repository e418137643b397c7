"""Notebook explorers: real ipywidgets and plotly FigureWidgets driven from Python."""

from __future__ import annotations

import base64
import html
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import stepsal_lens
from stepsal_lens import StepSalError, Trace, step_saliency
from stepsal_lens.core.pooling import pool_saliency
from stepsal_lens.lens.saliency import token_saliency
from stepsal_lens.apps.widgets import explore, step_map

QUESTION = "Start with 7. Add 5. What is <b>the</b> result?"
THINKING = "We start with the number 7. Adding 5 to 7 gives 12 in total."
SUMMARY = "The result is 12.\n\nSo the answer is \\boxed{12}."


@pytest.fixture(scope="module")
def case(models):
    model = models["qwen2"]
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, model)
    return model, trace, step_saliency(model, trace)


def test_token_saliency_pools_to_the_step_maps(case):
    model, trace, sal = case
    for layer in range(model.cfg.n_layers):
        tok, att = token_saliency(model, trace, layer)
        assert tok.shape == att.shape == (model.cfg.n_heads, trace.n_tokens, trace.n_tokens)
        pooled = pool_saliency(tok[None], torch.ones_like(tok[None]), trace.step_of_token,
                               trace.n_steps)
        torch.testing.assert_close(pooled, sal.maps[layer], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(att.sum(-1), torch.ones_like(att.sum(-1)))


def test_explorer_follows_its_controls(case):
    model, trace, sal = case
    ex = explore(sal, model=model, trace=trace)
    close = dict(rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(np.array(ex.heatmap.z, float), step_map(sal, 0), **close)
    ex.layer.value = 1
    np.testing.assert_allclose(np.array(ex.heatmap.z, float), step_map(sal, 1), **close)
    assert ex.curves.curves["marker"] == sal.layers[1] and ex.layer_label.value == "layer 1"
    ex.head.value = 2
    np.testing.assert_allclose(np.array(ex.heatmap.z, float), step_map(sal, 1, 2), **close)
    ex.scale.value = "raw"
    np.testing.assert_allclose(np.array(ex.heatmap.z, float), sal.maps[1, 2].double().numpy(),
                               **close)
    ex.scale.value = "log"
    assert ex.heatmap.title == "layer 1, head 2, log"
    assert ex.heatmap.colorbar["label"] == "log10 saliency"
    assert not np.allclose(step_map(sal, 0), step_map(sal, 1))  # the slider shows something new
    # what the view draws is labelled: ticks per step with its segment, a legend per box
    assert ex.heatmap.ticks[0] == "Q0" and ex.heatmap.ticks[-1].startswith("S")
    assert set(ex.heatmap.legend) == set(sal.segments)
    assert [s["name"] for s in ex.curves.curves["series"]] == ["lock_in", "thinking_share"]
    assert ex.curves.curves["x"] == [int(x) for x in sal.layers]
    # a click in the front end sets `selected`; the kernel answers with the token view
    ex.heatmap.selected = [2, 0]
    assert len(ex.detail.outputs) == 3


def test_step_text_is_escaped(case):
    model, trace, sal = case
    ex = explore(sal, model=model, trace=trace)
    # the hover texts travel as data and are drawn with textContent, never as markup
    assert "<b>the</b>" in ex.heatmap.texts[0]
    js = (Path(stepsal_lens.__file__).parent / "apps" / "_views.js").read_text()
    assert "innerHTML = \"\"" in js and js.count("innerHTML") == 2
    ex.select_cell(1, 0)
    shown = ex.detail.outputs
    assert len(shown) == 3  # header, caption, the token view
    view = shown[2]["data"]["text/html"]
    assert "<script" not in view and "http" not in view  # plain HTML: works offline
    header = shown[0]["data"]["text/html"]
    assert html.escape("<b>the</b>") in header and "<b>the</b>" not in header
    assert "<b>the</b>" not in view
    assert all("text/html" in o["data"] for o in shown)


def test_token_view_is_scaled_to_the_pair(case):
    """The drill-down divides by the pair's maximum (raw values are ~1e-4 here and ~1e-10
    on trained models: shown raw, every token looks the same)."""
    model, trace, sal = case
    ex = explore(sal, model=model, trace=trace)
    ex.layer.value = 1
    q, k = 2, 0
    v = ex.token_values(q, k)
    tok, att = token_saliency(model, trace, sal.layers[1])
    (qa, qb), (ka, kb) = trace.steps[q].token_span, trace.steps[k].token_span
    raw = tok.double().mean(0)[qa:qb, ka:kb].mean(0).numpy()
    raw_att = att.double().mean(0)[qa:qb, ka:kb].mean(0).numpy()
    np.testing.assert_allclose(v["saliency"], raw / raw.max(), rtol=1e-9)
    np.testing.assert_allclose(v["attention"], raw_att / raw_att.max(), rtol=1e-9)
    assert v["saliency_max"] == pytest.approx(raw.max(), rel=1e-9)
    assert v["tokens"] == trace.str_tokens()[ka:kb]
    assert v["saliency"].max() == 1.0 and v["saliency"].min() < 0.9  # tokens differ
    ex.head.value = 3
    one = ex.token_values(q, k)
    raw3 = tok.double()[3][qa:qb, ka:kb].mean(0).numpy()
    np.testing.assert_allclose(one["saliency"], raw3 / raw3.max(), rtol=1e-9)
    # the view states its scale and shades each token by its scaled value
    ex.select_cell(q, k)
    view = ex.detail.outputs[2]["data"]["text/html"]
    assert "divided by the pair&#x27;s maximum" in view
    assert f"{v['saliency_max']:.3g}" in view or "maximum saliency" in view.lower()
    assert "saliency 1.000" in view


def test_static_fallback_and_errors(case):
    model, trace, sal = case
    ex = explore(sal)
    data = ex.static_bundle()
    assert data["text/html"].startswith('<img alt="layer 0, head mean, row-normalised"')
    assert f"stepsal-static-{ex.static_key}" in data["text/html"]
    assert len(data["image/png"]) > 1000 and base64.b64decode(data["image/png"])[:4] == b"\x89PNG"
    ex.select_cell(0, 0)  # no model: text only
    assert len(ex.detail.outputs) == 1
    with pytest.raises(StepSalError, match="model"):
        ex.token_view(1, 0)
    with pytest.raises(StepSalError, match="steps must be"):
        ex.select_cell(99, 0)
    with pytest.raises(StepSalError, match="both"):
        explore(sal, model=model)
    with pytest.raises(StepSalError, match="scale"):
        step_map(sal, 0, scale="sqrt")


def test_displayed_explorer_is_widget_plus_static_png(case):
    """Displaying an explorer gives two outputs: the widget, then a PNG twin (its own
    output, so frontends without the widget show it); moving a control updates the twin."""
    from IPython.core.interactiveshell import InteractiveShell

    model, trace, sal = case
    shell = InteractiveShell.instance()
    sent = []
    pub = shell.display_pub
    orig = pub.publish
    pub.publish = lambda data, metadata=None, **kw: sent.append((data, kw))
    try:
        ex = explore(sal)
        shell.display_formatter.format  # noqa: B018 - the shell is set up
        from IPython.display import display

        display(ex)
        ex.layer.value = 1
    finally:
        pub.publish = orig
    assert "application/vnd.jupyter.widget-view+json" in sent[0][0]
    assert "image/png" in sent[1][0] and "stepsal-static" in sent[1][0]["text/html"]
    assert "image/png" not in sent[0][0]
    assert sent[-1][1].get("update") and 'alt="layer 1,' in sent[-1][0]["text/html"]


def test_saved_widget_state_is_small(case):
    """The saved state is data, not a plotting library: a few kB of our JavaScript plus
    the maps' numbers and colours."""
    import json

    from ipywidgets.embed import dependency_state

    model, trace, sal = case
    ex = explore(sal, model=model, trace=trace)
    ex.select_cell(2, 0)
    size = len(json.dumps(dependency_state(ex.widget)))
    assert size < 100_000, f"explorer widget state is {size} bytes"


def test_library_leaves_the_matplotlib_backend_alone(case):
    """No plotting or widget call may switch the process's backend (a notebook's inline
    backend) or leave pyplot figures behind."""
    import matplotlib
    import matplotlib.pyplot as plt

    from stepsal_lens import layer_metrics
    from stepsal_lens.apps.circuits import plot_effects
    from stepsal_lens.lens.causal import receiver_heads, step_effects
    from stepsal_lens.apps.plots import plot_map_pair, plot_step_maps
    from stepsal_lens.apps.report import plot_condition_curves, plot_group_curves
    from stepsal_lens.apps.widgets import compare_groups, compare_stepflow

    model, trace, sal = case
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    figs = plt.get_fignums()
    try:
        df = layer_metrics(sal)
        df["correct"] = [True, False]
        effects = step_effects(model, trace, progress=False)
        calls = {
            "plot_effects": lambda: plot_effects(effects),
            "receiver_heads.plot": lambda: receiver_heads(model, [trace], k=1,
                                                          progress=False).plot(),
            "plot_step_maps": lambda: plot_step_maps(sal.head_mean(), sal.segments),
            "plot_map_pair": lambda: plot_map_pair(step_map(sal, 0), step_map(sal, 1),
                                                   sal.segments, titles=("a", "b", "b - a"),
                                                   suptitle="x"),
            "plot_condition_curves": lambda: plot_condition_curves({"a": df}),
            "plot_group_curves": lambda: plot_group_curves(df),
            "explore": lambda: explore(sal, model=model, trace=trace),
            "static_png": lambda: explore(sal).static_png(),
            "slider": lambda: explore(sal).layer.set_trait("value", 1),
            "select_cell": lambda: explore(sal, model=model, trace=trace).select_cell(1, 0),
            "compare_groups": lambda: compare_groups([sal, sal], [sal]).static_png(),
            "compare_stepflow": lambda: compare_stepflow(sal, sal).static_png(),
        }
        for name, call in calls.items():
            fig = call()
            if hasattr(fig, "_repr_png_"):
                assert fig._repr_png_()[:4] == b"\x89PNG", name
            assert matplotlib.get_backend() == "svg", f"{name} switched the backend"
            assert plt.get_fignums() == figs, f"{name} left a pyplot figure open"
    finally:
        matplotlib.use(before)


def test_figures_are_labelled():
    from stepsal_lens.apps.plots import plot_step_maps
    from stepsal_lens.apps.report import plot_condition_curves

    res = _result_with_segments(["question"] + ["thinking"] * 4 + ["summary"])
    fig = plot_step_maps(res.head_mean(), res.segments)
    maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert all(ax.get_xlabel() == "key step (source)" for ax in maps)
    assert maps[0].get_ylabel() == "query step (reader)"
    assert [t.get_text() for t in maps[0].get_yticklabels()] == ["Q0", "T1", "T2", "T3", "T4",
                                                                  "S5"]
    assert [t.get_text() for t in maps[0].get_legend().get_texts()] == ["question", "thinking",
                                                                        "summary"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert bars and bars[0].get_ylabel().startswith("share of the row")
    import pandas as pd

    df = pd.DataFrame({"layer": [0, 1, 2, 3] * 2, "lock_in": np.arange(8.0),
                       "thinking_share": np.arange(8.0)})
    fig = plot_condition_curves({"a": df})
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [0, 1, 2, 3]  # integer layer ticks only
        assert ax.get_xlabel() == "layer" and ax.get_ylabel()
        assert ax.get_legend().get_texts()[0].get_text() == "a (2 traces)"


def _result_with_segments(segments, seed=0):
    """A StepSaliency with hand-made maps (the widgets only read maps and steps)."""
    from stepsal_lens import StepSaliency
    from stepsal_lens.segments.trace import Step

    gen = torch.Generator().manual_seed(seed)
    n = len(segments)
    maps = torch.rand(2, 3, n, n, generator=gen).tril()
    steps = [Step(i, seg, f"step {i} <i>x</i>", (i, i + 1), (i, i + 1))
             for i, seg in enumerate(segments)]
    return StepSaliency(maps, [0, 1], steps, torch.arange(n), {"target": "lm"})


def test_binned_map():
    from stepsal_lens.apps.widgets import binned_map

    exact = _result_with_segments(["question"] + ["thinking"] * 6 + ["summary"] * 2)
    np.testing.assert_allclose(binned_map(exact, 1), step_map(exact, 1))
    few = _result_with_segments(["question", "thinking", "thinking", "summary"])
    b = binned_map(few, 0)
    m = step_map(few, 0)
    assert b.shape == (9, 9)
    assert b[1, 1] == pytest.approx(m[1, 1]) and b[4, 4] == pytest.approx(m[2, 2])
    assert np.isnan(b[2, 2]) and b[7, 0] == pytest.approx(m[3, 0])
    many = _result_with_segments(["question"] + ["thinking"] * 12 + ["summary"])
    mm = step_map(many, 0)
    assert binned_map(many, 0)[1, 0] == pytest.approx(mm[1:3, 0].mean())


def test_fit_bins_leave_no_bin_empty():
    from stepsal_lens.apps.widgets import binned_map, binned_segments, binned_ticks, fit_bins

    group = [_result_with_segments(["question"] + ["thinking"] * k + ["summary"], seed=k)
             for k in (3, 5, 9)]
    bins = fit_bins(group)
    assert bins == {"question": 1, "thinking": 3, "summary": 1}  # tiny-lrm: one summary step
    for r in group:
        assert not np.isnan(binned_map(r, 0, bins)).any()
    assert binned_ticks(bins) == ["Q", "T1", "T2", "T3", "S"]
    assert binned_segments(bins) == ["question"] + ["thinking"] * 3 + ["summary"]
    long = [_result_with_segments(["question"] + ["thinking"] * 9 + ["summary"] * 3)]
    assert fit_bins(long) == {"question": 1, "thinking": 6, "summary": 2}


def test_compare_groups():
    from stepsal_lens.apps.widgets import binned_map, compare_groups

    right = [_result_with_segments(["question"] + ["thinking"] * k + ["summary"], seed=k)
             for k in (3, 4, 5)]
    wrong = [_result_with_segments(["question"] + ["thinking"] * k + ["summary"] * 2, seed=9 + k)
             for k in (2, 6)]
    cmp = compare_groups(right, wrong)
    assert cmp.bins == {"question": 1, "thinking": 2, "summary": 1}
    expected = np.mean(np.stack([binned_map(r, 0, cmp.bins) for r in right]), axis=0)
    np.testing.assert_allclose(cmp.group_map("correct"), expected)
    assert not np.isnan(cmp.group_map("wrong")).any()  # no empty bin
    first = cmp.maps.value
    cmp.layer.value = 1
    assert cmp.maps.value != first and cmp.layer_label.value == "layer 1"
    assert set(cmp.metrics) == {"correct", "wrong"} and cmp.curves.value[:4] == b"\x89PNG"
    assert cmp.static_bundle()["image/png"]
    with pytest.raises(StepSalError, match="empty"):
        compare_groups([], wrong)


def test_compare_stepflow_on_one_trace(case):
    from stepsal_lens import stepflow
    from stepsal_lens.apps.widgets import compare_stepflow

    model, trace, off = case
    with stepflow(model, tau_max=0.5, alpha=1.0):
        on = step_saliency(model, trace)
    cmp = compare_stepflow(off, on)
    assert len(cmp.table) == model.cfg.n_layers
    assert not np.allclose(cmp.table["lock_in on"], cmp.table["lock_in off"])
    assert html.escape("<b>the</b>") in cmp.texts.value and "<b>the</b>" not in cmp.texts.value
    assert cmp.same_text and "identical" in cmp.texts.value  # same trace teacher-forced
    first = cmp.maps.value
    cmp.layer.value = 1
    assert cmp.maps.value != first
    differ = compare_stepflow(off, on, text_off="a", text_on="b")
    assert not differ.same_text and "differ" in differ.texts.value
