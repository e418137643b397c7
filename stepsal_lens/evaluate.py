"""Accuracy evaluation: local benchmark files, resumable runs, paired comparisons.

* :func:`extract_answer` and :func:`grade` are :mod:`stepsal_lens.answers`'s (re-exported
  here): the one answer parser (balanced braces, "Final answer:", GPQA letter styles) and
  the grader built on math-verify, with every symbolic comparison under a time limit.
* :func:`load_problems` reads local JSONL / JSON / parquet / CSV files in the field
  layouts of MATH-500, AIME 2024/2025, AMC23 and GPQA-Diamond (nothing is downloaded),
  or ``tiny:SPLIT`` for the bundled arithmetic task.
* :func:`evaluate` generates, grades and writes ``results.jsonl`` (one line per problem
  and sample, with ``grading_error`` set where the grader could not decide) and
  ``summary.json`` (accuracy with a 95% Wilson interval); an interrupted run continues
  where it stopped. :func:`compare_runs` pairs two runs problem by
  problem and runs an exact McNemar test.

Examples
--------
>>> from stepsal_lens.evaluate import extract_answer, grade
>>> extract_answer("So the answer is \\\\boxed{\\\\frac{1}{2}}.")
'\\\\frac{1}{2}'
>>> grade("\\\\frac{1}{2}", "0.5"), grade("1,000", "1000"), grade("(B)", "B", kind="choice")
(True, True, True)
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepsal_lens.models import info_of, model_name as name_of
from stepsal_lens.answers import Grade, extract_answer, find_answer, grade, grade_output
from stepsal_lens.errors import StepSalError
from stepsal_lens.results.config import StepFlowConfig

__all__ = [
    "EvalRun",
    "Problem",
    "compare_runs",
    "evaluate",
    "extract_answer",
    "grade",
    "grade_output",
    "load_problems",
]

MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("\nPlease reason step by step, and put the letter of the correct choice "
                      "within \\boxed{}.")
LETTERS = "ABCDEFGHIJ"


# ---- problems -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    ``kind`` is ``"math"`` (free-form answer) or ``"choice"`` (``answer`` is a letter and
    ``choices`` the options in letter order). ``instruction`` is appended to the
    question in the prompt.
    """

    id: str
    question: str
    answer: str
    kind: str = "math"
    choices: tuple[str, ...] = ()
    source: str = ""
    instruction: str = MATH_INSTRUCTION

    def prompt_question(self) -> str:
        """The question as the model reads it (options and instruction included)."""
        text = self.question
        if self.choices:
            text += "\n\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(self.choices))
        return text + self.instruction


def _field(row: dict[str, Any], *names: str) -> Any:
    lower = {k.lower(): v for k, v in row.items()}
    for n in names:
        if n.lower() in lower and lower[n.lower()] is not None:
            return lower[n.lower()]
    return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise StepSalError(f"{path}:{i} is not valid JSON ({err})") from None
        return rows
    if suffix == ".json":
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, list) else doc.get("data", doc.get("rows", []))
    if suffix in (".parquet", ".csv"):
        import pandas as pd

        df = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        return df.to_dict(orient="records")
    raise StepSalError(f"cannot read {str(path)!r}: use .jsonl, .json, .parquet or .csv")


def _gpqa(row: dict[str, Any], i: int, source: str) -> Problem:
    """GPQA: options shuffled with a seed taken from the record, so runs agree."""
    pid = str(_field(row, "Record ID", "id") or i)
    correct = str(_field(row, "Correct Answer")).strip()
    options = [correct] + [str(_field(row, f"Incorrect Answer {k}")).strip() for k in (1, 2, 3)]
    rng = random.Random(int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16))
    rng.shuffle(options)
    return Problem(pid, str(_field(row, "Question")).strip(), LETTERS[options.index(correct)],
                   "choice", tuple(options), source, CHOICE_INSTRUCTION)


def _row_problem(row: dict[str, Any], i: int, source: str) -> Problem:
    if _field(row, "Correct Answer") is not None and _field(row, "Incorrect Answer 1") is not None:
        return _gpqa(row, i, source)
    question = _field(row, "problem", "question", "prompt")
    answer = _field(row, "answer", "final_answer", "expected_answer")
    if question is None or answer is None:
        raise StepSalError(
            f"{source}: row {i} has fields {sorted(row)}; expected a question field "
            f"(problem / question / Question) and an answer field (answer / Answer), or "
            f"GPQA's Question / Correct Answer / Incorrect Answer 1-3")
    pid = str(_field(row, "unique_id", "id", "idx", "record id") or i)
    choices = _field(row, "choices", "options")
    if choices is not None and len(choices):
        choices = tuple(str(c) for c in choices)
        ans = str(answer).strip()
        found = find_answer(ans, "choice")
        letter = (LETTERS[int(ans)] if ans.isdigit() and int(ans) < len(choices)
                  else found.text if found else ans)
        return Problem(pid, str(question).strip(), letter, "choice", choices, source,
                       CHOICE_INSTRUCTION)
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # AMC23 stores answers as floats
    return Problem(pid, str(question).strip(), str(answer).strip(), "math", (), source)


def load_problems(data: str | Path, *, limit: int | None = None) -> list[Problem]:
    """Problems from a local file, or ``tiny:SPLIT`` for the arithmetic task.

    Parameters
    ----------
    data
        A ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file in the layout of MATH-500
        (``problem``, ``answer``, ``unique_id``), AIME 2024 (``ID``, ``Problem``,
        ``Answer``), AIME 2025 / AMC23 (``question`` or ``problem``, ``answer``, ``id``),
        GPQA-Diamond (``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``,
        ``Record ID``) or generic multiple choice (``question``, ``choices``, ``answer`` as
        letter or index). ``tiny:id`` / ``tiny:long`` / ``tiny:hard``: held-out problems of
        the bundled task (seed 20000, as in tiny-lrm's ``eval.json``; 500 by default).
    limit
        Keep the first ``limit`` problems.
    """
    if isinstance(data, str) and data.startswith("tiny:"):
        from stepsal_lens.zoo.evaluate import EVAL_SEED
        from stepsal_lens.zoo.task import generate

        split = data.split(":", 1)[1]
        problems = generate(limit or 500, split=split, seed=EVAL_SEED)
        return [Problem(f"{split}-{i}", p.question, str(p.answer), "math", (), data, "")
                for i, p in enumerate(problems)]
    path = Path(data)
    if not path.exists():
        raise StepSalError(f"data file {str(path)!r} does not exist (nothing is downloaded: "
                           f"save the benchmark locally first)")
    rows = _read_rows(path)
    if not rows:
        raise StepSalError(f"data file {str(path)!r} holds no problems")
    problems = [_row_problem(r, i, path.name) for i, r in enumerate(rows)]
    return problems[:limit] if limit else problems


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
            "config": config}


def evaluate(model: Any, problems: Sequence[Problem], out: str | Path, *,
             stepflow: StepFlowConfig | None = None, max_new_tokens: int = 256,
             batch_size: int = 8, samples: int = 1, temperature: float = 0.0, seed: int = 0,
             model_name: str | None = None, data_name: str | None = None,
             grading_timeout: float | int = 10.0, progress: bool = True) -> EvalRun:
    """Generate, grade and record every (problem, sample); resumable.

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm`.
    problems
        From :func:`load_problems`.
    out
        Run folder: ``run.json`` (settings), ``results.jsonl``, ``summary.json``. If it
        already holds results of the same settings, only the missing ones are generated.
    stepflow
        A :class:`~stepsal_lens.StepFlowConfig` (None: off); ``run.json`` records it
        resolved (explicit layers).
    samples
        Generations per problem (needs ``temperature > 0`` when above 1).
    grading_timeout
        Seconds the grader may spend on one answer's symbolic comparisons; past it the
        record is not correct and its ``grading_error`` says why.
    """
    from tqdm.auto import tqdm

    from stepsal_lens.generation import generate

    if samples < 1:
        raise StepSalError(f"samples must be at least 1; got {samples}")
    if samples > 1 and temperature <= 0:
        raise StepSalError("samples > 1 with greedy decoding gives identical samples; pass "
                           "temperature > 0 (e.g. 0.6)")
    if not problems:
        raise StepSalError("no problems to evaluate")
    out = Path(out)
    if stepflow is not None and not isinstance(stepflow, StepFlowConfig):
        raise StepSalError(f"stepflow must be a StepFlowConfig or None; got {stepflow!r}")
    sf = None if stepflow is None else stepflow.resolve(model.cfg.n_layers)
    config = {"model": model_name or name_of(model), "data": data_name,
              "stepflow": None if sf is None else sf.to_dict(), "max_new_tokens": max_new_tokens, "samples": samples,
              "temperature": temperature, "seed": seed, "format": info_of(model).format.name}
    out.mkdir(parents=True, exist_ok=True)
    run_file, results_file = out / "run.json", out / "results.jsonl"
    if run_file.exists():
        old = json.loads(run_file.read_text())
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            raise StepSalError(
                f"{out} holds a run with other settings {diff} (old, new); choose another "
                f"--out folder or delete this one")
    run_file.write_text(json.dumps(config, indent=1) + "\n")
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupt: redo it
                    continue
                done[(r["id"], r["sample"])] = r
        # rewrite without a possibly cut last line
        results_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                        for r in done.values()))
    todo = [(p, s) for p in problems for s in range(samples) if (p.id, s) not in done]
    bar = tqdm(total=len(todo), desc="evaluating", unit="problem", disable=not progress)
    with open(results_file, "a") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            gens = generate(model, [p.prompt_question() for p, _ in chunk], stepflow=sf,
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=seed + start, batch_size=batch_size, progress=False)
            for (p, s), g in zip(chunk, gens):
                seg = g.segments()
                if seg["error"] or seg["truncated"]:
                    verdict = Grade(None, False, method="no answer")
                else:
                    verdict = grade_output(seg["summary"], p.answer, p.kind,
                                           timeout=grading_timeout)
                rec = {"id": p.id, "sample": s, "source": p.source, "kind": p.kind,
                       "answer": p.answer, "prediction": verdict.prediction,
                       "correct": verdict.correct, "grading_error": verdict.error,
                       "finished": g.finished,
                       "truncated": seg["truncated"],
                       "n_completion_tokens": len(g.completion_ids),
                       "completion": g.text[len(g.prompt):] if g.text.startswith(g.prompt)
                       else g.text, "stats": g.stats}
                done[(p.id, s)] = rec
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    keys = [(p.id, s) for p in problems for s in range(samples)]
    records = [done[k] for k in keys]
    summary = _summarize(records, config)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return EvalRun(out, records, summary, config)


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

