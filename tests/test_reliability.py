"""Reliability matrix (issue 14): every bad input gets one clear error, nothing stale,
nothing duplicated, nothing lost.

Each row of ``CLI_CASES`` is one case of docs/errors.md: the input, and the message the
CLI prints as its one ``stepsal: error:`` line (exit status 2). Where a case must be
refused *before the model is loaded*, ``--model`` names a folder that does not exist
(``NO_MODEL``): had the command loaded the model first, it would print that error
instead. Library-level rows (StepSaliency.load, targets, text) follow in their own tables.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepsal_lens import StepSalError, Trace, step_saliency
from stepsal_lens.apps.cli import main
from stepsal_lens.results.outputs import LOCK_NAME, output_dir, run_lock
from stepsal_lens.results.saliency import StepSaliency
from stepsal_lens.segments.trace import Step
from stepsal_lens.segments.splitters import newline_splitter, paper_splitter

TRACE = {"question": "Start with 7. Add 5. What is the result?",
         "thinking": "We start with the number 7. Adding 5 to 7 gives 12 in total.",
         "summary": "The result is 12.\n\nSo the answer is \\boxed{12}."}


class Ctx:
    """What a case's setup may use: a scratch folder and the fixture checkpoints."""

    def __init__(self, tmp: Path, checkpoints: dict[str, Path]):
        self.tmp, self.checkpoints = tmp, checkpoints
        self.no_model = str(tmp / "never-loaded")  # loading it would fail: proves order
        self.trace = tmp / "trace.json"
        self.trace.write_text(json.dumps(TRACE))
        self.data = tmp / "data.jsonl"
        self.data.write_text(json.dumps({"question": "What is 1+1?", "answer": "2"}) + "\n")

    def analyze(self, *extra: str, model: str | None = None, out: str | None = None):
        return ["analyze", "--model", model or self.no_model, "--trace", str(self.trace),
                "--out", out or str(self.tmp / "out"), *extra]

    def generate(self, *extra: str, out: str | None = None):
        return ["generate", "--model", self.no_model, "--out",
                out or str(self.tmp / "g.json"), *extra]

    def eval(self, *extra: str, data: str | None = None, out: str | None = None):
        return ["eval", "--model", self.no_model, "--data", data or str(self.data),
                "--out", out or str(self.tmp / "run"), *extra]

    def damaged(self, damage) -> str:
        """A copy of the qwen2 fixture checkpoint, damaged."""
        folder = self.tmp / "damaged"
        shutil.copytree(self.checkpoints["qwen2"], folder)
        damage(folder)
        return str(folder)


def _edit_config(**changes):
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k)
            else:
                cfg[k] = v
        (folder / "config.json").write_text(json.dumps(cfg))
    return damage


def _write(name: str, text: str):
    def setup(c: Ctx) -> str:
        (c.tmp / name).write_text(text)
        return str(c.tmp / name)
    return setup


def _bytes(edit):
    def damage(folder: Path) -> None:
        f = folder / "model.safetensors"
        f.write_bytes(edit(f.read_bytes()))
    return damage


def _filled(c: Ctx, name: str, files=("maps_wrong.png", "compare.csv")) -> str:
    folder = c.tmp / name
    folder.mkdir()
    for f in files:
        (folder / f).write_text("from an earlier run")
    return str(folder)


def _run_folder(c: Ctx, **settings) -> str:
    folder = c.tmp / "run"
    folder.mkdir()
    config = {"model": c.no_model, "data": str(c.data), "stepflow": None,
              "max_new_tokens": 256, "samples": 1, "temperature": 0.0, "seed": 0,
              "format": "think-tags", **settings}
    (folder / "run.json").write_text(json.dumps(config))
    return str(folder)


def _corrupt_run_folder(c: Ctx) -> str:
    folder = _run_folder(c)
    (Path(folder) / "run.json").write_text("{")
    return folder


# (id, argv built from Ctx, regex the one error line must match[, marks])
CLI_CASES = [
    # StepFlow settings (validated by StepFlowConfig; the CLI path prints one line)
    ("alpha-nan", lambda c: c.generate("--question", "q", "--stepflow", "--alpha", "nan"),
     r"alpha must be a finite number; got nan"),
    ("alpha-inf", lambda c: c.eval("--stepflow", "--alpha", "inf"),
     r"alpha must be a finite number; got inf"),
    # generation options
    ("temperature-negative", lambda c: c.generate("--question", "q", "--temperature", "-1"),
     r"--temperature must be a finite number >= 0 .*got -1"),
    ("question-empty", lambda c: c.generate("--question", ""),
     r"--question is empty \(''\); pass the question text"),
    ("question-blank", lambda c: c.generate("--question", "  \n"),
     r"--question is empty"),
    ("prompt-file-empty", lambda c: c.generate("--prompt-file", _write("p.txt", " \n")(c)),
     r"prompt file '.*p\.txt' is empty"),
    ("generate-max-new-tokens-0", lambda c: c.generate("--question", "q", "--max-new-tokens", "0"),
     r"--max-new-tokens must be at least 1; got 0"),
    # devices
    ("device-bogus", lambda c: c.analyze("--device", "bogus"),
     r"unknown device 'bogus'; use 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ("device-cuda-without-cuda", lambda c: c.analyze("--device", "cuda"),
     r"device 'cuda' is not available: .*use --device cpu",
     pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    ("dtype-unknown", lambda c: c.analyze("--dtype", "float8"),
     r"unknown dtype 'float8'; choose one of"),
    ("format-unknown", lambda c: c.analyze("--format", "nope"), r"'nope'"),
    # checkpoints (loaded by the real load_lrm; refused before booting)
    ("config-corrupt", lambda c: c.analyze(model=c.damaged(
        lambda f: (f / "config.json").write_text("{oops"))),
     r"config\.json' is not valid JSON .*re-save the checkpoint"),
    ("config-not-an-object", lambda c: c.analyze(model=c.damaged(
        lambda f: (f / "config.json").write_text("[1, 2]"))),
     r"config\.json' holds a JSON list, not an object"),
    ("config-missing-keys", lambda c: c.analyze(model=c.damaged(
        _edit_config(hidden_size=None, num_hidden_layers=None))),
     r"config\.json' lacks \['hidden_size', 'num_hidden_layers'\]"),
    ("config-bad-value", lambda c: c.analyze(model=c.damaged(_edit_config(vocab_size=0))),
     r"config\.json' has \{'vocab_size': 0\}; these must be positive integers"),
    ("weights-shape-vs-config", lambda c: c.analyze(model=c.damaged(_edit_config(hidden_size=32))),
     r"model\.safetensors': .* has shape \(\d+, 64\) but config\.json says .*= \(\d+, 32\)"),
    ("weights-inner-shape-vs-config", lambda c: c.analyze(
        "--format", "think-tags", model=c.damaged(_edit_config(intermediate_size=96))),
     r"could not load .*: its config\.json and weights do not match \(model\.layers\.0\.mlp\."
     r"\w+\.weight saved \(\d+, \d+\), config\.json implies \(.*\(6 in all\)\); put the "
     r"checkpoint's own config\.json beside its weights"),
    ("safetensors-truncated", lambda c: c.analyze(model=c.damaged(_bytes(lambda b: b[:len(b) // 2]))),
     r"model\.safetensors': tensor .* lies at bytes .* \(truncated\?\); the file is damaged"),
    ("safetensors-lying-header", lambda c: c.analyze(model=c.damaged(
        _bytes(lambda b: (10**9).to_bytes(8, "little") + b[8:]))),
     r"model\.safetensors' claims a 1000000000-byte header but holds \d+ bytes"),
    ("safetensors-trailing-bytes", lambda c: c.analyze(model=c.damaged(_bytes(lambda b: b + b"xx"))),
     r"model\.safetensors' holds \d+ bytes of data but its tensors cover \d+"),
    ("no-weights", lambda c: c.analyze(model=c.damaged(
        lambda f: (f / "model.safetensors").unlink())),
     r"no weights in .*save them with model\.save_pretrained"),
    ("random-unknown-arch", lambda c: c.analyze(model="random:gpt2"),
     r"--model 'random:gpt2': unknown architecture 'gpt2'; use random:ARCH with ARCH one of"),
    # output folders and files
    ("analyze-out-holds-results", lambda c: c.analyze(out=_filled(c, "old")),
     r"output folder '.*old' already holds files \(compare\.csv, maps_wrong\.png\); pass "
     r"--overwrite"),
    ("demo-out-holds-results", lambda c: ["demo", "--model", c.no_model, "--out",
                                          _filled(c, "old", ("report.html", "traces_stepflow.jsonl"))],
     r"already holds files \(report\.html, traces_stepflow\.jsonl\); pass --overwrite"),
    ("overwrite-eval-folder", lambda c: c.analyze("--overwrite", out=_run_folder(c)),
     r"is an evaluation run folder .*--overwrite does not replace it"),
    ("generate-out-exists", lambda c: c.generate("--question", "q", out=_write("g.json", "{}")(c)),
     r"output file '.*g\.json' already exists; pass --overwrite"),
    ("generate-out-is-folder", lambda c: c.generate("--question", "q", out=str(c.tmp)),
     r"output file '.*' is a folder; pass a file path to --out"),
    ("out-under-a-file", lambda c: c.analyze(out=_write("f", "x")(c) + "/sub"),
     r"output folder '.*f/sub' cannot be created: '.*f' is a file"),
    # eval: settings before run.json, before the model
    ("eval-max-new-tokens-0", lambda c: c.eval("--max-new-tokens", "0"),
     r"--max-new-tokens must be at least 1; got 0"),
    ("eval-batch-size-0", lambda c: c.eval("--batch-size", "0"), r"--batch-size must be at least 1; got 0"),
    ("eval-limit-0", lambda c: c.eval("--limit", "0"), r"--limit must be at least 1; got 0"),
    ("eval-samples-greedy", lambda c: c.eval("--samples", "2"),
     r"samples > 1 with greedy decoding .*temperature > 0"),
    ("eval-settings-differ", lambda c: c.eval("--max-new-tokens", "64", out=_run_folder(c)),
     r"holds a run with other settings \{'max_new_tokens': \(256, 64\)\} \(old, new\); run "
     r"with the old settings to resume it"),
    ("eval-stepflow-differs", lambda c: c.eval("--stepflow", out=_run_folder(c)),
     r"other settings \{'stepflow': \(None, \{"),
    ("eval-run-json-corrupt", lambda c: c.eval(out=_corrupt_run_folder(c)),
     r"run\.json' is not valid JSON .*the run folder is damaged"),
    # problem files
    ("jsonl-line-is-array", lambda c: c.eval(data=_write("d.jsonl", '{"question": "q", "answer": "1"}\n[1, 2]\n')(c)),
     r"d\.jsonl:2 holds a list, not an object; each problem must be an object"),
    ("jsonl-bad-json", lambda c: c.eval(data=_write("d.jsonl", '{"question": \n')(c)),
     r"d\.jsonl:1 is not valid JSON"),
    ("json-data-not-a-list", lambda c: c.eval(data=_write("d.json", '{"data": 5}')(c)),
     r"data file '.*d\.json': 'data' holds 5 \(int\), not a list of problems"),
    ("json-object-without-data", lambda c: c.eval(data=_write("d.json", '{"x": 1}')(c)),
     r"holds an object with keys \['x'\]; expected a list of problems"),
    ("csv-empty-answer", lambda c: c.eval(data=_write("d.csv", "question,answer\nWhat is 1+1?,2\nWhat is 2+2?,\n")(c)),
     r"d\.csv row 2 has an empty 'answer'; every problem needs a question and an answer"),
    ("data-missing", lambda c: c.eval(data=str(c.tmp / "none.jsonl")), r"does not exist"),
    ("tiny-split-unknown", lambda c: c.eval(data="tiny:nope"), r"unknown split 'nope'"),
    # traces
    ("trace-not-json", lambda c: c.analyze("--trace", _write("t.json", "{")(c)),
     r"trace file '.*t\.json' is not valid JSON"),
    ("trace-fields-not-strings", lambda c: c.analyze("--trace", _write(
        "t.json", json.dumps({"question": 1, "thinking": "a", "summary": "b"}))(c)),
     r"\['question'\] must be strings"),
]


@pytest.mark.parametrize("build,message", [pytest.param(*c[1:3], id=c[0], marks=c[3:])
                                           for c in CLI_CASES])
def test_cli_matrix(tmp_path, capsys, checkpoints, build, message):
    ctx = Ctx(tmp_path, checkpoints)
    argv = build(ctx)
    before = set(tmp_path.iterdir())
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("stepsal: error:")]
    assert rc == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(message, errors[0]), errors[0]
    # nothing written: no output folder, no run.json, no temporary siblings
    new = {p.name for p in set(tmp_path.iterdir()) - before}
    assert not new - {"damaged"}, new


# ---- output folders: nothing stale ----------------------------------------------------------

def test_overwrite_replaces_the_whole_folder_and_a_failed_run_changes_nothing(tmp_path):
    out = tmp_path / "demo"
    with output_dir(out) as tmp:
        for name in ("report.html", "maps_wrong.png", "compare.csv", "traces_stepflow.jsonl"):
            (tmp / name).write_text("first run")
    with pytest.raises(StepSalError, match="already holds files"):
        with output_dir(out):
            pass
    with pytest.raises(RuntimeError, match="boom"):  # a failing second run ...
        with output_dir(out, overwrite=True) as tmp:
            (tmp / "report.html").write_text("half")
            raise RuntimeError("boom")
    assert (out / "report.html").read_text() == "first run"  # ... leaves the first intact
    with output_dir(out, overwrite=True) as tmp:  # a smaller second run
        (tmp / "report.html").write_text("second run")
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no partial siblings


def test_overwrite_refuses_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StepSalError, match="which --overwrite would replace as a whole"):
        with output_dir(".", overwrite=True):
            pass


def test_demo_overwrite_leaves_no_file_of_the_earlier_run(tmp_path, tiny_lrm):
    from stepsal_lens.apps.demo import run_demo

    out = tmp_path / "demo"
    out.mkdir()
    for name in ("maps_wrong.png", "compare.csv", "traces_stepflow.jsonl", "report.html"):
        (out / name).write_text("first run")
    result = run_demo(tiny_lrm, n=2, out=out, stepflow=None, progress=False,
                      max_new_tokens=64, overwrite=True)
    assert result.out == out
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "traces.jsonl", "metrics.csv"} <= names
    # no StepFlow pass and too few traces to compare: those files must be gone
    assert not names & {"compare.csv", "traces_stepflow.jsonl"}, names
    assert all(p.read_bytes() != b"first run" for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import stepsal_lens.results.outputs as outputs

    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    rc = main(Ctx(tmp_path, {}).analyze(out=str(tmp_path / "ro" / "out")))
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"output folder '.*ro/out' is not writable \('.*' does not "
                                 r"allow writing for this user\); pass a writable --out", err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_for_real(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(Ctx(tmp_path, {}).analyze(out=str(ro / "out"))) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_random_arch_leaves_no_temporary_folder(tmp_path, monkeypatch):
    from stepsal_lens.apps.cli import _load_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = _load_model("random:qwen2", device="cpu", dtype=None, format=None)
    assert model.cfg.n_layers == 4
    assert list(tmp_path.iterdir()) == []


# ---- run folders: one writer, nothing duplicated, nothing lost -------------------------------

def _lock_of(pid: int) -> str:
    return json.dumps({"pid": pid, "host": os.uname().nodename, "started": "then",
                       "command": "stepsal eval ..."})


def test_second_eval_refuses_while_the_first_is_alive(tmp_path, capsys):
    ctx = Ctx(tmp_path, {})
    run = tmp_path / "run"
    run.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text(_lock_of(child.pid))
        assert main(ctx.eval()) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert re.fullmatch(rf"stepsal: error: run folder '.*run' is in use by process "
                            rf"{child.pid} \('stepsal eval \.\.\.', since then\); wait for it to "
                            rf"finish or stop it, then run again \(it resumes\); if no such "
                            rf"process runs, delete '.*{re.escape(LOCK_NAME)}'", err[-1]), err
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == child.pid  # untouched
    finally:
        child.kill()
        child.wait()


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    ctx = Ctx(tmp_path, {})
    run = tmp_path / "run"
    run.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid is dead
    (run / LOCK_NAME).write_text(_lock_of(child.pid))
    assert main(ctx.eval()) == 2  # gets past the lock, then fails on the (missing) model
    err = capsys.readouterr().err
    assert f"took over the lock of process {child.pid}" in err
    assert "neither a local folder" in err and "in use" not in err
    assert not (run / LOCK_NAME).exists()  # released


def test_lock_is_one_writer_and_nests_in_one_process(tmp_path):
    with run_lock(tmp_path / "r") as path:
        with run_lock(tmp_path / "r"):  # the CLI holds it, evaluate takes it again
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert path.exists()
    assert not (tmp_path / "r").exists()  # created and left empty: removed


def test_eval_interrupt_says_how_to_resume_and_resume_completes(tmp_path, capsys, monkeypatch,
                                                                tiny_lrm):
    import stepsal_lens.apps.cli as cli
    import stepsal_lens.lens.generation as generation

    real = generation.generate
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: tiny_lrm)
    monkeypatch.setattr(generation, "generate", interrupted)
    out = tmp_path / "run"
    argv = ["eval", "--model", "tiny-lrm", "--data", "tiny:id", "--limit", "3",
            "--batch-size", "1", "--max-new-tokens", "48", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"stepsal: interrupted after 1 of 3; the finished records are in "
                        r"'.*results\.jsonl': run the same command to resume", err[-1]), err
    assert not (out / LOCK_NAME).exists() and not (out / "summary.json").exists()
    first = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    # a duplicated line (two writers, before locks) is read once and written once
    (out / "results.jsonl").write_text(2 * (json.dumps(first | {"completion": "KEPT"}) + "\n"))
    monkeypatch.setattr(generation, "generate", real)
    assert main(argv) == 0
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["id-0", "id-1", "id-2"]
    assert lines[0]["completion"] == "KEPT"  # not generated again
    assert json.loads((out / "summary.json").read_text())["n"] == 3


def test_refused_eval_writes_no_run_json(tmp_path, tiny_lrm):
    from stepsal_lens.eval.runs import evaluate
    from stepsal_lens.eval.problems import load_problems

    problems = load_problems("tiny:id", limit=2)
    with pytest.raises(StepSalError, match="max_new_tokens must be a whole number >= 1; got 0"):
        evaluate(tiny_lrm, problems, tmp_path / "run", max_new_tokens=0, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(StepSalError, match="batch_size must be a whole number >= 1; got 0"):
        evaluate(tiny_lrm, problems, tmp_path / "run", batch_size=0, progress=False)
    with pytest.raises(StepSalError, match="limit must be a whole number >= 1"):
        load_problems("tiny:id", limit=0)
    dup = [problems[0], problems[0]]
    with pytest.raises(StepSalError, match=r"problem ids \['id-0'\] occur more than once"):
        evaluate(tiny_lrm, dup, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---- saved results: StepSaliency.load --------------------------------------------------------

def _saved(tmp_path: Path) -> Path:
    steps = [Step(0, "question", "Q?", (0, 2), (0, 2)), Step(1, "thinking", "T.", (3, 5), (2, 4)),
             Step(2, "summary", "S.", (6, 8), (4, 6))]
    maps = torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(0)).tril()
    sal = StepSaliency(maps, [0, 1], steps, torch.arange(6), {"model": "m", "target": "lm"})
    return sal.save(tmp_path / "sal")


def _tensors(**changes):
    def damage(folder: Path) -> None:
        f = folder / "step_saliency.safetensors"
        t = load_file(f)
        t.update({k: v(t) for k, v in changes.items()})
        save_file(t, f)
    return damage


def _steps_json(edit):
    def damage(folder: Path) -> None:
        f = folder / "steps.json"
        doc = json.loads(f.read_text())
        edit(doc)
        f.write_text(json.dumps(doc))
    return damage


LOAD_CASES = [
    ("steps-json-corrupt", lambda f: (f / "steps.json").write_text("{"),
     r"steps\.json' is not valid JSON"),
    ("steps-json-not-object", lambda f: (f / "steps.json").write_text("[]"),
     r"steps\.json' has no list of 'steps'"),
    ("wrong-step-count", _steps_json(lambda d: d["steps"].pop()),
     r"holds maps over \(3, 3\) steps but '.*steps\.json' lists 2 steps; the two files are "
     r"from different runs"),
    ("integer-maps", _tensors(maps=lambda t: (t["maps"] * 100).long()),
     r"maps must be a 4-d float tensor .*got torch\.int64"),
    ("nan-maps", _tensors(maps=lambda t: t["maps"].index_fill(0, torch.tensor([1]), float("nan"))),
     r"27 map values are NaN or infinite; saliency is never saved non-finite"),
    ("maps-3d", _tensors(maps=lambda t: t["maps"][0]),
     r"maps must be a 4-d float tensor .*shape \(3, 3, 3\)"),
    ("float-token-ids", _tensors(token_ids=lambda t: t["token_ids"].float()),
     r"token_ids must be a 1-d integer tensor; got torch\.float32"),
    ("step-outside-tokens", _steps_json(lambda d: d["steps"][2].update(token_end=60)),
     r"step 2 spans tokens 4-60, outside the 6 saved token ids"),
    ("step-missing-key", _steps_json(lambda d: d["steps"][1].pop("segment")),
     r"step 1 needs the keys"),
    ("layers-count", _steps_json(lambda d: d.update(layers=[0])),
     r"'layers' must list 2 layer indices"),
    ("safetensors-truncated", lambda f: (f / "step_saliency.safetensors").write_bytes(
        (f / "step_saliency.safetensors").read_bytes()[:40]),
     r"step_saliency\.safetensors' is not a readable safetensors file"),
    ("files-missing", lambda f: (f / "steps.json").unlink(), r"has no \['steps\.json'\]"),
]


@pytest.mark.parametrize("damage,message", [pytest.param(*c[1:], id=c[0]) for c in LOAD_CASES])
def test_load_matrix(tmp_path, damage, message):
    folder = _saved(tmp_path)
    assert StepSaliency.load(folder).maps.shape == (2, 3, 3, 3)  # intact: loads
    damage(folder)
    with pytest.raises(StepSalError, match=message):
        StepSaliency.load(folder)


# ---- saliency targets ------------------------------------------------------------------------

TARGET_CASES = [
    ("unknown-keyword", dict(target="lm", answer="12"),
     r"target 'lm' does not take \['answer'\]; its options are none"),
    ("misspelt-keyword", dict(target="logit", positon=3),
     r"target 'logit' does not take \['positon'\]; its options are \['position', 'token'\]"),
    ("unknown-target", dict(target="nope"), r"nope"),
    ("non-scalar", dict(target=lambda logits, trace: logits.sum(-1)),
     r"must be a scalar; '<lambda>' gave shape \(1, \d+\)"),
    ("not-a-tensor", dict(target=lambda logits, trace: 1.0),
     r"returned a float; it must return a scalar tensor"),
    ("no-gradient", dict(target=lambda logits, trace: torch.tensor(1.0)),
     r"does not depend on the logits"),
]


@pytest.mark.parametrize("kwargs,message", [pytest.param(*c[1:], id=c[0]) for c in TARGET_CASES])
def test_target_matrix(models, kwargs, message):
    model = models["qwen2"]
    trace = Trace.from_segments(TRACE["question"], TRACE["thinking"], TRACE["summary"], model)
    with pytest.raises(StepSalError, match=message):
        step_saliency(model, trace, **kwargs)


# ---- text: CRLF, lone CR, combining marks ----------------------------------------------------

@pytest.mark.parametrize("eol", ["\r\n", "\r"], ids=["crlf", "lone-cr"])
def test_line_breaks_split_like_lf(eol):
    lf = "The result is 12 here.\n\nSo the answer is \\boxed{12}.\nDone now, really."
    text = lf.replace("\n", eol)
    pieces = [text[a:b].replace(eol, "\n") for a, b in paper_splitter(text, "summary")]
    assert pieces == [lf[a:b] for a, b in paper_splitter(lf, "summary")]
    assert len(pieces) == 2
    assert newline_splitter(text, "summary") != [(0, len(text))]
    assert len(newline_splitter(text, "summary")) == len(newline_splitter(lf, "summary"))
    # a single CRLF is one line break, not a blank line
    assert len(paper_splitter("First line is long.\r\nSecond line is long.", "summary")) == 1


def test_crlf_trace_keeps_offsets_into_the_callers_text(models):
    model = models["qwen2"]
    summary = "The result is 12 here.\r\n\r\nSo the answer is \\boxed{12}."
    trace = Trace.from_segments(TRACE["question"], TRACE["thinking"], summary, model)
    lf = Trace.from_segments(TRACE["question"], TRACE["thinking"],
                             summary.replace("\r\n", "\n"), model)
    assert [s.text for s in trace.steps] == [s.text for s in lf.steps]
    assert len(trace.steps_in("summary")) == 2
    assert all(trace.text[a:b] == s.text for s in trace.steps for a, b in [s.char_span])
    from stepsal_lens.segments.answers import find_answer

    assert find_answer("Final answer: 12\r\nmore text").text == "12"


def test_from_token_ids_text_is_the_tokenizers_normal_form(models):
    import unicodedata

    model = models["qwen2"]
    norm = model.tokenizer.backend_tokenizer.normalizer.normalize_str
    thinking = "The cafe\u0301 sells 5 cakes. Then it sells 3 more cakes."
    trace = Trace.from_segments(TRACE["question"], thinking, TRACE["summary"], model)
    again = Trace.from_token_ids(trace.token_ids, model)
    assert again.text != trace.text  # decomposed in, composed out: as documented
    assert again.text == norm(trace.text) == unicodedata.normalize("NFC", trace.text)
    composed = Trace.from_segments(TRACE["question"], unicodedata.normalize("NFC", thinking),
                                   TRACE["summary"], model)
    assert Trace.from_token_ids(composed.token_ids, model).text == composed.text
    assert [composed.decode_step(i) for i in range(composed.n_steps)] == [
        s.text for s in composed.steps]
