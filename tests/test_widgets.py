"""Notebook explorers: real ipywidgets and plotly FigureWidgets driven from Python."""

from __future__ import annotations

import html
import warnings

import numpy as np
import pytest
import torch

from stepsal_lens import StepSalError, Trace, step_saliency
from stepsal_lens.saliency import pool_saliency, token_saliency
from stepsal_lens.widgets import explore, step_map

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
    np.testing.assert_allclose(ex.heatmap.data[0].z, step_map(sal, 0))
    ex.layer.value = 1
    np.testing.assert_allclose(ex.heatmap.data[0].z, step_map(sal, 1))
    assert ex.curves.layout.shapes[0].x0 == sal.layers[1] and ex.layer_label.value == "layer 1"
    ex.head.value = 2
    np.testing.assert_allclose(ex.heatmap.data[0].z, step_map(sal, 1, 2))
    ex.scale.value = "raw"
    np.testing.assert_allclose(ex.heatmap.data[0].z, sal.maps[1, 2].double().numpy())
    ex.scale.value = "log"
    assert ex.heatmap.layout.title.text == "layer 1, head 2, log"
    assert not np.allclose(step_map(sal, 0), step_map(sal, 1))  # the slider shows something new


def test_step_text_is_escaped(case):
    model, trace, sal = case
    ex = explore(sal, model=model, trace=trace)
    hover = ex.heatmap.data[0].customdata
    assert "&lt;b&gt;the&lt;/b&gt;" in hover[0][0][0] and "<b>the" not in hover[0][0][0]
    ex.select_cell(1, 0)
    shown = ex.detail.outputs
    assert len(shown) == 3  # header, caption, the circuitsvis token view
    view = shown[2]["data"]["text/html"]
    assert "ColoredTokensMulti" in view and "unpkg.com" not in view  # inlined: works offline
    header = shown[0]["data"]["text/html"]
    assert html.escape("<b>the</b>") in header and "<b>the</b>" not in header
    assert all("text/html" in o["data"] for o in shown)


def test_static_fallback_and_errors(case):
    model, trace, sal = case
    ex = explore(sal)
    bundle = ex._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "application/vnd.jupyter.widget-view+json" in data
    assert data["text/html"].startswith("<img") and len(data["image/png"]) > 1000
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


def _result_with_segments(segments, seed=0):
    """A StepSaliency with hand-made maps (the widgets only read maps and steps)."""
    from stepsal_lens import StepSaliency
    from stepsal_lens.trace import Step

    gen = torch.Generator().manual_seed(seed)
    n = len(segments)
    maps = torch.rand(2, 3, n, n, generator=gen).tril()
    steps = [Step(i, seg, f"step {i} <i>x</i>", (i, i + 1), (i, i + 1))
             for i, seg in enumerate(segments)]
    return StepSaliency(maps, [0, 1], steps, torch.arange(n), {"target": "lm"})


def test_binned_map():
    from stepsal_lens.widgets import binned_map

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


def test_compare_groups():
    from stepsal_lens.widgets import binned_map, compare

    right = [_result_with_segments(["question"] + ["thinking"] * k + ["summary"], seed=k)
             for k in (3, 4, 5)]
    wrong = [_result_with_segments(["question"] + ["thinking"] * k + ["summary"] * 2, seed=9 + k)
             for k in (2, 6)]
    cmp = compare(right, wrong)
    with warnings.catch_warnings():  # bins empty in every trace
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmean(np.stack([binned_map(r, 0) for r in right]), axis=0)
    np.testing.assert_allclose(cmp.group_map("correct"), expected)
    first = cmp.maps.outputs[0]["data"]["image/png"]
    cmp.layer.value = 1
    assert cmp.maps.outputs[0]["data"]["image/png"] != first and cmp.layer_label.value == "layer 1"
    assert set(cmp.metrics) == {"correct", "wrong"} and len(cmp.curves.outputs) == 1
    assert "image/png" in cmp._repr_mimebundle_()
    with pytest.raises(StepSalError, match="empty"):
        compare([], wrong)


def test_compare_stepflow_on_one_trace(case):
    from stepsal_lens import stepflow
    from stepsal_lens.widgets import compare_stepflow

    model, trace, off = case
    with stepflow(model, tau_max=0.5, alpha=1.0):
        on = step_saliency(model, trace)
    cmp = compare_stepflow(off, on)
    assert len(cmp.table) == model.cfg.n_layers
    assert not np.allclose(cmp.table["lock_in on"], cmp.table["lock_in off"])
    assert html.escape("<b>the</b>") in cmp.texts.value and "<b>the</b>" not in cmp.texts.value
    first = cmp.maps.outputs[0]["data"]["image/png"]
    cmp.layer.value = 1
    assert cmp.maps.outputs[0]["data"]["image/png"] != first
