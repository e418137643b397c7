"""Untrusted results reach HTML only escaped: step texts, segment names, token strings,
model names and trace ids holding markup come out as text in the explorer, its static
export, the token views, the demo report and the StepFlow comparison; the JavaScript view
never turns state into markup."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import stepsal_lens
from stepsal_lens import Step, StepSaliency, Trace
from stepsal_lens.apps.escape import esc
from stepsal_lens.apps.plots import img_tag, token_html
from stepsal_lens.apps.report import write_demo_report
from stepsal_lens.apps.widgets import compare_stepflow, explore, trace_tokens

PACKAGE = Path(stepsal_lens.__file__).parent
HOSTILE = ["<img src=x onerror=alert(1)>", '"><script>alert(2)</script>',
           "</style><script>alert(3)</script>", "' onmouseover='alert(4)"]


def _safe(doc: str, *values: str) -> None:
    """No hostile value appears raw in ``doc``; each appears escaped."""
    for value in values:
        assert value not in doc, f"{value!r} reached the HTML unescaped"
        assert esc(value) in doc, f"{esc(value)!r} (the escaped text) is missing"
    assert not re.search(r"<img src=x|<script", doc), doc[:400]


def _hostile_result() -> StepSaliency:
    """A hand-built result whose segment names and step texts are markup (what an edited
    steps.json held before the loaders refused it)."""
    steps = [Step(i, seg, text, (2 * i, 2 * i + 2), (2 * i, 2 * i + 2))
             for i, (seg, text) in enumerate(zip(["question", HOSTILE[0], "summary", HOSTILE[3]],
                                                 HOSTILE))]
    return StepSaliency(torch.rand(2, 2, 4, 4), [0, 1], steps, torch.arange(8),
                        {"model": HOSTILE[1], "target": "lm"})


def test_html_is_escaped_in_one_place():
    """``html.escape`` lives in :mod:`stepsal_lens.apps.escape` only: every other module
    builds HTML with ``esc``."""
    users = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                   if "html.escape" in p.read_text() or "from html import" in p.read_text())
    assert users == ["apps/escape.py"], users


def test_explorer_click_shows_hostile_steps_as_text():
    sal = _hostile_result()
    ex = explore(sal)
    ex.select_cell(1, 3)  # what a click on a cell does
    header = ex.detail.outputs[0]["data"]["text/html"]
    _safe(header, HOSTILE[0], HOSTILE[3])  # segment names and step texts
    ex.select_cell(2, 1)
    _safe(ex.detail.outputs[0]["data"]["text/html"], HOSTILE[0], HOSTILE[1])
    # the static export (what an HTML export shows without widgets)
    bundle = ex.static_bundle()
    assert "<img " in bundle["text/html"] and "<script" not in bundle["text/html"]
    # the hover texts travel as data; the view draws them with textContent
    assert ex.heatmap.texts[1] == HOSTILE[1]


def test_token_views_escape_tokens_captions_and_colours():
    doc = token_html(HOSTILE, {HOSTILE[2]: [0.1, 0.2, 0.3, 0.4]}, caption=HOSTILE[1])
    _safe(doc, *HOSTILE)
    doc = token_html(HOSTILE, {}, colors=["red'><script>x</script>"] * 4,
                     legend={HOSTILE[0]: "blue"}, titles=HOSTILE)
    _safe(doc, *HOSTILE)
    assert "<script>x" not in doc
    tag = img_tag(b"\x89PNG", HOSTILE[1], css_class=HOSTILE[3])
    assert tag.count("<") == 1 and esc(HOSTILE[1]) in tag


def test_trace_token_view_escapes_token_strings(tokenizer):
    trace = Trace.from_segments("What is " + HOSTILE[0] + "?",
                                "We read " + HOSTILE[2] + " first. Then we add two to it.",
                                "It is " + HOSTILE[1] + ".", tokenizer, format="think-tags")
    doc = trace_tokens(trace).data
    assert "<img" not in doc.replace("<img alt", "") and "<script" not in doc
    assert "&lt;" in doc


def test_stepflow_comparison_escapes_texts():
    a, b = _hostile_result(), _hostile_result()
    cmp = compare_stepflow(a, b, text_off=HOSTILE[0], text_on=HOSTILE[2])
    _safe(cmp.texts.value, HOSTILE[0], HOSTILE[2])
    assert "<script" not in cmp.curves.value


def test_demo_report_escapes_records(tmp_path):
    recs = [{"index": i, "split": HOSTILE[i % 4], "correct": i % 2 == 0,
             "answer": HOSTILE[(i + 1) % 4], "prediction": HOSTILE[(i + 2) % 4],
             "question": HOSTILE[(i + 3) % 4], "text": HOSTILE[i % 4], "n_steps": 3}
            for i in range(4)]
    comparison = pd.DataFrame({"metric": ["lock_in"], "layer": [0], HOSTILE[1]: [HOSTILE[0]]})
    result = SimpleNamespace(out=tmp_path, records=recs, saliencies=[], accuracy=0.5,
                             metrics=pd.DataFrame(), comparison=comparison, stepflow=None,
                             causal=None)
    doc = write_demo_report(result, model_name=HOSTILE[2]).read_text()
    _safe(doc, *HOSTILE)


def test_js_view_never_builds_markup_from_state():
    js = (PACKAGE / "apps" / "_views.js").read_text()
    code = re.sub(r"//[^\n]*", "", js)
    for sink in ("insertAdjacentHTML", "outerHTML", "document.write", "eval(", "new Function",
                 "DOMParser", "createContextualFragment", ".srcdoc"):
        assert sink not in code, sink
    assignments = re.findall(r"innerHTML\s*=\s*([^;]+);", code)
    assert assignments and all(a.strip() == '""' for a in assignments), assignments
    # attribute names are fixed in the code: none is an on* handler
    assert "on" not in {k[:2] for k in re.findall(r'"([a-z-]+)":', code)}
    # keys from the state are sanitised before they become ids or CSS selectors
    assert "key = safeKey(key)" in code and 'safeKey(model.get("key"))' in code
