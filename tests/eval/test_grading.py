"""The one answer parser and the grader: extraction, grading, time limits, the labelled
corpus against plain math-verify, `stepsal grade`, eval's grading errors, the answer target."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest

from stepsal_lens import StepSalError, Trace
from stepsal_lens.eval.grading import extract_answer, grade, grade_output, judge
from stepsal_lens.segments.answers import find_answer, find_boxed
from stepsal_lens.apps.cli import main

CORPUS = Path(__file__).parent / "data" / "grading_corpus.jsonl"

# (text, kind, gold or None, expected answer)
EXTRACTION = [
    ("So \\boxed{\\frac{1}{2}} is it.", "math", None, "\\frac{1}{2}"),
    ("$\\boxed{\\dfrac{\\sqrt{3}}{2}}$", "math", None, "\\dfrac{\\sqrt{3}}{2}"),
    ("\\boxed{\\left\\{ 1, 2 \\right\\}}", "math", None, "\\left\\{ 1, 2 \\right\\}"),
    ("\\fbox{x^{2}}", "math", None, "x^{2}"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "math", None,
     "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("First \\boxed{3}, no wait, \\boxed{4}.", "math", None, "4"),
    ("First \\boxed{3}, no wait, \\boxed{4}.", "math", "3, 4", "3, 4"),
    ("The discriminant is \\boxed{9}; the roots are \\boxed{1} and \\boxed{-2}.", "math",
     "-2, 1", "1, -2"),
    ("The answer is 42.", "math", None, "42"),
    ("Answer: $x=3$", "math", None, "x=3"),
    ("Therefore the final answer is: 7\nDone.", "math", None, "7"),
    ("**Final answer:** 204", "math", None, "204"),
    ("**Final Answer**\n\n$$\n\\frac{7}{2}\n$$", "math", None, "\\frac{7}{2}"),
    ("Final Answer: The final answer is $11$. I hope it is correct.", "math", None, "11"),
    ("**Final answer:** Yes", "math", None, "Yes"),
    ("no answer here", "math", None, None),
    ("", "math", None, None),
    ("**Answer: D**", "choice", None, "D"),
    ("the answer is A, not B", "choice", None, "A"),
    ("Answer: \\boxed{C}", "choice", None, "C"),
    ("$\\boxed{\\text{(D)}}$", "choice", None, "D"),
    ("The answer is (C).", "choice", None, "C"),
    ("I pick \\boxed{B}", "choice", None, "B"),
    ("Between (A) and (D), it must be (D)", "choice", None, "D"),
    ("**Final Answer:** A) 1/4", "choice", None, "A"),
    ("The correct option is **C**.", "choice", None, "C"),
    ("The correct answer is \\textbf{(A)}.", "choice", None, "A"),
    ("Option D is tempting; the answer is therefore B.", "choice", None, "B"),
    ("First I thought \\boxed{B}, but no.\n\n\\boxed{D}", "choice", None, "D"),
    ("A careful check shows nothing decisive.", "choice", None, None),
    ("Answer: I think it is C", "choice", None, None),
]


@pytest.mark.parametrize("text, kind, gold, expected", EXTRACTION)
def test_extraction(text, kind, gold, expected):
    assert extract_answer(text, kind, gold=gold) == expected


@pytest.mark.parametrize("text, kind", [(t, k) for t, k, g, e in EXTRACTION if e and g is None])
def test_found_answer_is_its_span(text, kind):
    found = find_answer(text, kind)
    assert found is not None and text[found.start:found.end] == found.text


def test_boxes_balance_braces():
    text = "a \\boxed{\\frac{1}{2}} b \\boxed{\\{1, \\frac{3}{4}\\}} c \\boxed{unclosed {"
    assert [a.text for a in find_boxed(text)] == ["\\frac{1}{2}", "\\{1, \\frac{3}{4}\\}"]
    with pytest.raises(StepSalError, match="unknown answer kind 'letter'"):
        find_answer("x", kind="letter")


# (prediction, gold, kind, expected status)
GRADING = [
    ("\\frac{1}{2}", "0.5", "math", "correct"),
    ("5\\text{ cm}", "5", "math", "correct"),
    ("12 \\text{ inches}", "12", "math", "correct"),
    ("1{,}000", "1000", "math", "correct"),
    ("1,000,000", "10^6", "math", "correct"),
    ("\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
     "math", "correct"),
    ("\\begin{bmatrix} 2 \\\\ 1 \\end{bmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
     "math", "wrong"),
    ("Yes", "\\text{yes}", "math", "correct"),
    ("\\text{no}", "\\text{yes}", "math", "wrong"),
    ("\\pm 2", "2, -2", "math", "correct"),
    ("2", "\\pm 2", "math", "wrong"),
    ("3, 1, 2", "1, 2, 3", "math", "correct"),
    ("\\{3, 1\\}", "\\{1, 3\\}", "math", "correct"),
    ("(2, 1)", "(1, 2)", "math", "wrong"),
    ("[-2, 7]", "[-2,7]", "math", "correct"),
    ("(-2, 7)", "[-2, 7]", "math", "wrong"),
    ("\\$18.90", "18.9", "math", "correct"),
    ("25\\%", "25", "math", "correct"),
    ("90^\\circ", "90", "math", "correct"),
    ("073", "73", "math", "correct"),
    ("\\textbf{(C) } 18", "18", "math", "correct"),
    ("y = 2x + 3", "2x+3", "math", "correct"),
    ("(x+5)(x+2)", "x^2+7x+10", "math", "correct"),
    ("0.333", "\\frac13", "math", "wrong"),
    ("12", "1,2", "math", "wrong"),
    ("\\text{Sunday}", "Sunday", "math", "correct"),
    ("\\text{Saturday}", "Sunday", "math", "wrong"),
    ("(B)", "B", "choice", "correct"),
    ("\\text{(C)}", "C", "choice", "correct"),
    ("b", "B", "choice", "wrong"),
    ("A", "B", "choice", "wrong"),
    (None, "4", "math", "wrong"),
]


@pytest.mark.parametrize("prediction, gold, kind, expected", GRADING)
def test_grading_table(prediction, gold, kind, expected):
    verdict = judge(prediction, gold, kind)
    assert verdict.status == expected, verdict
    assert grade(prediction, gold, kind) is (expected == "correct")


@pytest.mark.parametrize("pathological", ["10^{10^{10}}", "9^{9^{9^{9}}}", "9^9^9^9"])
def test_pathological_answers_return(pathological):
    t0 = time.monotonic()
    verdict = judge(pathological, "7", timeout=3)
    assert time.monotonic() - t0 < 15
    assert not verdict.correct and verdict.status in ("wrong", "error")
    if verdict.status == "error":
        assert "time limit" in verdict.error and "--timeout" in verdict.error


def test_grading_off_the_main_thread():
    """math-verify's own time limit needs the main thread; ours does not."""
    out = []
    worker = threading.Thread(target=lambda: out.append(
        (judge("10^{10^{10}}", "5", timeout=3), judge("\\frac{2}{4}", "0.5"))))
    t0 = time.monotonic()
    worker.start()
    worker.join(30)
    assert not worker.is_alive() and time.monotonic() - t0 < 15
    slow, fast = out[0]
    assert slow.status == "error" and fast.status == "correct"


def test_overrun_kills_the_worker_and_grading_goes_on():
    from stepsal_lens.eval.grading import _WORKER

    _WORKER.compare([("1", "1")], timeout=30)  # started
    t0 = time.monotonic()
    assert _WORKER.compare([("5", "10^{10^{10}}")], timeout=0.5) == ["killed"]
    assert time.monotonic() - t0 < 5
    assert _WORKER.compare([("\\frac{1}{2}", "0.5")], timeout=30) == ["equal"]


def _math_verify(output: str, answer: str, kind: str) -> bool:
    """Plain math-verify as its README uses it (main thread, its own 5 s alarm)."""
    import logging

    from math_verify import parse, verify
    from math_verify.parser import StringExtractionConfig

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if kind == "choice":
        config = [StringExtractionConfig()]
        return bool(verify(parse(answer, extraction_config=config),
                           parse(output, extraction_config=config)))
    return bool(verify(parse(f"${answer}$"), parse(output)))


def test_corpus_accuracy_beats_math_verify():
    rows = [json.loads(x) for x in CORPUS.read_text().splitlines() if x.strip()]
    assert len(rows) >= 100 and {r["kind"] for r in rows} == {"math", "choice"}
    assert 0.2 < sum(r["label"] for r in rows) / len(rows) < 0.9  # both labels well present
    ours = [grade_output(r["output"], r["answer"], r["kind"]).correct == r["label"] for r in rows]
    theirs = [_math_verify(r["output"], r["answer"], r["kind"]) == r["label"] for r in rows]
    acc, base = sum(ours) / len(rows), sum(theirs) / len(rows)
    print(f"\ngrading corpus (n={len(rows)}): stepsal_lens {acc:.3f}, math-verify {base:.3f}")
    missed = [r["output"][-60:] for r, ok in zip(rows, ours) if not ok]
    assert acc >= base, f"ours {acc:.3f} < math-verify {base:.3f}; ours missed {missed}"
    assert acc >= 0.95, f"accuracy {acc:.3f} under the floor 0.95; missed {missed}"


def test_grade_command(tmp_path, capsys):
    rows = [{"output": "So \\boxed{\\frac{1}{2}}.", "answer": "0.5", "id": 1},
            {"output": "**Answer: D**", "answer": "D", "kind": "choice"},
            {"output": "the answer is A, not B", "answer": "B", "kind": "choice"},
            {"output": "Final: $\\boxed{10^{10^{10}}}$", "answer": 5, "kind": "math"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["grade", str(src), "--out", str(out), "--timeout", "2"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [{k: g[k] for k in r} for g, r in zip(got, rows)] == rows  # the input, kept
    assert [(g["prediction"], g["correct"]) for g in got] == [
        ("\\frac{1}{2}", True), ("D", True), ("A", False), ("10^{10^{10}}", False)]
    assert ["grading_error" in g for g in got] == [False, False, False, True]
    assert "2/4 correct" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ('{"answer": "3"}', r"in.jsonl:2 lacks 'output'"),
    ('{"output": "x", "answer": "3", "kind": "letter"}',
     r"in.jsonl:2 has kind 'letter'; use one of"),
    ('{"output": "x"', r"in.jsonl:2 is not valid JSON"),
    ('[1, 2]', r"in.jsonl:2 holds a list, not an object"),
    ('{"output": ["x"], "answer": "3"}', r"in.jsonl:2: 'output' must be the model's text"),
])
def test_grade_command_bad_lines(tmp_path, capsys, line, message):
    import re

    src = tmp_path / "in.jsonl"
    src.write_text('{"output": "\\\\boxed{3}", "answer": "3"}\n' + line + "\n")
    rc = main(["grade", str(src), "--out", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("stepsal: error:")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out.jsonl").exists()


def test_eval_records_grading_errors(tmp_path, tiny_lrm):
    from stepsal_lens.eval.runs import evaluate
    from stepsal_lens.eval.problems import load_problems

    [plain, tower] = load_problems("tiny:id", limit=2)
    tower = dataclasses.replace(tower, answer="10^{10^{10}}")
    run = evaluate(tiny_lrm, [plain, tower], tmp_path / "run", max_new_tokens=96,
                   grading_timeout=2, progress=False)
    first, second = run.records
    assert first["grading_error"] is None
    assert first["correct"] == grade(first["prediction"], plain.answer)
    assert second["prediction"] is not None, second["completion"]
    assert not second["correct"] and "time limit" in second["grading_error"]
    assert run.summary["grading_errors"] == 1
    assert json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[1])[
        "grading_error"] == second["grading_error"]


def test_answer_target_covers_the_whole_fraction(models):
    from stepsal_lens.lens.targets import answer_token_positions

    model = models["qwen2"]
    trace = Trace.from_segments("What is one half?", "We need half of one. That is 0.5 here.",
                                "So the answer is \\boxed{\\frac{1}{2}}.", model)
    pos = answer_token_positions(trace).tolist()
    assert pos == sorted(pos) and pos == list(range(pos[0], pos[-1] + 1))  # contiguous
    lo, hi = trace.offsets[pos[0]][0], trace.offsets[pos[-1]][1]
    start = trace.text.rindex("\\frac{1}{2}")
    assert lo <= start and hi >= start + len("\\frac{1}{2}"), trace.text[lo:hi]
    assert "boxed" not in trace.text[lo:hi] and "." not in trace.text[lo:hi]  # nothing more


def test_demo_grades_data_files_with_the_grader(tmp_path, tiny_lrm):
    """`stepsal demo --data`: "12.0" is a right answer to "12" (no exact string match)."""
    from stepsal_lens.apps.demo import run_demo
    from stepsal_lens.zoo.task import make_problems

    problems = make_problems(3, seed=5)
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"question": p.question, "answer": f"{p.answer}.0"})
                              for p in problems))
    result = run_demo(tiny_lrm, data=data, out=tmp_path / "o", stepflow=None, progress=False,
                      max_new_tokens=96)
    for rec, p in zip(result.records, problems):
        assert rec["correct"] == grade(rec["prediction"], f"{p.answer}.0")
        assert rec["correct"] == (rec["prediction"] == str(p.answer)), rec["prediction"]
    assert any(rec["correct"] for rec in result.records)  # tiny-lrm solves some of them
    with pytest.raises(StepSalError, match="has kind 'letter'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question": "q", "answer": "A", "kind": "letter"}\n')
        run_demo(tiny_lrm, data=bad, out=tmp_path / "x", stepflow=None, progress=False)
