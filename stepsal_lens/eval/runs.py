"""Accuracy runs: generate, grade, write a resumable run folder; paired comparisons.

* :func:`evaluate` generates, grades (:mod:`stepsal_lens.eval.grading`) and writes
  ``results.jsonl`` (one line per problem and sample, with ``grading_error`` set where
  the grader could not decide) and ``summary.json`` (accuracy with a 95% Wilson
  interval); an interrupted run continues where it stopped.
* :func:`compare_runs` pairs two runs problem by problem and runs an exact McNemar test.

Problems come from :func:`~stepsal_lens.eval.problems.load_problems`.

Examples
--------
>>> import tempfile
>>> from stepsal_lens import evaluate, load_lrm
>>> from stepsal_lens.eval.problems import load_problems
>>> run = evaluate(load_lrm("tiny-lrm"), load_problems("tiny:id", limit=2),
...                tempfile.mkdtemp(), progress=False)
>>> run.summary["n"]
2
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepsal_lens._checks import (check_count, check_seed, check_temperature, check_timeout,
                                  check_type)
from stepsal_lens._version import __version__
from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.code.passk import code_summary
from stepsal_lens.eval.code.run import code_settings, judge_outputs
from stepsal_lens.eval.grading import Grade, grade_output
from stepsal_lens.eval.problems import Problem
from stepsal_lens.fingerprint import file_fingerprint
from stepsal_lens.lens.generation import generate
from stepsal_lens.results.config import StepFlowConfig
from stepsal_lens.results.jsonl import dumps_line, read_jsonl, write_jsonl
from stepsal_lens.results.outputs import check_run_dir, run_folder, write_text_atomic
from stepsal_lens.segments.association import info_of, model_name as name_of
from stepsal_lens.typing import Model

__all__ = [
    "EvalRun",
    "check_eval_settings",
    "check_run_folder",
    "compare_runs",
    "evaluate",
    "problems_fingerprint",
    "read_records",
    "sample_seed",
]


# ---- runs ---------------------------------------------------------------------------------

def _wilson(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


@dataclass
class EvalRun:
    """A finished (or resumed) evaluation: its folder, records and summary."""

    out: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.summary["accuracy"]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.records)


def _summarize(records: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    n, k = len(records), sum(r["correct"] for r in records)
    errors = sum(bool(r.get("grading_error")) for r in records)
    failed = [r for r in records if r.get("error")]
    low, high = _wilson(k, n)
    by_source: dict[str, list[bool]] = {}
    for r in records:
        by_source.setdefault(r["source"], []).append(r["correct"])
    return {"n": n, "correct": k, "accuracy": k / n if n else 0.0, "ci95": [low, high],
            "ci_method": "Wilson score interval (over problem x sample records)",
            "grading_errors": errors,
            "could_not_run": len(failed),
            "could_not_run_ids": sorted({r["id"] for r in failed})[:20],
            "finished_fraction": sum(r["finished"] for r in records) / n if n else 0.0,
            "mean_completion_tokens": sum(r["n_completion_tokens"] for r in records) / n if n else 0.0,
            "by_source": {s: sum(v) / len(v) for s, v in by_source.items()},
            "config": config, **_code_summary(records)}


def _code_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 21 (coding): ``{"code": pass@k by platform / difficulty, verdicts}`` or {}."""

    code = code_summary(records)
    return {"code": code} if code else {}


def check_eval_settings(*, max_new_tokens: int = 256, batch_size: int = 8, samples: int = 1,
                        temperature: float = 0.0, seed: int = 0,
                        grading_timeout: float | int = 10.0) -> None:
    """Refuse bad evaluation settings (no model needed: the CLI calls it before loading)."""
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                        ("samples", samples)):
        check_count(value, name)
    check_seed(seed)
    check_temperature(temperature)
    if samples > 1 and temperature <= 0:
        raise StepSalError("samples > 1 with greedy decoding gives identical samples; pass "
                           "temperature > 0 (e.g. 0.6)")
    check_timeout(grading_timeout, "grading_timeout")


# Filled in only once the model is loaded (None before: matches anything).
_KNOWN_LATER = ("model_fingerprint", "format")
# How a changed identity reads in a message.
_WHAT_CHANGED = {
    "model_fingerprint": "the model's files (weights, config or tokenizer) are not those the "
                         "run began with",
    "data_fingerprint": "the data file's content changed",
    "problems": "the problems differ (an edited or another data file, or another --limit)",
    "traces": "the traces file's content changed (lines edited, added or removed)",
    "stepsal": "it was written by another stepsal version",
}


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings of ``new`` that differ from ``old``; a StepFlow value of None in ``new``
    (not resolved yet: layers before the model is loaded) matches anything, and so do
    the values known only after loading (:data:`_KNOWN_LATER`)."""
    diff = {}
    for key, value in new.items():
        before = old.get(key)
        if key in _KNOWN_LATER and value is None:
            continue
        if key == "stepflow" and isinstance(value, dict) and isinstance(before, dict):
            inner = {k: (before.get(k), v) for k, v in value.items()
                     if v is not None and before.get(k) != v}
            if inner:
                diff[key] = inner
        elif before != value:
            diff[key] = (before, value)
    return diff


def _read_run_json(out: Path) -> dict[str, Any] | None:
    run_file = out / "run.json"
    if not run_file.exists():
        return None
    try:
        old = json.loads(run_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise StepSalError(f"{str(run_file)!r} is not valid JSON ({err}); the run folder is "
                           f"damaged: choose another --out folder or delete this one") from None
    if not isinstance(old, dict):
        raise StepSalError(f"{str(run_file)!r} does not hold a run's settings; choose another "
                           f"--out folder or delete this one")
    return old


def describe_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    """A settings difference (:func:`_settings_diff`) as words: what changed, old and new."""
    parts = []
    for key, change in diff.items():
        if key in _WHAT_CHANGED:
            parts.append(_WHAT_CHANGED[key])
        elif isinstance(change, dict):
            parts += [f"{key}.{k}: {a!r} before, {b!r} now" for k, (a, b) in change.items()]
        else:
            parts.append(f"{key}: {change[0]!r} before, {change[1]!r} now")
    return "; ".join(parts)


def check_run_folder(out: str | Path, settings: dict[str, Any], *,
                     command: str = "eval", inputs: dict[str, Any] | None = None) -> None:
    """Refuse a run folder before any work: one another process is writing, one that is
    not writable or not a ``command`` run stepsal made, one holding an input, or one
    holding a run made from other inputs or ``settings`` (the keys of ``run.json``;
    leave out what is not known yet, e.g. the format before loading)."""
    target = check_run_dir(out, command=command, inputs=inputs)
    if not target.exists():
        return
    old = _read_run_json(target)
    if old is None:
        if (target / "results.jsonl").exists():
            raise StepSalError(f"{str(out)!r} holds results.jsonl but no run.json, so its "
                               f"settings are unknown; choose another --out folder or delete "
                               f"this one")
        return
    diff = _settings_diff(old, settings)
    if diff:
        raise StepSalError(
            f"{str(out)!r} holds a run made from other inputs or settings: "
            f"{describe_diff(diff)}; run with the old ones to resume it, or choose another "
            f"--out folder (or delete this one)")


#: How sampled runs seed each (problem, sample); recorded in ``run.json`` when sampling.
SAMPLE_SEEDING = "sha256(seed:id:sample)"


def sample_seed(seed: int, problem_id: str, sample: int) -> int:
    """The sampling seed of one (problem, sample): a function of the run's ``seed``, the
    problem's id and the sample index only.

    So a sample does not depend on which other problems share its batch, on the order
    the problems are run in, on resuming, or on the process (or Ray worker) that runs it.

    Examples
    --------
    >>> sample_seed(0, "id-3", 1) == sample_seed(0, "id-3", 1)
    True
    >>> len({sample_seed(0, "id-3", 0), sample_seed(0, "id-3", 1), sample_seed(1, "id-3", 0)})
    3
    """
    digest = hashlib.sha256(f"{seed}:{problem_id}:{sample}".encode()).hexdigest()
    return int(digest[:15], 16)  # 60 bits: a valid torch.manual_seed


def problems_fingerprint(problems: Sequence[Problem]) -> str:
    """``"sha256:<hex>"`` of the problems a run covers, in order, by content (every field
    but the source's name: ids, questions, answers, choices, instructions, and a coding
    problem's tests, function name and starter code): another file, an edited one or
    another ``--limit`` gives another value.

    Examples
    --------
    >>> from stepsal_lens.eval.problems import load_problems
    >>> a = problems_fingerprint(load_problems("tiny:id", limit=3))
    >>> a == problems_fingerprint(load_problems("tiny:id", limit=2))
    False
    """
    h = hashlib.sha256()
    for p in problems:
        fields = dataclasses.asdict(p)
        fields.pop("source", None)  # the file's name: a renamed copy holds the same problems
        h.update(json.dumps(fields, sort_keys=True, ensure_ascii=False,
                            default=str).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def run_identity(problems: Sequence[Problem], data: str | Path | None) -> dict[str, Any]:
    """What ``run.json`` records of a run's inputs besides the model: the stepsal
    version, the data file's fingerprint (when ``data`` is a file) and the problems'."""
    is_file = data is not None and Path(data).is_file()
    return {"stepsal": __version__,
            "data_fingerprint": file_fingerprint(data) if is_file else None,
            "problems": problems_fingerprint(problems), "n_problems": len(problems)}


def run_config(model_name: str, data_name: str | None, sf: StepFlowConfig | None,
                format_name: str, *, max_new_tokens: int, samples: int, temperature: float,
                seed: int) -> dict[str, Any]:
    """The settings ``run.json`` records (``sf``: StepFlow resolved, or None)."""
    config = {"model": model_name, "data": data_name,
              "stepflow": None if sf is None else sf.to_dict(),
              "max_new_tokens": max_new_tokens, "samples": samples,
              "temperature": temperature, "seed": seed, "format": format_name}
    if temperature > 0:
        config["seeding"] = SAMPLE_SEEDING
    return config


def evaluate(model: Model, problems: Sequence[Problem], out: str | Path, *,
             stepflow: StepFlowConfig | None = None, max_new_tokens: int = 256,
             batch_size: int = 8, samples: int = 1, temperature: float = 0.0, seed: int = 0,
             model_name: str | None = None, data_name: str | None = None,
             grading_timeout: float | int = 10.0, progress: bool = True,
             code_workers: int = 1, sandbox: str = "auto", code_limits: Any = None) -> EvalRun:
    """Generate, grade and record every (problem, sample); resumable.

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm`.
    problems
        From :func:`~stepsal_lens.eval.problems.load_problems`.
    out
        Run folder: ``run.json`` (settings), ``results.jsonl``, ``summary.json``. If it
        already holds results of the same settings, only the missing ones are generated.
    stepflow
        A :class:`~stepsal_lens.StepFlowConfig` (None: off); ``run.json`` records it
        resolved (explicit layers).
    samples
        Generations per problem (needs ``temperature > 0`` when above 1).
    temperature, seed
        0 (default): greedy, batched. Above 0: each (problem, sample) is sampled on its
        own with the seed :func:`sample_seed` ``(seed, problem id, sample)``, recorded in
        its record's ``seed``; so samples do not depend on batching, resuming or the
        worker that runs them (:func:`stepsal_lens.eval.scale.evaluate_ray`).
    grading_timeout
        Seconds the grader may spend on one answer's symbolic comparisons; past it the
        record is not correct and its ``grading_error`` says why.
    code_workers, sandbox, code_limits
        Coding problems (:mod:`stepsal_lens.eval.code`): programs judged at once, the
        sandbox backend (``"auto"``; ``"none"`` runs them unsandboxed and says so in
        ``run.json``) and the :class:`~stepsal_lens.eval.code.sandbox.Limits`.

    Notes
    -----
    Every setting is checked before ``run.json`` is written. One process writes a folder
    at a time (``.stepsal.lock``); a second :func:`evaluate` on it refuses while the first
    runs. Ctrl-C raises ``KeyboardInterrupt("interrupted after N of M; ...")`` with the
    finished records saved: call it again to resume.
    """
    check_eval_settings(max_new_tokens=max_new_tokens, batch_size=batch_size, samples=samples,
                        temperature=temperature, seed=seed, grading_timeout=grading_timeout)
    check_problems(problems)
    out = Path(out)
    if stepflow is not None and not isinstance(stepflow, StepFlowConfig):
        raise StepSalError(f"stepflow must be a StepFlowConfig or None; got {stepflow!r}")
    sf = None if stepflow is None else stepflow.resolve(model.cfg.n_layers, model.cfg.n_ctx)
    info = info_of(model)
    config = run_config(model_name or name_of(model), data_name, sf, info.format.name,
                         max_new_tokens=max_new_tokens, samples=samples,
                         temperature=temperature, seed=seed)
    config.update(run_identity(problems, data_name), model_fingerprint=info.fingerprint)
    inputs = {"data": data_name, "model": info.source or None}
    # ---- issue 21 (coding): the sandbox that judges the programs, recorded in run.json ----

    code = code_settings(problems, sandbox=sandbox, limits=code_limits)
    if code is not None:
        config["code"] = code
        code = dict(code, workers=code_workers)
    # everything is checked before run.json is written: a refused run leaves no trace
    check_run_folder(out, config, inputs=inputs)
    with run_folder(out, command="eval", inputs=inputs):
        return _evaluate_locked(model, problems, out, config, sf, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, samples=samples, temperature=temperature,
                                seed=seed, grading_timeout=grading_timeout, progress=progress,
                                code=code)


def check_problems(problems: Sequence[Problem]) -> None:
    check_type(problems, (list, tuple), "problems",
               "a list of Problem (from stepsal_lens.eval.problems.load_problems)")
    bad = [p for p in problems if not isinstance(p, Problem)][:1]
    if bad:
        raise StepSalError(f"problems must hold Problem objects (from load_problems); got a "
                           f"{type(bad[0]).__name__}")
    if not problems:
        raise StepSalError("no problems to evaluate")
    ids = [p.id for p in problems]
    if len(set(ids)) < len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise StepSalError(f"problem ids {dup} occur more than once; records are keyed by id, "
                           f"so give every problem its own id")


# The fields of a results.jsonl record and their JSON types (None allowed where listed).
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "sample": (int,), "source": (str,), "kind": (str,), "correct": (bool,),
    "finished": (bool,), "n_completion_tokens": (int,), "prediction": (str, type(None)),
    "grading_error": (str, type(None)),
}


def _check_record(where: str, r: dict[str, Any]) -> dict[str, Any]:
    fix = ("results.jsonl was edited or written by another tool: fix that line, or delete it "
           "to generate the record again")
    missing = [k for k in _RECORD_FIELDS if k not in r]
    if missing:
        raise StepSalError(f"{where} lacks {missing}; {fix}")
    for key, types in _RECORD_FIELDS.items():
        value = r[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "int":
                               "a whole number", "bool": "true or false"}[t.__name__]
                               for t in types)
            raise StepSalError(f"{where}: {key!r} must be {want}, not {value!r}; {fix}")
    if r["sample"] < 0 or r["n_completion_tokens"] < 0:
        raise StepSalError(f"{where}: 'sample' and 'n_completion_tokens' must be >= 0; {fix}")
    return r


def read_records(path: str | Path, *, tolerate_cut: bool = False) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl``, each checked (keys and types: ``correct`` is a
    boolean, ...); one clear error naming the line otherwise. ``tolerate_cut``: drop a
    last line cut by a killed writer (a resume generates it again)."""
    fix = "results.jsonl holds one JSON record per line, as `stepsal eval` writes it"
    return [_check_record(where, r) for where, r in
            read_jsonl(path, what="results file", fix=fix, tolerate_cut=tolerate_cut)]


def _read_results(results_file: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Records by (id, sample); a duplicated line is read once (the last one wins)."""
    return {(r["id"], r["sample"]): r for r in read_records(results_file, tolerate_cut=True)}


def open_results(out: Path, config: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """Write ``run.json`` and read the records already in ``results.jsonl`` (rewritten
    without a line cut by an interrupt); the caller holds the folder's lock."""
    check_run_folder(out, config)  # again, now that the folder is ours
    run_file, results_file = out / "run.json", out / "results.jsonl"
    write_text_atomic(run_file, json.dumps(config, indent=1) + "\n")
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if results_file.exists():
        done = _read_results(results_file)
        # rewrite without a possibly cut last line (or a duplicate)
        write_jsonl(results_file, done.values())
    return done


def append_records(f, done: dict[tuple[str, int], dict[str, Any]],
                    records: list[dict[str, Any]]) -> None:
    """Append records to the open ``results.jsonl`` (flushed) and to ``done``."""
    for rec in records:
        done[(rec["id"], rec["sample"])] = rec
        f.write(dumps_line(rec))
    f.flush()


def interrupted_error(done, keys, results_file: Path) -> KeyboardInterrupt:
    n_done = sum(k in done for k in keys)
    return KeyboardInterrupt(
        f"interrupted after {n_done} of {len(keys)}; the finished records are in "
        f"{str(results_file)!r}: run the same command to resume")


def finish_run(out: Path, keys: list[tuple[str, int]],
                done: dict[tuple[str, int], dict[str, Any]], config: dict[str, Any]) -> EvalRun:
    """Rewrite ``results.jsonl`` in problem order, write ``summary.json``."""
    write_jsonl(out / "results.jsonl", [done[k] for k in keys])
    records = [done[k] for k in keys]
    summary = _summarize(records, config)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return EvalRun(out, records, summary, config)


def _evaluate_locked(model, problems, out: Path, config: dict[str, Any], sf, *,
                     max_new_tokens: int, batch_size: int, samples: int, temperature: float,
                     seed: int, grading_timeout: float | int, progress: bool,
                     code: dict[str, Any] | None = None) -> EvalRun:
    """The body of :func:`evaluate`, run while holding the folder's lock."""
    from tqdm.auto import tqdm

    done = open_results(out, config)
    results_file = out / "results.jsonl"
    keys = [(p.id, s) for p in problems for s in range(samples)]
    todo = [(p, s) for p in problems for s in range(samples) if (p.id, s) not in done]
    bar = tqdm(total=len(todo), desc="evaluating", unit="problem", disable=not progress)
    try:
        with open(results_file, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                append_records(f, done, eval_chunk(
                    model, chunk, sf, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    temperature=temperature, seed=seed, grading_timeout=grading_timeout,
                    code=code))
                bar.update(len(chunk))
    except KeyboardInterrupt:
        raise interrupted_error(done, keys, results_file) from None
    finally:
        bar.close()
    return finish_run(out, keys, done, config)


def _record(p: Problem, s: int, g, grading_timeout: float | int,
            seed: int | None, code_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Grade one generation into its ``results.jsonl`` record."""
    seg = g.segments()
    if p.kind == "code":  # issue 21: judged in a sandbox by eval_chunk (eval/code/run.py)
        if code_fields is None:
            raise StepSalError("coding problems are judged by `stepsal eval` in this process "
                               "(not yet with --ray); run without --ray")
        verdict = Grade(code_fields["code"], code_fields["correct"], method=code_fields["verdict"])
    elif seg["error"] or seg["truncated"]:
        verdict = Grade(None, False, method="no answer")
    else:
        verdict = grade_output(seg["summary"], p.answer, p.kind, timeout=grading_timeout)
    return {"id": p.id, "sample": s, "source": p.source, "kind": p.kind,
            "answer": p.answer, "prediction": verdict.prediction,
            "correct": verdict.correct, "grading_error": verdict.error,
            "finished": g.finished,
            "truncated": seg["truncated"],
            "n_completion_tokens": len(g.completion_ids),
            "completion": g.text[len(g.prompt):] if g.text.startswith(g.prompt)
            else g.text, "stats": g.stats, "seed": seed, "error": None,
            **({k: v for k, v in code_fields.items() if k not in ("code", "correct")}
               if code_fields is not None else {})}


def _failed_record(p: Problem, s: int, error: str, seed: int | None) -> dict[str, Any]:
    """The record of a (problem, sample) that could not run (e.g. its prompt does not fit
    the model's context): not correct, with the reason; the run goes on."""
    return {"id": p.id, "sample": s, "source": p.source, "kind": p.kind, "answer": p.answer,
            "prediction": None, "correct": False, "grading_error": None, "finished": False,
            "truncated": False, "n_completion_tokens": 0, "completion": "", "stats": None,
            "seed": seed, "error": error}


def eval_chunk(model, chunk: Sequence[tuple[Problem, int]], sf, *, max_new_tokens: int,
                batch_size: int, temperature: float, seed: int,
                grading_timeout: float | int,
                code: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Generate and grade (problem, sample) pairs: the records, in ``chunk``'s order.

    Greedy pairs are generated in batches (left padding changes no row). Sampled pairs
    are generated one at a time, each seeded with :func:`sample_seed`, so a sample is
    the same whichever batch, order, process or Ray worker runs it. This is the unit of
    work of :func:`evaluate` and of :func:`stepsal_lens.eval.scale.evaluate_ray`.
    """

    def run(questions: list[str], row_seed: int | None) -> list:
        return generate(model, questions, stepflow=sf, max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=row_seed,
                        batch_size=batch_size, progress=False)

    def alone(p: Problem, row_seed: int | None):
        """The generation, or why this problem cannot run (the others can)."""
        try:
            return run([p.prompt_question()], row_seed)[0]
        except StepSalError as err:
            return str(err)

    if temperature > 0:
        seeds: list[int | None] = [sample_seed(seed, p.id, s) for p, s in chunk]
        gens = [alone(p, row_seed) for (p, _), row_seed in zip(chunk, seeds)]
    else:
        seeds = [None] * len(chunk)
        try:
            gens = run([p.prompt_question() for p, _ in chunk], None)
        except StepSalError:  # one problem of the batch cannot run: find it, keep the rest
            gens = [alone(p, None) for p, _ in chunk]
    fields: list[dict[str, Any] | None] = [None] * len(chunk)
    if code is not None:  # issue 21: the chunk's programs, code["workers"] at a time

        ran = [i for i, g in enumerate(gens) if not isinstance(g, str)]
        judged = judge_outputs([(chunk[i][0], gens[i].segments()["summary"]) for i in ran],
                               code, workers=code.get("workers", 1))
        for i, f in zip(ran, judged):
            fields[i] = f
    return [_failed_record(p, s, g, row_seed) if isinstance(g, str)
            else _record(p, s, g, grading_timeout, row_seed, f)
            for (p, s), g, row_seed, f in zip(chunk, gens, seeds, fields)]


def _load_run(run: str | Path | EvalRun) -> tuple[dict[tuple[str, int], bool], dict[str, Any]]:
    """A run's verdicts by (id, sample), and its ``run.json``."""
    if isinstance(run, EvalRun):
        records, config = run.records, run.config
    else:
        path = Path(run) / "results.jsonl"
        if not path.exists():
            raise StepSalError(f"{str(run)!r} is not an evaluation run (no results.jsonl)")
        records, config = read_records(path), _read_run_json(Path(run)) or {}
    return {(r["id"], r["sample"]): r["correct"] for r in records}, config


def _same_problems(a: str | Path | EvalRun, ca: dict[str, Any], b: str | Path | EvalRun,
                   cb: dict[str, Any]) -> None:
    """Refuse to pair two runs unless they were made from the same problems."""
    name = lambda r: str(r.out if isinstance(r, EvalRun) else r)  # noqa: E731
    if "problems" not in ca or "problems" not in cb:
        old = name(a) if "problems" not in ca else name(b)
        raise StepSalError(f"{old!r} does not record which problems it ran (a run of stepsal "
                           f"< 0.2), so pairing it by id could pair unrelated problems; run it "
                           f"again with this version")
    if ca["problems"] != cb["problems"]:
        what = ["the problems differ"]
        if ca.get("n_problems") != cb.get("n_problems"):
            what.append(f"{ca.get('n_problems')} vs {cb.get('n_problems')} problems (another "
                        f"--limit?)")
        if ca.get("data_fingerprint") != cb.get("data_fingerprint"):
            what.append(f"data {ca.get('data')!r} vs {cb.get('data')!r} with other content")
        raise StepSalError(f"{name(a)!r} and {name(b)!r} were not run on the same problems "
                           f"({'; '.join(what)}); compare runs of the same data file and "
                           f"--limit")


def compare_runs(a: str | Path | EvalRun, b: str | Path | EvalRun) -> dict[str, Any]:
    """Paired comparison of two runs on the problems (and samples) they share.

    Returns accuracies, the discordant counts (``a_only``: right in ``a`` only,
    ``b_only``), and the exact McNemar p-value (two-sided binomial test on the
    discordant pairs).
    """
    from scipy.stats import binomtest

    (ra, ca), (rb, cb) = _load_run(a), _load_run(b)
    _same_problems(a, ca, b, cb)
    shared = sorted(set(ra) & set(rb))
    if not shared:
        raise StepSalError("the two runs share no problems; compare runs on the same data")
    a_only = sum(ra[k] and not rb[k] for k in shared)
    b_only = sum(rb[k] and not ra[k] for k in shared)
    n = len(shared)
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    acc_a, acc_b = sum(ra[k] for k in shared) / n, sum(rb[k] for k in shared) / n
    return {"n": n, "accuracy_a": acc_a, "accuracy_b": acc_b, "difference": acc_b - acc_a,
            "a_only": a_only, "b_only": b_only, "mcnemar_p": float(p),
            "test": "exact McNemar (binomial on discordant pairs)"}

