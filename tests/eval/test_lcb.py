"""LiveCodeBench problems: the safe pickle loader, release and plain rows, date windows,
prompts, code extraction, and `stepsal eval` / `grade` / `compare` end to end on canned
outputs (tiny models cannot write code)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib

import pytest

from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.code.lcb import (CodeProblem, decode_pickled_string, extract_code,
                                        filter_dates, lcb_prompt)
from stepsal_lens.eval.problems import load_problems


# ---- the pickle loader --------------------------------------------------------------------

@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("text", ["", "x", "é\n\"ü\" 数学", "y" * 300, "z" * 70000,
                                  json.dumps([{"input": "1\n", "output": "2\n"}])])
def test_pickled_strings_of_every_protocol_decode(protocol, text):
    assert decode_pickled_string(pickle.dumps(text, protocol=protocol)) == text


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_payload_that_would_run_code_is_refused_and_nothing_runs(protocol, tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps(_Evil(marker), protocol=protocol)
    with pytest.raises(StepSalError, match=r"refusing pickle opcode (GLOBAL|STACK_GLOBAL|"
                                           r"SHORT_BINUNICODE|BINUNICODE)|more than one string"):
        decode_pickled_string(payload)
    assert not marker.exists()
    with pytest.raises(StepSalError, match="refusing pickle opcode (GLOBAL|STACK_GLOBAL)"):
        decode_pickled_string(pickle.dumps(os.system, protocol=protocol))
    with pytest.raises(StepSalError, match="refusing pickle opcode"):
        decode_pickled_string(pickle.dumps(["a", "b"], protocol=protocol))
    with pytest.raises(StepSalError, match="refusing pickle opcode"):
        decode_pickled_string(pickle.dumps(7, protocol=protocol))


def test_broken_pickles_are_refused():
    good = pickle.dumps("hello", protocol=4)
    with pytest.raises(StepSalError, match="not a valid pickle|holds no string"):
        decode_pickled_string(good[:-3])
    with pytest.raises(StepSalError, match="not a valid pickle"):
        decode_pickled_string(b"\xff\xfe junk")


# ---- rows ---------------------------------------------------------------------------------

def _pack(tests) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def _lcb_row(qid, date, *, functional=False, private=None, **extra):
    if functional:
        public = [{"input": "[2, 7, 11]\n9", "output": "[0, 1]", "testtype": "functional"}]
        meta = json.dumps({"func_name": "twoSum"})
        starter = "class Solution:\n    def twoSum(self, nums, target):\n        "
    else:
        public = [{"input": "2\n", "output": "4\n", "testtype": "stdin"}]
        meta, starter = "{}", ""
    row = {"question_title": qid, "question_content": f"Problem {qid}.", "platform":
           "leetcode" if functional else "atcoder", "question_id": qid, "contest_id": "c1",
           "contest_date": date, "starter_code": starter,
           "difficulty": "medium" if functional else "easy",
           "public_test_cases": json.dumps(public),
           "private_test_cases": private if private is not None else _pack(
               [{"input": "3\n", "output": "9\n", "testtype": "stdin"}] if not functional else
               [{"input": "[1, 1]\n2", "output": "[0, 1]", "testtype": "functional"}]),
           "metadata": meta}
    row.update(extra)
    return row


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_release_rows_with_pickled_private_tests(tmp_path):
    path = _write(tmp_path / "test.jsonl", [_lcb_row("abc1", "2023-08-05T00:00:00"),
                                            _lcb_row("lc2", "2024-03-02T00:00:00",
                                                     functional=True)])
    a, b = load_problems(path)
    assert isinstance(a, CodeProblem) and a.kind == "code"
    assert [t.input for t in a.tests] == ["2\n", "3\n"] and a.n_public == 1
    assert (a.platform, a.difficulty, a.func_name) == ("atcoder", "easy", None)
    assert b.func_name == "twoSum" and b.tests[1].testtype == "functional"
    assert "starter code" in b.prompt_question() and "class Solution" in b.prompt_question()
    assert "stdin" in a.prompt_question() and "# YOUR CODE HERE" in a.prompt_question()


def test_private_tests_as_plain_json_and_the_plain_form(tmp_path):
    row = _lcb_row("x", "2024-01-01T00:00:00",
                   private=json.dumps([{"input": "5\n", "output": "25\n", "testtype": "stdin"}]))
    plain = {"id": "p1", "question": "Print n squared.", "tests": [
        {"input": "4", "output": "16", "testtype": "stdin"}], "platform": "mine"}
    a, b = load_problems(_write(tmp_path / "mixed.jsonl", [row, plain]))
    assert [t.output for t in a.tests] == ["4\n", "25\n"]
    assert (b.id, b.tests[0].output, b.platform, b.kind) == ("p1", "16", "mine", "code")


def test_a_malicious_private_payload_is_refused_naming_the_line(tmp_path):
    evil = base64.b64encode(zlib.compress(pickle.dumps(_Evil(tmp_path / "ran")))).decode()
    path = _write(tmp_path / "evil.jsonl", [_lcb_row("a", "2024-01-01T00:00:00"),
                                            _lcb_row("b", "2024-01-01T00:00:00", private=evil)])
    with pytest.raises(StepSalError, match=r"evil.jsonl.*2.*private_test_cases: refusing "
                                           r"pickle opcode"):
        load_problems(path)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("row,match", [
    ({"id": "a", "question": "q", "tests": []}, "has no tests"),
    ({"id": "a", "question": "q", "tests": [{"input": "1", "output": "1",
                                             "testtype": "functional"}]}, "no func_name"),
    ({"id": "a", "question": "q", "tests": [{"input": "1"}]}, r"tests\[0\] must be an object"),
    ({"id": "a", "question": "q", "tests": [{"input": "1", "output": "1", "testtype": "x"}]},
     "testtype must be"),
    ({"id": "a", "question": "", "tests": [{"input": "1", "output": "1"}]}, "needs its question"),
])
def test_bad_coding_rows_are_named(tmp_path, row, match):
    with pytest.raises(StepSalError, match=match):
        load_problems(_write(tmp_path / "bad.jsonl", [row]))


def test_bad_private_tests_are_named(tmp_path):
    with pytest.raises(StepSalError, match="neither JSON nor base64"):
        load_problems(_write(tmp_path / "b.jsonl", [_lcb_row("a", "2024-01-01", private="@@@")]))


def test_date_windows_as_livecodebench(tmp_path):
    rows = [_lcb_row(f"q{d}", f"2024-0{d}-01T00:00:00") for d in (1, 3, 5, 7)]
    rows.append(_lcb_row("late", "2024-05-01T12:30:00"))
    problems = load_problems(_write(tmp_path / "d.jsonl", rows))
    ids = lambda ps: [p.id for p in ps]  # noqa: E731
    assert ids(filter_dates(problems, after="2024-03-01")) == ["q3", "q5", "q7", "late"]
    # the end day is compared at midnight, as LiveCodeBench's end_date
    assert ids(filter_dates(problems, before="2024-05-01")) == ["q1", "q3", "q5"]
    assert ids(filter_dates(problems, after="2024-02-01", before="2024-05-02")) == [
        "q3", "q5", "late"]
    with pytest.raises(StepSalError, match="not a date; use YYYY-MM-DD"):
        filter_dates(problems, after="May 2024")
    with pytest.raises(StepSalError, match="no problem has a contest_date in the window"):
        filter_dates(problems, after="2025-01-01")
    with pytest.raises(StepSalError, match="later than --before"):
        filter_dates(problems, after="2024-05-01", before="2024-01-01")


def test_prompts_follow_livecodebench():
    with_starter = lcb_prompt("Q", "class Solution:\n    def f(self):")
    assert with_starter.startswith("You will be given a question (problem specification)")
    assert ("You will use the following starter code to write the solution to the problem "
            "and enclose your code within delimiters.\n```python\nclass Solution:") in with_starter
    plain = lcb_prompt("Q")
    assert "Question: Q\n\nRead the inputs from stdin solve the problem" in plain
    assert plain.endswith("```python\n# YOUR CODE HERE\n```")


@pytest.mark.parametrize("text,code", [
    ("```python\na = 1\n```", "a = 1"),
    ("x\n```\nfirst\n```\ny\n```py\nsecond\nthird\n```\nbye", "second\nthird"),
    ("```python\nonly an opening fence", None),
    ("no fence", None),
    ("```python\n\n```", None),
    (None, None),
])
def test_code_extraction_takes_the_last_block(text, code):
    assert extract_code(text) == code


# ---- end to end ---------------------------------------------------------------------------

SOLUTIONS = {
    "Problem abc1.": "```python\nn = int(input())\nprint(n * n)\n```",  # passes
    "Problem lc2.": ("```python\nclass Solution:\n    def twoSum(self, nums, target):\n"
                     "        seen = {}\n        for i, x in enumerate(nums):\n"
                     "            if target - x in seen:\n"
                     "                return [seen[target - x], i]\n"
                     "            seen[x] = i\n```"),  # passes
    "Problem abc3.": "I could not solve it.",  # no code
}


@pytest.fixture
def canned(monkeypatch):
    """`generate` returns a canned answer per problem (sample 1 of abc1 is wrong)."""
    from stepsal_lens.eval import runs as gen_mod  # evaluate generates through runs.generate
    from stepsal_lens.results.generation import Generation
    from stepsal_lens.segments.formats import get_format

    calls = {"n": 0}

    def fake_generate(model, questions, **kwargs):
        fmt = get_format("think-tags")
        out = []
        for q in questions:
            key = next(k for k in SOLUTIONS if k in q)
            summary = SOLUTIONS[key]
            if key == "Problem abc1." and kwargs.get("seed") is not None and calls["n"] % 2:
                summary = "```python\nprint(0)\n```"
            calls["n"] += 1
            text = fmt.render(q, "Let me think step by step.", "\n\n" + summary)
            prompt = fmt.chat_prompt(q)
            out.append(Generation(prompt, text, [1, 2, 3], 2, True, "think-tags"))
        return out

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    return calls


def test_eval_grade_and_compare_end_to_end(tmp_path, canned, capsys):
    from stepsal_lens.apps.cli import main

    rows = [_lcb_row("abc1", "2024-02-01T00:00:00"),
            _lcb_row("lc2", "2024-03-01T00:00:00", functional=True),
            _lcb_row("abc3", "2024-04-01T00:00:00"),
            _lcb_row("old", "2022-01-01T00:00:00")]
    data = _write(tmp_path / "lcb.jsonl", rows)
    out = tmp_path / "run"
    argv = ["eval", "--model", "random:qwen2", "--data", str(data), "--out", str(out),
            "--samples", "2", "--temperature", "0.7", "--after", "2023-01-01",
            "--code-workers", "2", "--code-timeout", "5", "--max-new-tokens", "4"]
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "pass@1" in err and ("sandbox bwrap" in err or "sandbox unshare" in err), err
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6  # 3 problems in the window x 2 samples
    by = {(r["id"], r["sample"]): r for r in records}
    assert by[("lc2", 0)]["verdict"] == "passed" and by[("lc2", 0)]["correct"] is True
    assert by[("abc3", 1)]["verdict"] == "no_code" and by[("abc3", 1)]["correct"] is False
    assert {by[("abc1", 0)]["verdict"], by[("abc1", 1)]["verdict"]} <= {"passed", "wrong_answer"}
    assert by[("lc2", 0)]["platform"] == "leetcode" and by[("lc2", 0)]["test_results"]
    run = json.loads((out / "run.json").read_text())
    assert run["code"]["sandbox"]["backend"] in ("bwrap", "unshare")
    summary = json.loads((out / "summary.json").read_text())
    code = summary["code"]
    n_abc1 = sum(by[("abc1", s)]["correct"] for s in (0, 1))
    want1 = (n_abc1 / 2 + 1 + 0) / 3
    assert abs(code["pass@k"]["pass@1"]["value"] - want1) < 1e-12, code
    want2 = ((1.0 if n_abc1 else 0.0) + 1 + 0) / 3
    assert abs(code["pass@k"]["pass@2"]["value"] - want2) < 1e-12, code
    assert code["by_platform"]["leetcode"]["pass@1"]["value"] == 1.0
    assert code["by_difficulty"]["easy"]["pass@1"]["value"] == pytest.approx(n_abc1 / 4)
    # resuming does nothing new
    assert main(argv) == 0
    capsys.readouterr()
    # compare pairs code runs like math runs
    assert main(["compare", str(out), str(out)]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["n"] == 6 and cmp["a_only"] == cmp["b_only"] == 0
    # grade: code lines
    lines = [{"output": SOLUTIONS["Problem abc1."], "kind": "code", "id": "g1",
              "tests": [{"input": "3", "output": "9", "testtype": "stdin"}]},
             {"output": "no code", "kind": "code",
              "tests": [{"input": "3", "output": "9", "testtype": "stdin"}]},
             {"output": "\\boxed{4}", "answer": "4"}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, lines)
    assert main(["grade", str(src), "--out", str(dst)]) == 0, capsys.readouterr().err
    graded = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [g["correct"] for g in graded] == [True, False, True]
    assert [g.get("verdict") for g in graded] == ["passed", "no_code", None]
    assert graded[0]["id"] == "g1" and graded[0]["test_results"][0]["status"] == "passed"


def test_grade_refuses_a_bad_code_line_before_running_anything(tmp_path, capsys):
    from stepsal_lens.apps.cli import main

    src = _write(tmp_path / "in.jsonl", [{"output": "```\nprint(1)\n```", "kind": "code"}])
    assert main(["grade", str(src), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "a code line needs 'tests'" in capsys.readouterr().err


# ---- GPQA lines with the option text as gold, or the choices in a separate field ----------

@pytest.mark.parametrize("row,letter,choices", [
    ({"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo", "Bern"],
      "answer": "Paris"}, "B", ("Rome", "Paris", "Oslo", "Bern")),
    ({"question": "q", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": " paris "},
     "B", None),
    ({"question": "q", "choices": ["Rome", "Paris"], "answer": "(B)"}, "B", None),
    ({"question": "q", "choices": ["Rome", "Paris"], "answer": 1}, "B", None),
    ({"question": "q", "choices": ["1", "2", "3"], "answer": "2"}, "B", None),  # text first
    ({"question": "q", "choices": ["1", "2", "3"], "answer": 2}, "C", None),  # a number: index
    ({"question": "q", "options": {"B": "Paris", "A": "Rome"}, "answer": "Paris"}, "B",
     ("Rome", "Paris")),
    ({"question": "q", "choices": {"label": ["A", "B", "C"], "text": ["x y", "z", "w"]},
      "answer": "x  y"}, "A", ("x y", "z", "w")),
    ({"Question": "q", "A": "Rome", "B": "Paris", "C": "Oslo", "D": "Bern",
      "Correct Answer": "Oslo"}, "C", ("Rome", "Paris", "Oslo", "Bern")),
    ({"question": "q", "A": "Rome", "B": "Paris", "answer": "A"}, "A", ("Rome", "Paris")),
])
def test_choice_gold_from_text_letter_or_index(tmp_path, row, letter, choices):
    (p,) = load_problems(_write(tmp_path / "gpqa.jsonl", [row]))
    assert (p.kind, p.answer) == ("choice", letter), p
    if choices is not None:
        assert p.choices == choices
    from stepsal_lens.eval.grading import grade_output

    assert grade_output(f"The answer is \\boxed{{{letter}}}.", p.answer, "choice").correct


@pytest.mark.parametrize("row,match", [
    ({"question": "q", "choices": ["Rome", "Paris"], "answer": "Madrid"}, "neither a letter"),
    ({"question": "q", "choices": ["Rome", "Paris"], "answer": "C"}, "neither a letter"),
    ({"question": "q", "choices": ["Rome", "Rome"], "answer": "Rome"}, "several options"),
    ({"question": "q", "options": {"A": "x", "C": "y"}, "answer": "x"}, "label them A, B"),
    ({"question": "q", "choices": '["Rome", "Paris"]', "answer": "Rome"},
     "'choices' must be a list"),
])
def test_bad_choice_gold_is_named(tmp_path, row, match):
    with pytest.raises(StepSalError, match=match):
        load_problems(_write(tmp_path / "bad.jsonl", [row]))


def test_no_sandbox_must_be_asked_for_and_is_recorded(tmp_path, canned, capsys, monkeypatch):
    from stepsal_lens.apps.cli import main
    from stepsal_lens.eval.code import sandbox as sb

    data = _write(tmp_path / "lcb.jsonl", [_lcb_row("abc1", "2024-02-01T00:00:00")])
    argv = ["eval", "--model", "random:qwen2", "--data", str(data), "--max-new-tokens", "4"]
    # no sandbox on this machine: refused before the model loads, naming the fix
    monkeypatch.setattr(sb, "_PROBED", {"bwrap": "not installed", "unshare": "not installed"})
    assert main(argv + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "no sandbox works on this machine" in err and "--no-sandbox" in err, err
    assert not (tmp_path / "refused").exists()
    assert main(argv + ["--out", str(tmp_path / "open"), "--no-sandbox"]) == 0
    assert "UNSANDBOXED" in capsys.readouterr().err
    run = json.loads((tmp_path / "open" / "run.json").read_text())
    assert run["code"]["sandbox"]["backend"] == "none"
    (rec,) = [json.loads(x) for x in (tmp_path / "open" / "results.jsonl").read_text().split("\n")
              if x]
    assert (rec["verdict"], rec["sandbox"]) == ("passed", "none")
