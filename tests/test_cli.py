"""`stepsal analyze`: the file contract other tools read."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from stepsal_lens import Trace
from stepsal_lens.cli import main

TRACE = {"question": "Start with 7. Add 5. What is the result?",
         "thinking": "We start with the number 7. Adding 5 to 7 gives 12 in total.",
         "summary": "The result is 12.\n\nSo the answer is \\boxed{12}."}


def test_analyze_writes_the_contract(tmp_path, checkpoints, models):
    trace_file = tmp_path / "trace.json"
    trace_file.write_text(json.dumps(TRACE))
    out = tmp_path / "out"
    rc = main(["analyze", "--model", str(checkpoints["llama"]), "--trace", str(trace_file),
               "--out", str(out), "--format", "deepseek-r1", "--target", "summary"])
    assert rc == 0
    tensors = load_file(out / "step_saliency.safetensors")
    steps = json.loads((out / "steps.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    expected = Trace.from_segments(TRACE["question"], TRACE["thinking"], TRACE["summary"],
                                   models["llama"])
    assert tensors["token_ids"].tolist() == expected.token_ids.tolist()
    assert tensors["maps"].dtype.is_floating_point and tensors["maps"].shape == (2, 4, expected.n_steps, expected.n_steps)
    assert {k: steps[k] for k in ("format", "target", "n_layers", "n_heads")} == {
        "format": "deepseek-r1", "target": "summary", "n_layers": 2, "n_heads": 4}
    assert [(s["segment"], s["token_start"], s["token_end"]) for s in steps["steps"]] == [
        (s.segment, *s.token_span) for s in expected.steps]
    assert len(metrics["lock_in"]) == 2 and "decay" in metrics
    assert (out / "maps.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_text_trace_and_low_memory(tmp_path, checkpoints, models):
    text = models["qwen3"].stepsal_format.render(TRACE["question"], TRACE["thinking"],
                                                  TRACE["summary"])
    (tmp_path / "t.json").write_text(json.dumps({"text": text}))
    assert main(["analyze", "--model", str(checkpoints["qwen3"]), "--trace",
                 str(tmp_path / "t.json"), "--out", str(tmp_path / "o"), "--format", "qwen3",
                 "--low-memory"]) == 0
    assert json.loads((tmp_path / "o" / "steps.json").read_text())["format"] == "qwen3"


@pytest.mark.parametrize("doc,message", [
    ({"question": "q"}, "missing \\['thinking', 'summary'\\]"),
    ({"text": "no markers here"}, "not found"),
    ([1, 2], "must hold a JSON object"),
])
def test_analyze_errors_are_one_line(tmp_path, capsys, checkpoints, doc, message):
    (tmp_path / "t.json").write_text(json.dumps(doc))
    rc = main(["analyze", "--model", str(checkpoints["qwen2"]), "--trace",
               str(tmp_path / "t.json"), "--out", str(tmp_path / "o"), "--format", "qwq"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("stepsal: error:")
    import re

    assert re.search(message, err[-1])
    assert not (tmp_path / "o").exists()


def test_analyze_missing_model(tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps(TRACE))
    rc = main(["analyze", "--model", str(tmp_path / "nope"), "--trace", str(tmp_path / "t.json"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "neither a local folder" in capsys.readouterr().err
