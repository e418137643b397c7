"""The ``stepsal`` command line.

``stepsal demo`` runs the main job on the bundled tiny-lrm (see :mod:`stepsal_lens.apps.demo`).

``stepsal analyze --model M --trace TRACE.json --out DIR`` writes
``step_saliency.safetensors``, ``steps.json``, ``metrics.json`` and ``maps.png``;
``--traces FILE.jsonl`` does it for every line, plus ``metrics.csv`` and the
correct-vs-wrong comparison (resumable; see :mod:`stepsal_lens.apps.batch`).
``stepsal effects --model M --trace TRACE.json --out DIR [--layers [L,...]]`` writes the
causal effect matrix (``step_effects.safetensors``), ``steps.json``, ``effects.json``
(Spearman per layer against the trace's Step-Saliency) and ``effects.png``.
``stepsal generate --model M --question Q --out FILE.json [--stepflow ...]`` writes one
generation: prompt, text, token ids, segments and StepFlow's stats.

``stepsal eval --model M --data FILE --out DIR [--stepflow ...]`` evaluates accuracy
(resumable; ``--ray [--ray-address ADDR] [--workers N]`` spreads the problems over Ray
workers, see :mod:`stepsal_lens.eval.scale`); ``stepsal compare RUN_A RUN_B`` runs a paired
McNemar test on two runs.
``stepsal grade IN.jsonl --out OUT.jsonl`` re-grades existing outputs (lines with
``output``, ``answer`` and optional ``kind``) with the grader of ``stepsal eval``.
LiveCodeBench files (``eval --data``, ``--after`` / ``--before`` on ``contest_date``) and
code lines of ``grade`` (``{"output", "kind": "code", "tests"}``) are judged in a sandbox
(:mod:`stepsal_lens.eval.code`; ``--code-workers N``, ``--no-sandbox`` to run unsandboxed).

``--model random:ARCH`` builds a tiny random checkpoint of ARCH (qwen2, llama, qwen3,
gpt-oss) on the fly, for trying the tool without any weights (in a temporary folder,
removed once it is loaded).

Every bad input is refused before any expensive work with one ``stepsal: error:`` line
naming the input and the fix (exit status 2). ``analyze`` and ``demo`` write a fresh
folder atomically and ``generate`` a fresh file (``--overwrite`` replaces an earlier
one as a whole); ``eval`` folders are resumable, one writer at a time. Ctrl-C exits
with status 130 (``eval``: "interrupted after N of M; run the same command to resume").
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from stepsal_lens._checks import (check_count, check_seed, check_temperature, check_timeout,
                                  read_utf8)
from stepsal_lens.apps.batch import batch_cmd, write_analysis, write_effects
from stepsal_lens.apps.cli_common import (add_stepflow_options, load_model as _load_model,
                                          parse_layers as _layers, pool_from_args,
                                          read_trace as _read_trace,
                                          read_trace_doc as _read_trace_doc,
                                          stepflow_settings as _stepflow_settings)
from stepsal_lens.apps.demo import load_questions, run_demo
from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.code.lcb import filter_dates
from stepsal_lens.eval.code.run import grade_code_lines, line_tests
from stepsal_lens.eval.code.sandbox import Limits, detect_backend
from stepsal_lens.eval.grading import grade_output
from stepsal_lens.eval.problems import load_problems
from stepsal_lens.eval.runs import (check_eval_settings, check_run_folder, compare_runs, evaluate,
                                    run_identity)
from stepsal_lens.eval.scale import add_ray_options, check_ray_options, evaluate_ray
from stepsal_lens.lens.engines import list_engines
from stepsal_lens.lens.generation import generate
from stepsal_lens.lens.models import check_device, model_fingerprint, parse_dtype
from stepsal_lens.lens.saliency import step_saliency
from stepsal_lens.lens.targets import list_targets
from stepsal_lens.results.config import StepFlowConfig
from stepsal_lens.results.jsonl import dumps_line, read_jsonl
from stepsal_lens.results.outputs import (check_new_file, check_output_dir, output_dir, output_file,
                                          run_folder)
from stepsal_lens.segments.answers import KINDS
from stepsal_lens.segments.formats import get_format

__all__ = ["main"]


def _check_common(args: argparse.Namespace) -> None:
    """Cheap checks of the options the model commands share (before loading anything)."""

    check_device(args.device)
    if getattr(args, "dtype", None) is not None:
        parse_dtype(args.dtype)
    if getattr(args, "format", None) is not None:

        get_format(args.format)
    for flag in ("max_new_tokens", "n", "batch_size", "samples", "limit", "workers"):
        value = getattr(args, flag, None)
        if value is not None:
            check_count(value, "--" + flag.replace("_", "-"))
    if getattr(args, "temperature", None) is not None:
        check_temperature(args.temperature, "--temperature")
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed, "--seed")
    if getattr(args, "stepflow", False):
        _stepflow_settings(args)  # StepFlow's values checked before any model is loaded


@contextmanager
def _one_trace(args: argparse.Namespace, command: str):
    """A one-trace command's temporary output folder (swapped into place at the end), its
    model and its trace; the trace file and ``--out`` are checked before the model loads."""

    doc = _read_trace_doc(Path(args.trace))
    with output_dir(args.out, command=command, overwrite=args.overwrite,
                    inputs={"--trace": args.trace, "--model": args.model}) as tmp:
        print(f"loading {args.model} ...", file=sys.stderr)
        model = _load_model(args.model, device=args.device, dtype=args.dtype,
                            format=args.format)
        yield tmp, model, _read_trace(Path(args.trace), model, args.format, doc)


def analyze(args: argparse.Namespace) -> int:

    _check_common(args)
    if args.traces is not None:  # many traces: stepsal_lens.apps.batch

        return batch_cmd(args)
    for flag, value in (("--ray", args.ray), ("--ray-address", args.ray_address),
                        ("--workers", args.workers), ("--effects", args.effects)):
        if value not in (None, False):
            raise StepSalError(f"{flag} is for many traces (--traces FILE.jsonl); for one "
                               f"trace drop it" + (" (or run `stepsal effects`)"
                                                   if flag == "--effects" else ""))
    with _one_trace(args, "analyze") as (tmp, model, trace):
        if trace.truncated:
            print("warning: the thinking never closes (truncated trace); there is no summary",
                  file=sys.stderr)
        write_analysis(model, trace, tmp, model_name=args.model, target=args.target,
                       engine=args.engine, low_memory=args.low_memory, progress=True)
    print(f"{trace!r}\nwrote {args.out}/step_saliency.safetensors, steps.json, metrics.json, "
          f"maps.png", file=sys.stderr)
    return 0


def effects_cmd(args: argparse.Namespace) -> int:

    _check_common(args)
    per_layer = args.layers is not None
    layers = None if args.layers in (None, "all") else _layers(args.layers)
    with _one_trace(args, "effects") as (tmp, model, trace):
        sal = step_saliency(model, trace, target=args.target, progress=True)
        sal.meta["model"] = args.model
        write_effects(model, trace, sal, tmp, model_name=args.model, target=args.target,
                      layers=layers, per_layer=per_layer, batch_size=args.batch_size,
                      progress=True)
        (tmp / "steps.json").write_text(json.dumps(sal.steps_json(), indent=1,
                                                   ensure_ascii=False), encoding="utf-8")
    print(f"{trace!r}\nwrote {args.out}/step_effects.safetensors, steps.json, effects.json, "
          f"effects.png", file=sys.stderr)
    return 0


def demo(args: argparse.Namespace) -> int:

    _check_common(args)
    if args.data is not None:
        load_questions(args.data)
    check_output_dir(args.out, overwrite=args.overwrite,
                     inputs={"--data": args.data, "--model": args.model})
    model = args.model
    if model.startswith("random:"):
        model = _load_model(model, device=args.device, dtype=None, format=None)
    result = run_demo(model, n=args.n, out=args.out, seed=args.seed, data=args.data,
                      max_new_tokens=args.max_new_tokens, device=args.device,
                      stepflow=None if args.no_stepflow else StepFlowConfig(),
                      overwrite=args.overwrite)
    print(f"accuracy {100 * result.accuracy:.1f}% on {len(result.records)} problems; "
          f"wrote {result.out}/report.html", file=sys.stderr)
    return 0


def generate_cmd(args: argparse.Namespace) -> int:

    if (args.question is None) == (args.prompt_file is None):
        raise StepSalError("pass exactly one of --question and --prompt-file")
    if args.question is not None and not args.question.strip():
        raise StepSalError(f"--question is empty ({args.question!r}); pass the question text, "
                           f"e.g. --question 'What is 2+3?'")
    _check_common(args)
    settings = _stepflow_settings(args)
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise StepSalError(f"prompt file {str(path)!r} does not exist")
        prompt = read_utf8(path, "prompt file")
        if not prompt.strip():
            raise StepSalError(f"prompt file {str(path)!r} is empty; write the raw prompt "
                               f"into it, or pass --question")
        kwargs = {"prompts": [prompt]}
    else:
        kwargs = {"questions": [args.question]}
    inputs = {"--prompt-file": args.prompt_file, "--model": args.model}
    with output_file(args.out, overwrite=args.overwrite, inputs=inputs) as tmp:
        print(f"loading {args.model} ...", file=sys.stderr)
        model = _load_model(args.model, device=args.device, dtype=None, format=args.format)
        [gen] = generate(model, **kwargs, max_new_tokens=args.max_new_tokens,
                         stepflow=settings, temperature=args.temperature, seed=args.seed,
                         progress=False)
        tmp.write_text(json.dumps(gen.to_dict(), indent=1, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    seg = gen.segments()
    print(f"{len(gen.completion_ids)} tokens ({'finished' if gen.finished else 'budget reached'}"
          f"); summary: {seg['summary']!r}; wrote {args.out}", file=sys.stderr)
    return 0


def eval_cmd(args: argparse.Namespace) -> int:

    _check_common(args)
    use_ray = check_ray_options(args)
    settings = _stepflow_settings(args)
    check_eval_settings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        samples=args.samples, temperature=args.temperature, seed=args.seed)
    problems = load_problems(args.data, limit=args.limit)
    problems, code_kw = _code_options(args, problems)  # issue 21: coding problems
    # the folder's lock, permissions and settings are checked before the model is loaded
    known = {"model": args.model, "data": str(args.data),
             "stepflow": None if settings is None else settings.to_dict(),
             "max_new_tokens": args.max_new_tokens, "samples": args.samples,
             "temperature": args.temperature, "seed": args.seed}
    if args.format is not None:

        known["format"] = get_format(args.format).name
    known.update(run_identity(problems, args.data), model_fingerprint=model_fingerprint(args.model))
    inputs = {"--data": args.data, "--model": args.model}
    check_run_folder(args.out, known, inputs=inputs)
    if use_ray:  # the driver writes the folder, Ray workers generate (stepsal_lens.eval.scale)

        if code_kw:
            raise StepSalError("coding problems are judged in this process; run without --ray")

        print(f"starting Ray workers for {args.model} ...", file=sys.stderr)
        with run_folder(args.out, command="eval", inputs=inputs), \
                pool_from_args(args, len(problems) * args.samples) as pool:
            run = evaluate_ray(pool, problems, args.out, stepflow=settings,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               samples=args.samples, temperature=args.temperature,
                               seed=args.seed, model_name=args.model, data_name=str(args.data))
    else:
        run = _eval_here(args, problems, settings, inputs, code_kw)
    s = run.summary
    if s.get("could_not_run"):
        print(f"warning: {s['could_not_run']} problem(s) could not run (each recorded with its "
              f"'error' in results.jsonl): {', '.join(s['could_not_run_ids'][:5])}",
              file=sys.stderr)
    print(f"accuracy {100 * s['accuracy']:.1f}% ({s['correct']}/{s['n']}, 95% CI "
          f"{100 * s['ci95'][0]:.1f}-{100 * s['ci95'][1]:.1f}); wrote {run.out}/results.jsonl, "
          f"summary.json", file=sys.stderr)
    if "code" in s:
        ks = ", ".join(f"{k} {100 * v['value']:.1f}%" for k, v in s["code"]["pass@k"].items())
        print(f"{ks}; verdicts {s['code']['verdicts']}; sandbox "
              f"{run.config['code']['sandbox']['backend']}", file=sys.stderr)
    return 0


# ---- issue 21: coding problems (stepsal_lens.eval.code) ----------------------------------

def _code_limits(args: argparse.Namespace):

    return Limits(timeout=args.code_timeout, memory_mb=args.code_memory_mb)


def _code_options(args: argparse.Namespace, problems):
    """Date window and sandbox of coding problems, checked before the model loads:
    (problems, keyword arguments for evaluate)."""

    if args.after is not None or args.before is not None:
        problems = filter_dates(problems, after=args.after, before=args.before)
    if not any(p.kind == "code" for p in problems):
        return problems, {}
    if args.code_workers < 1:
        raise StepSalError(f"--code-workers must be at least 1; got {args.code_workers}")
    sandbox = "none" if args.no_sandbox else "auto"
    detect_backend(sandbox)  # no sandbox: refuse now, naming the fix
    if args.no_sandbox:
        print("stepsal: warning: --no-sandbox: model programs run UNSANDBOXED on this "
              "machine (recorded in run.json)", file=sys.stderr)
    return problems, {"code_workers": args.code_workers, "sandbox": sandbox,
                      "code_limits": _code_limits(args)}


def _add_code_options(p: argparse.ArgumentParser, *, dates: bool) -> None:
    g = p.add_argument_group("coding problems (LiveCodeBench)")
    g.add_argument("--code-workers", type=int, default=1, metavar="N",
                   help="programs judged at once, each in its own sandbox (default 1)")
    g.add_argument("--code-timeout", type=float, default=6.0, metavar="S",
                   help="seconds per test (LiveCodeBench's default 6)")
    g.add_argument("--code-memory-mb", type=int, default=4096, metavar="MIB",
                   help="memory per program process, MiB (default 4096)")
    g.add_argument("--no-sandbox", action="store_true",
                   help="run model programs WITHOUT a sandbox (unsafe; recorded)")
    if dates:
        g.add_argument("--after", default=None, metavar="YYYY-MM-DD",
                       help="only problems with contest_date on or after this day")
        g.add_argument("--before", default=None, metavar="YYYY-MM-DD",
                       help="only problems with contest_date on or before this day")


def _eval_here(args: argparse.Namespace, problems, settings, inputs, code_kw=None):
    """``stepsal eval`` in this process."""

    with run_folder(args.out, command="eval", inputs=inputs):
        print(f"loading {args.model} ...", file=sys.stderr)
        model = _load_model(args.model, device=args.device, dtype=None, format=args.format)
        run = evaluate(model, problems, args.out, stepflow=settings,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       samples=args.samples, temperature=args.temperature, seed=args.seed,
                       model_name=args.model, data_name=str(args.data), **(code_kw or {}))
    return run


def compare_cmd(args: argparse.Namespace) -> int:

    result = compare_runs(args.run_a, args.run_b)
    print(json.dumps(result, indent=1))
    return 0


def _grade_rows(path: Path) -> list[dict]:
    """Read and check every line of a ``stepsal grade`` input before grading any."""

    fix = ('each line must be a JSON object like {"output": "... \\\\boxed{2}", "answer": "2", '
           '"kind": "math"}')
    rows = []
    for where, row in read_jsonl(path, what="input file", fix=fix):
        if row.get("kind") == "code":  # issue 21: checked by eval/code/run.py
            if not isinstance(row.get("output"), str):
                raise StepSalError(f"{where}: 'output' must be the model's text (a string)")
            row["_where"] = where
            rows.append(row)
            continue
        missing = [k for k in ("output", "answer") if row.get(k) is None]
        if missing:
            raise StepSalError(f"{where} lacks {' and '.join(map(repr, missing))} (keys: "
                               f"{sorted(row)}); {fix}")
        if not isinstance(row["output"], str):
            raise StepSalError(f"{where}: 'output' must be the model's text (a string), not "
                               f"{type(row['output']).__name__}")
        if not isinstance(row["answer"], (str, int, float)) or isinstance(row["answer"], bool):
            raise StepSalError(f"{where}: 'answer' must be a string or a number, not "
                               f"{type(row['answer']).__name__}")
        if row.get("kind", "math") not in KINDS:
            raise StepSalError(f"{where} has kind {row['kind']!r}; use one of "
                               f"{list(KINDS) + ['code']} (or leave it out for math)")
        rows.append(row)
    if not rows:
        raise StepSalError(f"input file {str(path)!r} holds no lines to grade")
    return rows


def grade_cmd(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm


    src, out = Path(args.input), Path(args.out)
    inputs = {"IN.jsonl": args.input}
    check_new_file(out, overwrite=args.overwrite, inputs=inputs)
    check_timeout(args.timeout, "--timeout")
    rows = _grade_rows(src)
    code = _grade_code(args, rows)  # issue 21: code lines, judged in sandboxes
    n_correct = n_errors = 0
    with output_file(out, overwrite=args.overwrite, inputs=inputs) as tmp, \
            open(tmp, "w", encoding="utf-8") as f:
        for i, row in enumerate(tqdm(rows, desc="grading", unit="line", disable=None)):
            if i in code:
                n_correct += code[i]["correct"]
                f.write(dumps_line(code[i]))
                continue
            verdict = grade_output(row["output"], row["answer"], row.get("kind", "math"),
                                   timeout=args.timeout)
            rec = {**row, "prediction": verdict.prediction, "correct": verdict.correct}
            rec.pop("grading_error", None)
            if verdict.error:
                rec["grading_error"] = verdict.error
            n_correct += verdict.correct
            n_errors += verdict.error is not None
            f.write(dumps_line(rec))
    print(f"{n_correct}/{len(rows)} correct ({100 * n_correct / len(rows):.1f}%), "
          f"{n_errors} grading errors; wrote {out}", file=sys.stderr)
    return 0


def _grade_code(args: argparse.Namespace, rows: list[dict]) -> dict[int, dict]:
    """``stepsal grade``'s code lines: line index -> graded line (all checked first)."""

    idx = [i for i, r in enumerate(rows) if r.get("kind") == "code"]
    if not idx:
        return {}
    wheres = [rows[i].pop("_where") for i in idx]
    for i, w in zip(idx, wheres):
        line_tests(rows[i], w)  # every line checked before any program runs
    if args.code_workers < 1:
        raise StepSalError(f"--code-workers must be at least 1; got {args.code_workers}")
    graded = grade_code_lines([rows[i] for i in idx], workers=args.code_workers,
                              limits=_code_limits(args), wheres=wheres,
                              sandbox="none" if args.no_sandbox else "auto")
    return dict(zip(idx, graded))


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default=None, help="reasoning format (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default=None)
    add_stepflow_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepsal", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="Step-Saliency maps and metrics of one trace "
                                       "(--trace) or of many (--traces)")
    p.add_argument("--model", required=True,
                   help="local checkpoint folder, hub name, or random:ARCH")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trace",
                       help='JSON with {"question","thinking","summary"} or {"text"}')
    which.add_argument("--traces", metavar="FILE.jsonl",
                       help="many traces, one JSON per line (plus optional id, correct): "
                            "a folder per trace, metrics.csv, compare.csv (resumable)")
    p.add_argument("--out", required=True,
                   help="output folder (must be new or empty; with --traces: re-run to resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder as a whole")
    p.add_argument("--format", default=None, help="reasoning format (default: the model's)")
    p.add_argument("--target", default="lm", choices=list_targets())
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None,
                   help="float32 (default) or bfloat16; float16 is refused (its attention "
                        "gradients underflow)")
    p.add_argument("--engine", choices=list_engines(), default="auto",
                   help="saliency engine (default auto: fused unless hooks or a "
                        "low-precision model with sinks need the hook_pattern reference)")
    p.add_argument("--low-memory", action="store_true",
                   help="recompute layer by layer: peak memory of one layer's attention")
    p.add_argument("--effects", action="store_true",
                   help="with --traces: also each trace's causal effect matrix")
    add_ray_options(p)
    p.set_defaults(func=analyze)

    f = sub.add_parser("effects", help="causal effect matrix of one trace (step knockouts)")
    f.add_argument("--model", required=True,
                   help="local checkpoint folder, hub name, or random:ARCH")
    f.add_argument("--trace", required=True,
                   help='JSON with {"question","thinking","summary"} or {"text"}')
    f.add_argument("--out", required=True, help="output folder (must be new or empty)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace an earlier result folder of stepsal's as a whole")
    f.add_argument("--format", default=None, help="reasoning format (default: the model's)")
    f.add_argument("--layers", nargs="?", const="all", default=None,
                   help="also the effects with the cut in one layer at a time: every layer, "
                        "or e.g. --layers 0,2")
    f.add_argument("--target", default="lm", choices=list_targets(),
                   help="Step-Saliency target the effects are correlated with (default lm)")
    f.add_argument("--batch-size", type=int, default=8, help="cuts per forward pass")
    f.add_argument("--device", default=None)
    f.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")
    f.set_defaults(func=effects_cmd)

    d = sub.add_parser("demo", help="generate, grade and compare correct vs wrong traces")
    d.add_argument("--model", default="tiny-lrm", help="model (default: the bundled tiny-lrm)")
    d.add_argument("--n", type=int, default=40, help="number of problems (default 40)")
    d.add_argument("--out", default="stepsal-demo", help="output folder (must be new or empty)")
    d.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder as a whole")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--data", default=None,
                   help='JSONL of {"question", "answer"} instead of the built-in task')
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--device", default=None)
    d.add_argument("--no-stepflow", action="store_true",
                   help="skip the second pass with StepFlow on")
    d.set_defaults(func=demo)

    g = sub.add_parser("generate", help="generate one trace, with or without StepFlow")
    g.add_argument("--model", required=True, help="tiny-lrm, a local folder, hub name, or random:ARCH")
    g.add_argument("--question", default=None, help="question (wrapped in the model's format)")
    g.add_argument("--prompt-file", default=None, help="file holding a raw prompt instead")
    g.add_argument("--out", required=True, help="output JSON file (must not exist)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_generation_options(g)
    g.set_defaults(func=generate_cmd)

    e = sub.add_parser("eval", help="accuracy on a benchmark file (resumable)")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True,
                   help="local .jsonl/.json/.parquet/.csv (MATH-500, AIME, AMC23, GPQA, "
                        "LiveCodeBench layouts) or tiny:SPLIT for the bundled task")
    e.add_argument("--out", required=True, help="run folder (re-run to resume)")
    e.add_argument("--limit", type=int, default=None, help="first N problems")
    e.add_argument("--samples", type=int, default=1, help="generations per problem")
    e.add_argument("--batch-size", type=int, default=8)
    _add_generation_options(e)
    add_ray_options(e)
    _add_code_options(e, dates=True)
    e.set_defaults(func=eval_cmd)

    c = sub.add_parser("compare", help="paired McNemar test of two eval runs")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.set_defaults(func=compare_cmd)

    r = sub.add_parser("grade", help="re-grade model outputs in a JSONL file")
    r.add_argument("input", metavar="IN.jsonl",
                   help='lines of {"output": model text, "answer": gold, "kind": "math"|"choice"}')
    r.add_argument("--out", required=True, metavar="OUT.jsonl",
                   help="each input line plus prediction, correct (and grading_error); must "
                        "not exist")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    r.add_argument("--timeout", type=float, default=10.0,
                   help="seconds of symbolic comparison per line (default 10)")
    _add_code_options(r, dates=False)
    r.set_defaults(func=grade_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StepSalError as err:
        print(f"stepsal: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # eval's message says how far it got and how to resume; the other commands write
        # their output atomically, so nothing half-written is left
        print(f"stepsal: {err or 'interrupted; nothing was written'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
