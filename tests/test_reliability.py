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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepsal_lens import StepSalError, Trace, step_saliency
from stepsal_lens.apps.cli import main
from stepsal_lens.eval.problems import load_problems
from stepsal_lens.eval.runs import run_identity
from stepsal_lens.results.outputs import MARKER, output_dir, run_lock
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


def _marker(folder: Path, command: str) -> None:
    (folder / MARKER).write_text(json.dumps({"stepsal": "0.2.0", "command": command}))


def _filled(c: Ctx, name: str, files=("maps_wrong.png", "compare.csv"),
            command: str | None = "analyze") -> str:
    """A folder holding an earlier result (of stepsal's when ``command`` is given)."""
    folder = c.tmp / name
    folder.mkdir()
    for f in files:
        (folder / f).write_text("from an earlier run")
    if command is not None:
        _marker(folder, command)
    return str(folder)


def _run_folder(c: Ctx, **settings) -> str:
    folder = c.tmp / "run"
    folder.mkdir()
    config = {"model": c.no_model, "data": str(c.data), "stepflow": None,
              "max_new_tokens": 256, "samples": 1, "temperature": 0.0, "seed": 0,
              "format": "think-tags", **run_identity(load_problems(c.data), c.data),
              "model_fingerprint": None, **settings}
    (folder / "run.json").write_text(json.dumps(config))
    _marker(folder, "eval")
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
     r"--temperature must be a finite number >= 0; got -1"),
    ("question-empty", lambda c: c.generate("--question", ""),
     r"--question is empty \(''\); pass the question text"),
    ("question-blank", lambda c: c.generate("--question", "  \n"),
     r"--question is empty"),
    ("prompt-file-empty", lambda c: c.generate("--prompt-file", _write("p.txt", " \n")(c)),
     r"prompt file '.*p\.txt' is empty"),
    ("generate-max-new-tokens-0", lambda c: c.generate("--question", "q", "--max-new-tokens", "0"),
     r"--max-new-tokens must be a whole number >= 1; got 0"),
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
     r"is a resumable `stepsal eval` run folder; --overwrite does not replace it"),
    ("overwrite-foreign-folder", lambda c: c.analyze("--overwrite", out=_filled(
        c, "mine", ("notes.txt",), command=None)),
     r"output folder '.*mine' holds files stepsal did not make \(notes\.txt\); --overwrite "
     r"replaces only a folder stepsal made"),
    ("generate-out-exists", lambda c: c.generate("--question", "q", out=_write("g.json", "{}")(c)),
     r"output file '.*g\.json' already exists; pass --overwrite"),
    ("generate-out-is-folder", lambda c: c.generate("--question", "q", out=str(c.tmp)),
     r"output file '.*' is a folder; pass a file path to --out"),
    ("out-under-a-file", lambda c: c.analyze(out=_write("f", "x")(c) + "/sub"),
     r"output folder '.*f/sub' cannot be created: '.*f' is a file"),
    # eval: settings before run.json, before the model
    ("eval-max-new-tokens-0", lambda c: c.eval("--max-new-tokens", "0"),
     r"--max-new-tokens must be a whole number >= 1; got 0"),
    ("eval-batch-size-0", lambda c: c.eval("--batch-size", "0"), r"--batch-size must be a whole number >= 1; got 0"),
    ("eval-limit-0", lambda c: c.eval("--limit", "0"), r"--limit must be a whole number >= 1; got 0"),
    ("eval-samples-greedy", lambda c: c.eval("--samples", "2"),
     r"samples > 1 with greedy decoding .*temperature > 0"),
    ("eval-settings-differ", lambda c: c.eval("--max-new-tokens", "64", out=_run_folder(c)),
     r"holds a run made from other inputs or settings: max_new_tokens: 256 before, 64 now; "
     r"run with the old ones to resume it"),
    ("eval-stepflow-differs", lambda c: c.eval("--stepflow", out=_run_folder(c)),
     r"other inputs or settings: stepflow: None before, \{"),
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
    with output_dir(out, command="demo") as tmp:
        for name in ("report.html", "maps_wrong.png", "compare.csv", "traces_stepflow.jsonl"):
            (tmp / name).write_text("first run")
    with pytest.raises(StepSalError, match="already holds files"):
        with output_dir(out, command="demo"):
            pass
    with pytest.raises(RuntimeError, match="boom"):  # a failing second run ...
        with output_dir(out, command="demo", overwrite=True) as tmp:
            (tmp / "report.html").write_text("half")
            raise RuntimeError("boom")
    assert (out / "report.html").read_text() == "first run"  # ... leaves the first intact
    with output_dir(out, command="demo", overwrite=True) as tmp:  # a smaller second run
        (tmp / "report.html").write_text("second run")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "report.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no partial siblings


def test_out_refuses_the_working_folder_even_when_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(StepSalError, match=r"--out '\.' is the working folder .*pass a new "
                                               r"one, e\.g\. --out stepsal-out"):
            with output_dir(".", command="analyze", overwrite=overwrite):
                pass
    assert list(tmp_path.iterdir()) == []


def test_demo_overwrite_leaves_no_file_of_the_earlier_run(tmp_path, tiny_lrm):
    from stepsal_lens.apps.demo import run_demo

    out = tmp_path / "demo"
    out.mkdir()
    for name in ("maps_wrong.png", "compare.csv", "traces_stepflow.jsonl", "report.html"):
        (out / name).write_text("first run")
    _marker(out, "demo")  # an earlier demo's folder
    result = run_demo(tiny_lrm, n=2, out=out, stepflow=None, progress=False,
                      max_new_tokens=64, overwrite=True)
    assert result.out == out
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "traces.jsonl", "metrics.csv"} <= names
    # no StepFlow pass and too few traces to compare: those files must be gone
    assert not names & {"compare.csv", "traces_stepflow.jsonl"}, names
    assert all(p.read_bytes() != b"first run" for p in out.iterdir() if p.name != MARKER)
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

@contextmanager
def hold_lock(target: Path) -> Iterator[subprocess.Popen]:
    """A child process holding ``target``'s lock (as a running stepsal would) for the
    block; killed (SIGKILL) at its end."""
    code = (f"import sys, time\nsys.argv = ['stepsal', 'eval', '...']\n"
            f"from stepsal_lens.results.outputs import run_lock\n"
            f"with run_lock({str(target)!r}):\n    print('held', flush=True)\n"
            f"    time.sleep(120)\n")
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          text=True) as child:
        try:
            assert child.stdout.readline().strip() == "held"
            yield child
        finally:
            child.kill()
            child.wait()


def test_second_eval_refuses_while_the_first_is_alive(tmp_path, capsys):
    ctx = Ctx(tmp_path, {})
    with hold_lock(tmp_path / "run") as child:
        assert main(ctx.eval()) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert re.fullmatch(rf"stepsal: error: '.*run' is in use by process {child.pid} "
                            rf"\('stepsal eval \.\.\.', since .*\); wait for it to finish or "
                            rf"stop it, then run again", err[-1]), err


def test_the_lock_of_a_killed_process_does_not_block(tmp_path, capsys):
    ctx = Ctx(tmp_path, {})
    with hold_lock(tmp_path / "run"):
        pass  # SIGKILLed at the end: no clean-up; the kernel releases the lock
    assert (tmp_path / ".run.stepsal-lock").exists()  # the file stays ...
    assert main(ctx.eval()) == 2  # ... but gets past the lock, then fails on the missing model
    err = capsys.readouterr().err
    assert "neither a local folder" in err and "in use" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "trace.json"]


def test_lock_is_one_writer_and_nests_in_one_process(tmp_path):
    with run_lock(tmp_path / "r") as path:
        with run_lock(tmp_path / "r"):  # the CLI holds it, evaluate takes it again
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert path.exists()
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_eval_interrupt_says_how_to_resume_and_resume_completes(tmp_path, capsys, monkeypatch,
                                                                tiny_lrm):
    import stepsal_lens.apps.cli as cli
    import stepsal_lens.eval.runs as generation  # evaluate generates through runs.generate

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
    assert not (out / "summary.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock left
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


# ---- properties of every command that writes (issue 20) --------------------------------------
#
# Not a list of cases per command: each property is checked for every command, on the
# same hostile places. ``World`` is a scratch tree with a home folder (with .ssh), a git
# checkout, a folder of inputs, a local model and a working folder; every test snapshots
# the whole tree and asserts that nothing outside the run changed.

def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (hidden ones too, links not followed): kind, size, content."""
    import hashlib

    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif p.is_dir():
            out[str(p.relative_to(root))] = ("dir",)
        else:
            out[str(p.relative_to(root))] = ("file", st.st_size, st.st_ino,
                                              hashlib.sha256(p.read_bytes()).hexdigest())
    return out


class World:
    def __init__(self, root: Path, monkeypatch, tiny_folder: Path):
        self.root = root
        self.home = root / "users" / "me"
        (self.home / ".ssh").mkdir(parents=True)
        (self.home / ".ssh" / "id_ed25519").write_text("secret")
        monkeypatch.setenv("HOME", str(self.home))
        self.checkout = root / "checkout"
        (self.checkout / ".git").mkdir(parents=True)
        (self.checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (self.checkout / "train.py").write_text("print('hours of work')\n")
        self.inputs = root / "inputs"
        self.inputs.mkdir()
        self.trace = self.inputs / "trace.json"
        self.trace.write_text(json.dumps(TRACE))
        self.traces = self.inputs / "traces.jsonl"
        self.traces.write_text("".join(json.dumps({"id": f"t{i}", **TRACE}) + "\n"
                                       for i in range(2)))
        self.data = self.inputs / "data.jsonl"
        self.data.write_text("".join(json.dumps({"question": f"Start with {i}. Add 2. What is "
                                                             f"the result?", "answer": str(i + 2)})
                                     + "\n" for i in range(3)))
        self.prompt = self.inputs / "prompt.txt"
        self.prompt.write_text("Start with 3. Add 2. What is the result?")
        self.outputs = self.inputs / "outputs.jsonl"
        self.outputs.write_text(json.dumps({"output": "\\boxed{2}", "answer": "2"}) + "\n")
        self.model = root / "models" / "tiny"
        shutil.copytree(tiny_folder, self.model)
        self.work = root / "work"
        self.work.mkdir()
        (self.work / "notes.txt").write_text("keep")
        monkeypatch.chdir(self.work)
        (root / "link-to-checkout").symlink_to(self.checkout)

    def hostile_folders(self) -> dict[str, str]:
        return {"git checkout": str(self.checkout), "home": str(self.home),
                "parent of home": str(self.home.parent), "holds --trace/--data": str(self.inputs),
                "holds --model": str(self.model.parent), "working folder": ".",
                "parent of the working folder": "..", "symlink to a checkout":
                str(self.root / "link-to-checkout"), "filesystem root": "/"}


@pytest.fixture
def world(tmp_path, monkeypatch):
    from stepsal_lens.lens.models import BUNDLED

    return World(tmp_path, monkeypatch, BUNDLED["tiny-lrm"])


# every command that writes a folder: argv for an --out (with --overwrite where it exists)
FOLDER_COMMANDS = {
    "analyze": lambda w, out: ["analyze", "--model", str(w.model), "--trace", str(w.trace),
                               "--out", out, "--overwrite"],
    "analyze --traces": lambda w, out: ["analyze", "--model", str(w.model), "--traces",
                                        str(w.traces), "--out", out],
    "effects": lambda w, out: ["effects", "--model", str(w.model), "--trace", str(w.trace),
                               "--out", out, "--overwrite"],
    "demo": lambda w, out: ["demo", "--model", str(w.model), "--n", "1", "--data", str(w.data),
                            "--out", out, "--overwrite", "--no-stepflow"],
    "eval": lambda w, out: ["eval", "--model", str(w.model), "--data", str(w.data), "--out",
                            out, "--max-new-tokens", "8"],
}
FILE_COMMANDS = {
    "generate": lambda w, out: ["generate", "--model", str(w.model), "--prompt-file",
                                str(w.prompt), "--out", out, "--overwrite",
                                "--max-new-tokens", "4"],
    "grade": lambda w, out: ["grade", str(w.outputs), "--out", out, "--overwrite"],
}
HOSTILE = ["git checkout", "home", "parent of home", "holds --trace/--data", "holds --model",
           "working folder", "empty working folder", "parent of the working folder",
           "symlink to a checkout", "filesystem root"]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("stepsal: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("place", HOSTILE)
@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_no_command_writes_into_a_place_it_does_not_own(world, capsys, monkeypatch, command,
                                                        place):
    if place == "empty working folder":  # `--out .` where nothing else would refuse it
        (world.root / "empty").mkdir()
        monkeypatch.chdir(world.root / "empty")
    out = world.hostile_folders().get(place, ".")
    before = snapshot(world.root)
    assert main(FOLDER_COMMANDS[command](world, out)) == 2
    line = _one_error(capsys)
    if place == "empty working folder":
        assert "is the working folder" in line, line
    assert re.search(r"is (the|your|an ancestor|a filesystem)|holds (files|the command's own "
                     r"input)|--overwrite replaces the folder of one trace", line), line
    assert snapshot(world.root) == before


@pytest.mark.parametrize("target", ["the input", "a hard link to the input",
                                    "a symlink to the input"])
@pytest.mark.parametrize("command", list(FILE_COMMANDS))
def test_no_command_writes_a_file_onto_its_input(world, capsys, command, target):
    source = world.prompt if command == "generate" else world.outputs
    out = {"the input": source, "a hard link to the input": world.root / "hard",
           "a symlink to the input": world.root / "soft"}[target]
    if target == "a hard link to the input":
        os.link(source, out)
    elif target == "a symlink to the input":
        out.symlink_to(source)
    before = snapshot(world.root)
    assert main(FILE_COMMANDS[command](world, str(out))) == 2
    assert re.search(r"is the command's own input .* \(or a link to it\); write it elsewhere",
                     _one_error(capsys))
    assert snapshot(world.root) == before


@pytest.mark.parametrize("command", list(FOLDER_COMMANDS) + list(FILE_COMMANDS))
def test_a_second_job_on_the_same_output_is_refused_and_changes_nothing(world, capsys,
                                                                        command):
    out = world.root / ("out.json" if command in FILE_COMMANDS else "out")
    build = {**FOLDER_COMMANDS, **FILE_COMMANDS}[command]
    with hold_lock(out) as first:
        before = snapshot(world.root)
        assert main(build(world, str(out))) == 2
        assert re.search(rf"is in use by process {first.pid} .*wait for it to finish",
                         _one_error(capsys))
        assert snapshot(world.root) == before


def _replace_checkpoint(folder: Path) -> None:
    """Another checkpoint of the same shapes at the same path (as a fine-tune would be)."""
    f = folder / "model.safetensors"
    tensors = load_file(f)
    tensors = {k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, f, metadata={"format": "pt"})


CHANGES = {
    "data file edited": lambda w: w.data.write_text(w.data.read_text().replace('"2"', '"22"')),
    "traces file edited": lambda w: w.traces.write_text(w.traces.read_text().replace(
        "7", "8")),
    "checkpoint replaced": lambda w: _replace_checkpoint(w.model),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("command", ["eval", "analyze --traces"])
def test_a_resume_on_changed_inputs_is_refused(world, capsys, command, change):
    if (command, change) in (("eval", "traces file edited"),
                             ("analyze --traces", "data file edited")):
        pytest.skip("not an input of this command")
    out = world.root / "run"
    argv = FOLDER_COMMANDS[command](world, str(out))
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    results = snapshot(out)
    CHANGES[change](world)
    assert main(argv) == 2
    line = _one_error(capsys)
    named = {"data file edited": "the data file's content changed",
             "traces file edited": "the traces file's content changed",
             "checkpoint replaced": "the model's files (weights, config or tokenizer) are not "
                                    "those the run began with"}[change]
    assert "holds a run made from other inputs or settings" in line and named in line, line
    assert snapshot(out) == results  # nothing reused, nothing lost


def test_eval_resume_with_another_limit_is_refused_and_compare_refuses_other_problems(
        world, capsys):
    argv = FOLDER_COMMANDS["eval"](world, str(world.root / "a"))
    assert main(argv + ["--limit", "2"]) == 0
    assert main(argv + ["--limit", "1"]) == 2
    assert "n_problems: 2 before, 1 now" in _one_error(capsys)
    assert main(FOLDER_COMMANDS["eval"](world, str(world.root / "b")) + ["--limit", "1"]) == 0
    capsys.readouterr()
    assert main(["compare", str(world.root / "a"), str(world.root / "b")]) == 2
    assert re.search(r"were not run on the same problems \(the problems differ; 2 vs 1 "
                     r"problems \(another --limit\?\)\)", _one_error(capsys))


def test_problem_ids_come_from_content_not_rows(tmp_path):
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(3)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {p.question: p.id for p in load_problems(f)}
    f.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "New?", "answer": "0"},
                                                          *rows]))
    after = {p.question: p.id for p in load_problems(f)}
    assert all(after[q] == i for q, i in before.items())  # a row inserted changes no id
    f.write_text(2 * (json.dumps(rows[0]) + "\n"))  # the same problem twice: two records
    a, b = load_problems(f)
    assert a.id != b.id and b.id.startswith(a.id)
    f.write_text("".join(json.dumps({"id": "p1", **r}) + "\n" for r in rows[:2]))
    with pytest.raises(StepSalError, match=r"d\.jsonl:2 and .*d\.jsonl:1 both have the id 'p1'"):
        load_problems(f)
    f.write_text(json.dumps({"id": "x" * 300, **rows[0]}) + "\n")
    with pytest.raises(StepSalError, match=r"d\.jsonl:1: the id has 300 characters \(at most "
                                           r"200: ids name files and folders\)"):
        load_problems(f)


def test_a_problem_that_cannot_run_is_one_recorded_verdict(tmp_path, tiny_lrm):
    from stepsal_lens.eval.runs import evaluate

    long = " ".join(["Add 1."] * tiny_lrm.cfg.n_ctx)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "ok", "question": "Start with 3. Add 2. What is the result?", "answer": "5"},
        {"id": "too-long", "question": f"Start with 3. {long} What is the result?",
         "answer": "0"}]))
    run = evaluate(tiny_lrm, load_problems(f), tmp_path / "run", max_new_tokens=32,
                   progress=False)
    by_id = {r["id"]: r for r in run.records}
    assert by_id["ok"]["error"] is None and by_id["ok"]["n_completion_tokens"] > 0
    assert by_id["too-long"]["correct"] is False
    assert re.search(r"does not fit the model's context of \d+", by_id["too-long"]["error"])
    assert run.summary["could_not_run"] == 1 and run.summary["could_not_run_ids"] == ["too-long"]
