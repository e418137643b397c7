"""The one JSONL reader and writer: separators inside strings, encodings, cut lines."""

from __future__ import annotations

import json

import pytest

from stepsal_lens import StepSalError
from stepsal_lens.apps.cli import main
from stepsal_lens.results.jsonl import dumps_line, read_jsonl, write_jsonl

# valid JSON strings that str.splitlines() splits
SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


@pytest.mark.parametrize("sep", SEPARATORS, ids=[f"U+{ord(c):04X}" for c in SEPARATORS])
def test_separators_inside_strings_round_trip(tmp_path, sep):
    rows = [{"text": f"a{sep}b", "n": 1}, {"text": "plain"}]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    assert [r for _, r in read_jsonl(f)] == rows
    raw = f.read_text(encoding="utf-8")
    assert raw.count("\n") == 2 and len(raw.splitlines()) == 2  # escaped on disk
    # a file another tool wrote with the separator raw (valid JSON) reads line for line too
    other = tmp_path / "raw.jsonl"
    other.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(other.read_text(encoding="utf-8").splitlines()) > 1 or sep not in "\u2028\u2029\x85"
    assert [r for _, r in read_jsonl(other)] == rows[:1]


@pytest.mark.parametrize("encoding,name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_other_encodings_are_one_clear_error(tmp_path, encoding, name):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n", encoding=encoding)
    with pytest.raises(StepSalError, match=rf"data file '.*d\.jsonl' is {name} text \(it starts "
                                           rf"with a {name} byte-order mark\), not UTF-8; save "
                                           rf"it as UTF-8"):
        read_jsonl(f, what="data file")


def test_latin1_is_one_clear_error_and_a_utf8_bom_is_fine(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes('{"question": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(StepSalError, match=r"is not UTF-8 text: byte 0xe9 at line 1 is not "
                                           r"UTF-8 \(Latin-1 or Windows-1252\?\); save it as UTF-8"):
        read_jsonl(f, what="data file")
    f.write_bytes(b"\xef\xbb\xbf" + '{"q": "caf\u00e9"}\n'.encode())
    assert read_jsonl(f)[0][1] == {"q": "caf\u00e9"}


def test_only_a_cut_last_line_is_tolerated_and_only_when_asked(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(dumps_line({"a": 1}) + '{"a": 2, "b"')
    with pytest.raises(StepSalError, match=r"r\.jsonl:2 is not valid JSON"):
        read_jsonl(f)
    assert [r for _, r in read_jsonl(f, tolerate_cut=True)] == [{"a": 1}]
    f.write_text('{"a": 2, "b"\n' + dumps_line({"a": 1}))  # damage in the middle: never
    with pytest.raises(StepSalError, match=r"r\.jsonl:1 is not valid JSON"):
        read_jsonl(f, tolerate_cut=True)


def test_grade_reads_its_own_output_with_separators(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"output": "line\u2028two \\boxed{2}", "answer": "2",
                               "note": "x\x85y"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["grade", str(src), "--out", str(tmp_path / "g1.jsonl")]) == 0
    assert main(["grade", str(tmp_path / "g1.jsonl"), "--out", str(tmp_path / "g2.jsonl")]) == 0
    [(_, row)] = read_jsonl(tmp_path / "g2.jsonl")
    assert row["correct"] is True and row["note"] == "x\x85y"
    assert main(["grade", str(src), "--out", str(tmp_path / "g1.jsonl")]) == 2  # exists
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["grade", str(src), "--out", str(tmp_path / "g1.jsonl"), "--overwrite"]) == 0


def test_eval_resume_keeps_records_holding_separators(tmp_path, tiny_lrm):
    from stepsal_lens.eval.problems import load_problems
    from stepsal_lens.eval.runs import evaluate

    problems = load_problems("tiny:id", limit=2)
    out = tmp_path / "run"
    evaluate(tiny_lrm, problems, out, max_new_tokens=48, progress=False)
    rows = [r for _, r in read_jsonl(out / "results.jsonl")]
    rows[0]["completion"] = "KEPT\u2028with\x85separators"
    write_jsonl(out / "results.jsonl", rows)
    again = evaluate(tiny_lrm, problems, out, max_new_tokens=48, progress=False)
    assert again.records[0]["completion"] == "KEPT\u2028with\x85separators"


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.update(correct="yes"), r"'correct' must be true or false, not 'yes'"),
    (lambda r: r.pop("correct"), r"lacks \['correct'\]"),
    (lambda r: r.update(sample=True), r"'sample' must be a whole number, not True"),
    (lambda r: r.update(id=3), r"'id' must be a string, not 3"),
])
def test_records_are_read_strictly(tmp_path, edit, message):
    from stepsal_lens.eval.runs import read_records

    rec = {"id": "a", "sample": 0, "source": "s", "kind": "math", "correct": False,
           "finished": True, "n_completion_tokens": 3, "prediction": None,
           "grading_error": None}
    f = write_jsonl(tmp_path / "results.jsonl", [rec])
    assert read_records(f) == [rec]
    edit(rec)
    write_jsonl(f, [rec])
    with pytest.raises(StepSalError, match=r"results\.jsonl:1.*" + message.split("'")[0]):
        read_records(f)
    with pytest.raises(StepSalError, match=message):
        read_records(f)
