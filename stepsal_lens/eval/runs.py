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

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.grading import Grade, grade_output
from stepsal_lens.eval.problems import Problem
from stepsal_lens.results.config import StepFlowConfig
from stepsal_lens.segments.association import info_of, model_name as name_of

__all__ = [
    "EvalRun",
    "check_eval_settings",
    "check_run_folder",
    "compare_runs",
    "evaluate",
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
    low, high = _wilson(k, n)
    by_source: dict[str, list[bool]] = {}
    for r in records:
        by_source.setdefault(r["source"], []).append(r["correct"])
    return {"n": n, "correct": k, "accuracy": k / n if n else 0.0, "ci95": [low, high],
            "ci_method": "Wilson score interval (over problem x sample records)",
            "grading_errors": errors,
            "finished_fraction": sum(r["finished"] for r in records) / n if n else 0.0,
            "mean_completion_tokens": sum(r["n_completion_tokens"] for r in records) / n if n else 0.0,
            "by_source": {s: sum(v) / len(v) for s, v in by_source.items()},
            "config": config, **_code_summary(records)}


def _code_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 21 (coding): ``{"code": pass@k by platform / difficulty, verdicts}`` or {}."""
    from stepsal_lens.eval.code.passk import code_summary

    code = code_summary(records)
    return {"code": code} if code else {}


def check_eval_settings(*, max_new_tokens: int = 256, batch_size: int = 8, samples: int = 1,
                        temperature: float = 0.0, seed: int = 0,
                        grading_timeout: float | int = 10.0) -> None:
    """Refuse bad evaluation settings (no model needed: the CLI calls it before loading)."""
    def whole(name: str, value: Any, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise StepSalError(f"{name} must be a whole number >= {low}; got {value!r}")

    whole("max_new_tokens", max_new_tokens, 1)
    whole("batch_size", batch_size, 1)
    whole("samples", samples, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise StepSalError(f"seed must be a whole number; got {seed!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise StepSalError(f"temperature must be a finite number >= 0 (0 = greedy); got "
                           f"{temperature!r}")
    if samples > 1 and temperature <= 0:
        raise StepSalError("samples > 1 with greedy decoding gives identical samples; pass "
                           "temperature > 0 (e.g. 0.6)")
    if isinstance(grading_timeout, bool) or not isinstance(grading_timeout, (int, float)) \
            or not math.isfinite(grading_timeout) or grading_timeout <= 0:
        raise StepSalError(f"grading_timeout must be a positive number of seconds; got "
                           f"{grading_timeout!r}")


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings of ``new`` that differ from ``old``; a StepFlow value of None in ``new``
    (not resolved yet: layers before the model is loaded) matches anything."""
    diff = {}
    for key, value in new.items():
        before = old.get(key)
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


def check_run_folder(out: str | Path, settings: dict[str, Any]) -> None:
    """Refuse a run folder before any work: one another process is writing, one that is
    not a folder or not writable, or one holding a run with other ``settings`` (the keys
    of ``run.json``; leave out what is not known yet, e.g. the format before loading)."""
    from stepsal_lens.results.outputs import check_unlocked, check_writable

    out = Path(out)
    check_writable(out, what="run folder")
    if not out.exists():
        return
    check_unlocked(out)
    old = _read_run_json(out)
    if old is None:
        if (out / "results.jsonl").exists():
            raise StepSalError(f"{str(out)!r} holds results.jsonl but no run.json, so its "
                               f"settings are unknown; choose another --out folder or delete "
                               f"this one")
        return
    diff = _settings_diff(old, settings)
    if diff:
        raise StepSalError(
            f"{str(out)!r} holds a run with other settings {diff} (old, new); run with the "
            f"old settings to resume it, or choose another --out folder (or delete this one)")


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


def _run_config(model_name: str, data_name: str | None, sf: StepFlowConfig | None,
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


def evaluate(model: Any, problems: Sequence[Problem], out: str | Path, *,
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
    from stepsal_lens.results.outputs import run_lock

    check_eval_settings(max_new_tokens=max_new_tokens, batch_size=batch_size, samples=samples,
                        temperature=temperature, seed=seed, grading_timeout=grading_timeout)
    _check_problems(problems)
    out = Path(out)
    if stepflow is not None and not isinstance(stepflow, StepFlowConfig):
        raise StepSalError(f"stepflow must be a StepFlowConfig or None; got {stepflow!r}")
    sf = None if stepflow is None else stepflow.resolve(model.cfg.n_layers)
    config = _run_config(model_name or name_of(model), data_name, sf, info_of(model).format.name,
                         max_new_tokens=max_new_tokens, samples=samples,
                         temperature=temperature, seed=seed)
    # ---- issue 21 (coding): the sandbox that judges the programs, recorded in run.json ----
    from stepsal_lens.eval.code.run import code_settings

    code = code_settings(problems, sandbox=sandbox, limits=code_limits)
    if code is not None:
        config["code"] = code
        code = dict(code, workers=code_workers)
    # everything is checked before run.json is written: a refused run leaves no trace
    check_run_folder(out, config)
    with run_lock(out):
        return _evaluate_locked(model, problems, out, config, sf, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, samples=samples, temperature=temperature,
                                seed=seed, grading_timeout=grading_timeout, progress=progress,
                                code=code)


def _check_problems(problems: Sequence[Problem]) -> None:
    if not problems:
        raise StepSalError("no problems to evaluate")
    ids = [p.id for p in problems]
    if len(set(ids)) < len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise StepSalError(f"problem ids {dup} occur more than once; records are keyed by id, "
                           f"so give every problem its own id")


def _read_results(results_file: Path) -> dict[tuple[str, int], dict[str, Any]]:
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for line in results_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupt: redo it
                continue
            if isinstance(r, dict) and "id" in r and "sample" in r:
                done[(r["id"], r["sample"])] = r
    return done


def _open_results(out: Path, config: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """Write ``run.json`` and read the records already in ``results.jsonl`` (rewritten
    without a line cut by an interrupt); the caller holds the folder's lock."""
    from stepsal_lens.results.outputs import write_text_atomic

    check_run_folder(out, config)  # again, now that the folder is ours
    run_file, results_file = out / "run.json", out / "results.jsonl"
    write_text_atomic(run_file, json.dumps(config, indent=1) + "\n")
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if results_file.exists():
        done = _read_results(results_file)
        # rewrite without a possibly cut last line (or a duplicate)
        write_text_atomic(results_file, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                for r in done.values()))
    return done


def _append_records(f, done: dict[tuple[str, int], dict[str, Any]],
                    records: list[dict[str, Any]]) -> None:
    """Append records to the open ``results.jsonl`` (flushed) and to ``done``."""
    for rec in records:
        done[(rec["id"], rec["sample"])] = rec
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()


def _interrupted(done, keys, results_file: Path) -> KeyboardInterrupt:
    n_done = sum(k in done for k in keys)
    return KeyboardInterrupt(
        f"interrupted after {n_done} of {len(keys)}; the finished records are in "
        f"{str(results_file)!r}: run the same command to resume")


def _finish_run(out: Path, keys: list[tuple[str, int]],
                done: dict[tuple[str, int], dict[str, Any]], config: dict[str, Any]) -> EvalRun:
    """Rewrite ``results.jsonl`` in problem order (records of problems not in this run
    kept after them), write ``summary.json``."""
    from stepsal_lens.results.outputs import write_text_atomic

    wanted = set(keys)
    ordered = [done[k] for k in keys] + [r for k, r in done.items() if k not in wanted]
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                     for r in ordered))
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

    done = _open_results(out, config)
    results_file = out / "results.jsonl"
    keys = [(p.id, s) for p in problems for s in range(samples)]
    todo = [(p, s) for p in problems for s in range(samples) if (p.id, s) not in done]
    bar = tqdm(total=len(todo), desc="evaluating", unit="problem", disable=not progress)
    try:
        with open(results_file, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                _append_records(f, done, _eval_chunk(
                    model, chunk, sf, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    temperature=temperature, seed=seed, grading_timeout=grading_timeout,
                    code=code))
                bar.update(len(chunk))
    except KeyboardInterrupt:
        raise _interrupted(done, keys, results_file) from None
    finally:
        bar.close()
    return _finish_run(out, keys, done, config)


def _record(p: Problem, s: int, g, grading_timeout: float | int,
            seed: int | None, code_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Grade one generation into its ``results.jsonl`` record."""
    seg = g.segments()
    if p.kind == "code":  # issue 21: judged in a sandbox by _eval_chunk (eval/code/run.py)
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
            else g.text, "stats": g.stats, "seed": seed,
            **({k: v for k, v in code_fields.items() if k not in ("code", "correct")}
               if code_fields is not None else {})}


def _eval_chunk(model, chunk: Sequence[tuple[Problem, int]], sf, *, max_new_tokens: int,
                batch_size: int, temperature: float, seed: int,
                grading_timeout: float | int,
                code: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Generate and grade (problem, sample) pairs: the records, in ``chunk``'s order.

    Greedy pairs are generated in batches (left padding changes no row). Sampled pairs
    are generated one at a time, each seeded with :func:`sample_seed`, so a sample is
    the same whichever batch, order, process or Ray worker runs it. This is the unit of
    work of :func:`evaluate` and of :func:`stepsal_lens.eval.scale.evaluate_ray`.
    """
    from stepsal_lens.lens.generation import generate

    questions = [p.prompt_question() for p, _ in chunk]
    if temperature <= 0:
        gens = generate(model, questions, stepflow=sf, max_new_tokens=max_new_tokens,
                        temperature=temperature, batch_size=batch_size, progress=False)
        seeds: list[int | None] = [None] * len(chunk)
    else:
        seeds = [sample_seed(seed, p.id, s) for p, s in chunk]
        gens = [generate(model, [q], stepflow=sf, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=row_seed, batch_size=1,
                         progress=False)[0] for q, row_seed in zip(questions, seeds)]
    fields: list[dict[str, Any] | None] = [None] * len(chunk)
    if code is not None:  # issue 21: the chunk's programs, code["workers"] at a time
        from stepsal_lens.eval.code.run import judge_outputs

        fields = judge_outputs([(p, g.segments()["summary"]) for (p, _), g in zip(chunk, gens)],
                               code, workers=code.get("workers", 1))
    return [_record(p, s, g, grading_timeout, row_seed, f)
            for (p, s), g, row_seed, f in zip(chunk, gens, seeds, fields)]


def _load_run(run: str | Path | EvalRun) -> dict[tuple[str, int], bool]:
    if isinstance(run, EvalRun):
        records = run.records
    else:
        path = Path(run) / "results.jsonl"
        if not path.exists():
            raise StepSalError(f"{str(run)!r} is not an evaluation run (no results.jsonl)")
        records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {(r["id"], r["sample"]): bool(r["correct"]) for r in records}


def compare_runs(a: str | Path | EvalRun, b: str | Path | EvalRun) -> dict[str, Any]:
    """Paired comparison of two runs on the problems (and samples) they share.

    Returns accuracies, the discordant counts (``a_only``: right in ``a`` only,
    ``b_only``), and the exact McNemar p-value (two-sided binomial test on the
    discordant pairs).
    """
    from scipy.stats import binomtest

    ra, rb = _load_run(a), _load_run(b)
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

