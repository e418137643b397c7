"""Answer extraction and grading, benchmark file layouts, resumable runs, McNemar."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from stepsal_lens import StepSalError
from stepsal_lens.eval.problems import Problem, load_problems
from stepsal_lens.eval.runs import compare_runs, evaluate
from stepsal_lens.eval.grading import extract_answer, grade

# (prediction, reference, kind, expected)
GRADING = [
    ("\\frac{1}{2}", "0.5", "math", True),
    ("\\dfrac{3}{4}", "\\frac34", "math", True),
    ("1,000", "1000", "math", True),
    ("5", "5.0", "math", True),
    ("x = 5", "5", "math", True),
    ("10\\%", "10", "math", True),
    ("90^\\circ", "90", "math", True),
    ("2\\sqrt{2}", "\\sqrt{8}", "math", True),
    ("\\pi/2", "\\frac{\\pi}{2}", "math", True),
    ("x^2+2x+1", "(x+1)^2", "math", True),
    ("(1, 2)", "(1,2)", "math", True),
    ("\\text{12 apples}", "12 apples", "math", True),
    ("(B)", "B", "choice", True),
    ("\\text{(C)}", "C", "choice", True),
    ("b", "B", "choice", False),
    ("3", "4", "math", False),
    ("0.333", "\\frac13", "math", False),
    ("12", "1,2", "math", False),
    ("(2, 1)", "(1, 2)", "math", False),
    ("A", "B", "choice", False),
    (None, "4", "math", False),
]


@pytest.mark.parametrize("prediction, reference, kind, expected", GRADING)
def test_grading_table(prediction, reference, kind, expected):
    assert grade(prediction, reference, kind) is expected


@pytest.mark.parametrize("text, kind, expected", [
    ("So \\boxed{\\frac{1}{2}} is it.", "math", "\\frac{1}{2}"),
    ("First \\boxed{3}, no wait, \\boxed{4}.", "math", "4"),
    ("The answer is 42.", "math", "42"),
    ("Answer: $x=3$", "math", "x=3"),
    ("Therefore the final answer is: 7\nDone.", "math", "7"),
    ("no answer here", "math", None),
    ("The answer is (C).", "choice", "C"),
    ("I pick \\boxed{B}", "choice", "B"),
    ("Between (A) and (D), it must be (D)", "choice", "D"),
])
def test_extraction(text, kind, expected):
    assert extract_answer(text, kind) == expected


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_benchmark_layouts(tmp_path):
    math500 = _write(tmp_path / "math500.jsonl", [
        {"problem": "What is $1+1$?", "solution": "...", "answer": "2", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/1.json"}])
    aime24 = _write(tmp_path / "aime24.parquet", [
        {"ID": "2024-I-1", "Problem": "Find n.", "Solution": "...", "Answer": 204}])
    aime25 = _write(tmp_path / "aime25.jsonl", [{"id": 3, "question": "Find m.", "answer": "70"}])
    amc = _write(tmp_path / "amc23.parquet", [{"id": 0, "question": "How many?", "answer": 27.0,
                                               "url": "x"}])
    gpqa_rows = [{"Record ID": f"rec{i}", "Question": f"Which one {i}?",
                  "Correct Answer": "right", "Incorrect Answer 1": "w1",
                  "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"} for i in range(8)]
    gpqa = _write(tmp_path / "gpqa_diamond.csv", gpqa_rows)

    [p] = load_problems(math500)
    assert (p.id, p.question, p.answer, p.kind) == ("test/algebra/1.json", "What is $1+1$?", "2", "math")
    [p] = load_problems(aime24)
    assert (p.id, p.answer) == ("2024-I-1", "204")
    [p] = load_problems(aime25)
    assert (p.id, p.question, p.answer) == ("3", "Find m.", "70")
    [p] = load_problems(amc)
    assert p.answer == "27"  # stored as a float
    problems = load_problems(gpqa)
    assert all(p.kind == "choice" and p.choices[ord(p.answer) - 65] == "right" for p in problems)
    assert len({p.answer for p in problems}) > 1  # the correct option is shuffled
    assert load_problems(gpqa) == problems  # ... the same way every time
    assert "(A) " in problems[0].prompt_question() and "\\boxed{}" in problems[0].prompt_question()
    assert len(load_problems(gpqa, limit=3)) == 3


def test_bad_data_is_named(tmp_path):
    with pytest.raises(StepSalError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")
    bad = _write(tmp_path / "bad.jsonl", [{"text": "hi", "label": 1}])
    with pytest.raises(StepSalError, match="expected a question field"):
        load_problems(bad)
    with pytest.raises(StepSalError, match="use .jsonl"):
        load_problems(_write(tmp_path / "x.txt", []))


def test_evaluate_resumes_and_summarises(tmp_path, tiny_lrm):
    problems = load_problems("tiny:id", limit=4)
    out = tmp_path / "run"
    run = evaluate(tiny_lrm, problems, out, max_new_tokens=96, progress=False)
    assert run.summary["n"] == 4 and 0 <= run.accuracy <= 1
    assert [r["id"] for r in run.records] == [p.id for p in problems]
    for r, p in zip(run.records, problems):
        assert r["correct"] == grade(r["prediction"], p.answer)
    # simulate an interrupt: a marked record kept, one record lost, one line cut short
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = json.loads(lines[0]) | {"completion": "KEPT"}
    (out / "results.jsonl").write_text(json.dumps(kept) + "\n" + lines[1] + "\n" + lines[2][:20])
    resumed = evaluate(tiny_lrm, problems, out, max_new_tokens=96, progress=False)
    assert resumed.records[0]["completion"] == "KEPT"  # not generated again
    assert [r["id"] for r in resumed.records] == [p.id for p in problems]
    assert [r["correct"] for r in resumed.records] == [r["correct"] for r in run.records]
    assert json.loads((out / "summary.json").read_text())["n"] == 4
    with pytest.raises(StepSalError, match="other inputs or settings: max_new_tokens: 96 "
                                           "before, 64 now"):
        evaluate(tiny_lrm, problems, out, max_new_tokens=64, progress=False)
    with pytest.raises(StepSalError, match="temperature"):
        evaluate(tiny_lrm, problems, tmp_path / "x", samples=2)


def test_wilson_interval_and_mcnemar(tmp_path):
    def write_run(name, correct):
        d = tmp_path / name
        d.mkdir()
        (d / "results.jsonl").write_text("".join(
            json.dumps({"id": str(i), "sample": 0, "correct": c, "source": "s", "kind": "math",
                        "finished": True, "n_completion_tokens": 1, "prediction": None,
                        "grading_error": None}) + "\n"
            for i, c in enumerate(correct)))
        (d / "run.json").write_text(json.dumps({"problems": "sha256:same", "n_problems": 29}))
        return d

    a = write_run("a", [True] * 10 + [False] * 10 + [True] * 8 + [False])
    b = write_run("b", [True] * 10 + [False] * 10 + [False] * 8 + [True])
    result = compare_runs(a, b)
    assert (result["n"], result["a_only"], result["b_only"]) == (29, 8, 1)
    exact = 2 * sum(math.comb(9, k) for k in range(2)) / 2**9
    assert result["mcnemar_p"] == pytest.approx(exact)
    with pytest.raises(StepSalError, match="not an evaluation run"):
        compare_runs(tmp_path, b)

    from stepsal_lens.eval.runs import _wilson

    k, n, z = 30, 50, 1.959963984540054
    p = k / n
    centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = _wilson(k, n)
    assert low == pytest.approx((centre - half) / (1 + z * z / n))
    assert high == pytest.approx((centre + half) / (1 + z * z / n))


def test_problem_prompt():
    p = Problem("1", "Pick one.", "B", "choice", ("x", "y"))
    assert p.prompt_question().startswith("Pick one.\n\n(A) x\n(B) y\n")


def test_problems_fingerprint_covers_every_field_but_the_source_name():
    import dataclasses

    from stepsal_lens.eval.code.lcb import CodeProblem, CodeTest
    from stepsal_lens.eval.runs import problems_fingerprint

    base = load_problems("tiny:id", limit=2)
    fp = problems_fingerprint(base)
    assert problems_fingerprint([dataclasses.replace(base[0], source="copy.jsonl"),
                                 base[1]]) == fp  # a renamed copy: the same problems
    for change in ({"answer": "x"}, {"question": "?"}, {"instruction": " Think."}, {"id": "other"}):
        assert problems_fingerprint([dataclasses.replace(base[0], **change), base[1]]) != fp
    code = CodeProblem("p", "Add.", "", "code", tests=(CodeTest("1 2", "3", "stdin"),))
    edited = dataclasses.replace(code, tests=(CodeTest("1 2", "4", "stdin"),))
    assert problems_fingerprint([code]) != problems_fingerprint([edited])
