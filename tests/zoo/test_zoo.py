"""The arithmetic task, the bundled tiny-lrm, its training recipe and `stepsal demo`."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from stepsal_lens.segments.association import info_of
import pytest

from stepsal_lens import Trace, load_lrm
from stepsal_lens.apps.cli import main
from stepsal_lens.segments.formats import get_format
from stepsal_lens.lens.models import BUNDLED
from stepsal_lens.zoo.task import SPLITS, ArithmeticProblem as Problem, boxed_answer as extract_answer, grade_exact as grade, make_problems as generate

EVAL = json.loads((BUNDLED["tiny-lrm"] / "eval.json").read_text())


# ---- task -------------------------------------------------------------------------------

@pytest.mark.parametrize("split", sorted(SPLITS))
def test_every_problem_is_solvable_and_its_reference_grades_correct(split):
    lo, hi, _ = SPLITS[split]
    for p in generate(300, split=split, seed=7):
        assert lo <= len(p.ops) <= hi
        assert all(0 <= v <= 99 for v in p.values)
        assert grade(p.reference_summary(), p.answer)
        assert not grade(p.reference_summary(), p.answer + 1)


def test_reference_trace_has_one_thinking_step_per_operation(tokenizer):
    p = Problem(7, (("+", 5), ("*", 2), ("-", 3)))
    assert p.question == "Start with 7. Add 5, then multiply by 2, then subtract 3. What is the result?"
    assert p.answer == 21
    trace = Trace.from_segments(p.question, p.reference_thinking(), p.reference_summary(),
                                tokenizer, format="think-tags")
    assert [s.text for s in trace.steps if s.segment == "thinking"] == [
        "We start with 7.", "7 plus 5 makes 12.", "12 times 2 makes 24.", "24 minus 3 makes 21."]


@pytest.mark.parametrize("text,answer,expected", [
    ("The result is \\boxed{21}.", 21, True),
    ("The result is \\boxed{ 21 }.", "21", True),
    ("\\boxed{2} then \\boxed{21}", 21, True),
    ("\\boxed{21} then \\boxed{2}", 21, False),
    ("The result is 21.", 21, False),
    ("\\boxed{210}", 21, False),
])
def test_grading_is_exact(text, answer, expected):
    assert grade(text, answer) is expected


def test_generation_is_reproducible_and_splits_differ():
    assert generate(5, seed=1) == generate(5, seed=1)
    assert generate(5, seed=1) != generate(5, seed=2)
    assert extract_answer("no box") is None


# ---- bundled model ----------------------------------------------------------------------

def test_bundled_model_is_inside_the_package_and_small():
    folder = BUNDLED["tiny-lrm"]
    assert folder.is_relative_to(Path(__import__("stepsal_lens").__file__).parent)
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 10 * 2**20, f"tiny-lrm is {size / 2**20:.1f} MiB"


def test_bundled_model_reaches_its_documented_accuracy(monkeypatch):
    from stepsal_lens.zoo.accuracy import accuracy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_lrm("tiny-lrm", device="cpu")
    assert info_of(model).format.name == "think-tags"
    got = accuracy(model, "id", n=50, seed=EVAL["ci_check"]["seed"])["accuracy"]
    stated = EVAL["ci_check"]["accuracy"]
    assert got >= stated - 0.05, f"tiny-lrm: {got:.2f} on 50 in-distribution problems, docs say {stated:.2f}"


def test_training_recipe_lowers_the_loss(tmp_path):
    from stepsal_lens.zoo.train import train

    record = train(tmp_path / "m", steps=12, batch_size=8, lr=3e-3, log_every=1, progress=False)
    losses = [r["loss"] for r in record["losses"]]
    assert losses[-1] < losses[0] - 0.5, losses
    model = load_lrm(tmp_path / "m", device="cpu")  # what it writes loads through the real path
    assert model.cfg.n_layers == 4


# ---- demo -------------------------------------------------------------------------------

class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--n", "6", "--out", str(out), "--seed", "3"]) == 0
    for name in ("report.html", "traces.jsonl", "metrics.csv"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "maps_correct.png").exists() or (out / "maps_wrong.png").exists()
    records = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert {"question", "text", "answer", "prediction", "correct", "split"} <= set(r)
        assert isinstance(r["correct"], bool)
    raw = (out / "report.html").read_text()
    parser = _Collect()
    parser.feed(raw)
    assert "img" in parser.tags and "table" in parser.tags
    text = records[0]["text"]
    assert "<think>" in text and "&lt;think&gt;" in raw and "<think>" not in raw
    assert text.split("\n")[0] in "".join(parser.text)
    assert "src=\"http" not in raw  # self-contained
    if "Correct minus wrong" in raw:
        assert "Length confound" in raw
    # StepFlow on the same questions: its own traces, stats and a section in the report
    flow = [json.loads(x) for x in (out / "traces_stepflow.jsonl").read_text().splitlines()]
    assert [r["question"] for r in flow] == [r["question"] for r in records]
    assert all(r["stats"]["oeb"]["eligible_rows"] > 0 for r in flow if r["error"] is None)
    assert all(r["stats"]["oeb"]["triggers"] == 0 for r in records)
    assert "StepFlow" in parser.text and "McNemar" in "".join(parser.text)
    assert (out / "stepflow_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_with_a_jsonl_file(tmp_path):
    data = tmp_path / "q.jsonl"
    rows = [{"question": p.question, "answer": p.answer} for p in generate(3, seed=5)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["demo", "--n", "3", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--no-stepflow"]) == 0
    assert not (tmp_path / "o" / "traces_stepflow.jsonl").exists()
    records = [json.loads(x) for x in (tmp_path / "o" / "traces.jsonl").read_text().splitlines()]
    assert [r["question"] for r in records] == [r["question"] for r in rows]
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\n')
    assert main(["demo", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x")]) == 2


def test_render_matches_training_format():
    p = generate(1, seed=0)[0]
    from stepsal_lens.zoo.train import render

    prompt, text = render(p)
    fmt = get_format("think-tags")
    assert text.startswith(prompt) and fmt.parse(text).summary == p.reference_summary()


def test_report_tables_keep_small_p_values():
    """p-values are never rounded to 0 in the report."""
    import pandas as pd

    from stepsal_lens.apps.report import _table

    html = _table(pd.DataFrame({"metric": ["lock_in"], "p_value": [3.2e-9]}), floats="{:.3g}")
    assert "3.2e-09" in html and ">0<" not in html
