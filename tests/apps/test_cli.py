"""`stepsal analyze`: the file contract other tools read."""

from __future__ import annotations

import json

from stepsal_lens.segments.association import info_of
import pytest
from safetensors.torch import load_file

from stepsal_lens import Trace
from stepsal_lens.apps.cli import main

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
    text = info_of(models["qwen3"]).format.render(TRACE["question"], TRACE["thinking"],
                                                  TRACE["summary"])
    (tmp_path / "t.json").write_text(json.dumps({"text": text}))
    assert main(["analyze", "--model", str(checkpoints["qwen3"]), "--trace",
                 str(tmp_path / "t.json"), "--out", str(tmp_path / "o"), "--format", "qwen3",
                 "--low-memory", "--engine", "hook_pattern"]) == 0
    steps = json.loads((tmp_path / "o" / "steps.json").read_text())
    assert steps["format"] == "qwen3"
    assert steps["meta"]["engine"] == "hook_pattern" and steps["meta"]["low_memory"]


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


def test_generate_writes_the_contract(tmp_path, tiny_lrm):
    q = "Start with 3. Add 4, then multiply by 2. What is the result?"
    out = tmp_path / "gen.json"
    assert main(["generate", "--model", "tiny-lrm", "--question", q, "--out", str(out),
                 "--stepflow", "--alpha", "0.1", "--oeb-layers", "0", "--max-new-tokens", "96"]) == 0
    doc = json.loads(out.read_text())
    assert {"prompt", "text", "token_ids", "prompt_len", "segments", "stats"} <= set(doc)
    assert doc["text"] == tiny_lrm.tokenizer.decode(doc["token_ids"])
    assert doc["text"].startswith(doc["prompt"]) and doc["segments"]["question"] == q
    assert doc["stats"]["smi"]["injections"] >= 1
    assert set(doc["stats"]["oeb"]["triggers_per_layer"]) == {"0"}
    off = tmp_path / "off.json"
    assert main(["generate", "--model", "tiny-lrm", "--question", q, "--out", str(off),
                 "--max-new-tokens", "96"]) == 0
    stats = json.loads(off.read_text())["stats"]
    assert stats["oeb"]["triggers"] == 0 and stats["smi"]["injections"] == 0


def test_generate_and_eval_errors(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-lrm", "--question", "x", "--out",
                 str(tmp_path / "g.json"), "--tau-max", "0.2"]) == 2
    assert "add --stepflow" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-lrm", "--out", str(tmp_path / "g.json")]) == 2
    assert main(["eval", "--model", "tiny-lrm", "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_and_compare(tmp_path, capsys):
    base, sf = tmp_path / "base", tmp_path / "sf"
    common = ["--model", "tiny-lrm", "--data", "tiny:id", "--limit", "3", "--max-new-tokens", "96"]
    assert main(["eval", *common, "--out", str(base)]) == 0
    assert main(["eval", *common, "--out", str(sf), "--stepflow"]) == 0
    summary = json.loads((sf / "summary.json").read_text())
    assert summary["n"] == 3 and summary["config"]["stepflow"]["oeb_layers"] == [0]
    capsys.readouterr()
    assert main(["compare", str(base), str(sf)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 3 and 0 <= result["mcnemar_p"] <= 1
