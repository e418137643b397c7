"""``stepsal demo``: generate, grade, measure and compare correct vs wrong traces.

Loads a model (default: the bundled ``tiny-lrm``), generates greedy traces for a held-out
mix of the arithmetic task's splits (or a JSONL of questions with answers), grades them,
runs Step-Saliency on each, and writes ``traces.jsonl``, ``metrics.csv``,
``compare.csv``, PNG figures and a self-contained ``report.html``. Then it does the same
with StepFlow on (``traces_stepflow.jsonl``, ``metrics_stepflow.csv``) and compares.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepsal_lens.segments.association import model_name
from stepsal_lens.apps.escape import write_csv
from stepsal_lens.errors import StepSalError
from stepsal_lens.results.config import StepFlowConfig

__all__ = ["DemoResult", "load_questions", "run_demo"]


@dataclass
class DemoResult:
    """What the demo computed (also written to its output folder)."""

    out: Path
    records: list[dict[str, Any]]
    metrics: Any  # pandas DataFrame: one row per (trace, layer)
    comparison: Any | None  # pandas DataFrame from compare(), None with < 2 per group
    saliencies: list[Any] = field(default_factory=list)
    #: StepFlow on the same questions: settings, records, metrics, paired McNemar test
    stepflow: dict[str, Any] | None = None
    #: Saliency vs causality (:func:`stepsal_lens.lens.causal.demo_causality`), None when off
    causal: dict[str, Any] | None = None

    @property
    def accuracy(self) -> float:
        return sum(r["correct"] for r in self.records) / max(1, len(self.records))


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of ``{"question": ..., "answer": ...}`` lines.

    An optional ``"kind"`` (``"math"``, the default, or ``"choice"``) says how the answer is
    graded (:func:`stepsal_lens.eval.grading.grade_output`).
    """
    from stepsal_lens.results.jsonl import read_jsonl

    path = Path(path)
    rows = []
    fix = 'each line must be an object like {"question": "...", "answer": "..."}'
    for where, row in read_jsonl(path, what="data file", fix=fix):
        if "question" not in row or "answer" not in row:
            raise StepSalError(f"{where} needs the keys 'question' and 'answer'")
        kind = row.get("kind", "math")
        if kind not in ("math", "choice"):
            raise StepSalError(f"{where} has kind {kind!r}; use 'math' or 'choice' (or leave "
                               f"it out for math)")
        rows.append({"question": str(row["question"]), "answer": str(row["answer"]),
                     "split": str(row.get("split", "data")), "kind": kind})
    if not rows:
        raise StepSalError(f"data file {str(path)!r} holds no questions")
    return rows


def task_questions(n: int, seed: int) -> list[dict[str, Any]]:
    """A held-out mix of the task's splits: half in-distribution, half hard."""
    from stepsal_lens.zoo.task import make_problems

    n_hard = n // 2
    problems = (make_problems(n - n_hard, split="id", seed=10_000 + seed)
                + make_problems(n_hard, split="hard", seed=10_000 + seed))
    return [{"question": p.question, "answer": str(p.answer), "split": p.split} for p in problems]


def _analyse(model, rows, *, stepflow: StepFlowConfig | None, max_new_tokens: int,
             progress: bool,
             label: str):
    """Generate, grade and run Step-Saliency (with StepFlow on when given)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from stepsal_lens.lens.generation import generate
    from stepsal_lens.core.metrics import layer_metrics
    from stepsal_lens.lens.saliency import step_saliency
    from stepsal_lens.lens.stepflow import stepflow as stepflow_on
    from stepsal_lens.eval.grading import grade_output

    gens = generate(model, [r["question"] for r in rows], max_new_tokens=max_new_tokens,
                    stepflow=stepflow, progress=progress)
    records, frames, saliencies = [], [], []
    for i, (row, gen) in enumerate(tqdm(list(zip(rows, gens)), desc=f"step saliency ({label})",
                                        unit="trace", disable=not progress)):
        rec = {"index": i, **row, "text": gen.text, "prediction": None, "correct": False,
               "truncated": None, "n_steps": None, "error": None, "stats": gen.stats}
        try:
            trace = gen.trace(model)
        except StepSalError as err:
            rec["error"] = str(err)
            records.append(rec)
            continue
        verdict = grade_output(trace.summary, row["answer"], row.get("kind", "math"))
        rec["prediction"], rec["correct"] = verdict.prediction, verdict.correct
        rec["grading_error"] = verdict.error
        rec["truncated"] = trace.truncated
        rec["n_steps"] = trace.n_steps
        if stepflow is None:
            sal = step_saliency(model, trace)
        else:
            with stepflow_on(model, stepflow):
                sal = step_saliency(model, trace)
        sal.meta.update(index=i, correct=rec["correct"], split=row["split"])
        saliencies.append(sal)
        df = layer_metrics(sal)
        df.insert(0, "index", i)
        df.insert(1, "split", row["split"])
        df.insert(2, "correct", rec["correct"])
        frames.append(df)
        records.append(rec)
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return records, metrics, saliencies


def run_demo(model: Any = "tiny-lrm", *, n: int = 40, out: str | Path = "stepsal-demo",
             seed: int = 0, data: str | Path | None = None, max_new_tokens: int = 256,
             device: str | None = None, stepflow: StepFlowConfig | None = StepFlowConfig(),
             progress: bool = True, overwrite: bool = False, causal: int = 8) -> DemoResult:
    """The whole demo; see the module docstring. ``model`` is a name, a path or a model.

    ``stepflow``: also generate with StepFlow (a :class:`~stepsal_lens.StepFlowConfig`,
    default the paper's settings; None to skip) and compare accuracy and Step-Saliency
    with the baseline. ``causal``: on that many baseline traces, the causal effect
    matrix and its Spearman correlation with Step-Saliency per layer (``causal.csv``;
    0 turns it off).

    ``out`` must be a new or empty folder (``overwrite=True`` replaces it as a whole).
    Everything is checked before the model is loaded; the files are written into a
    temporary sibling that becomes ``out`` only when the demo has finished, so no file
    of an earlier run survives beside the new report and a failed run changes nothing.
    """
    from stepsal_lens.eval.runs import compare_runs
    from stepsal_lens.core.metrics import compare
    from stepsal_lens.lens.models import check_device, load_lrm
    from stepsal_lens.results.jsonl import write_jsonl
    from stepsal_lens.results.outputs import output_dir
    from stepsal_lens.apps.report import write_demo_report

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise StepSalError(f"--n must be at least 1; got {n}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise StepSalError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    if stepflow is not None and not isinstance(stepflow, StepFlowConfig):
        raise StepSalError(f"stepflow must be a StepFlowConfig or None; got {stepflow!r}")
    check_device(device)
    rows = load_questions(data)[:n] if data is not None else task_questions(n, seed)
    name = model_name(model)
    inputs = {"--data": data, "--model": model if isinstance(model, (str, Path)) else None}
    with output_dir(out, command="demo", overwrite=overwrite, inputs=inputs) as tmp:
        if isinstance(model, (str, Path)):
            if progress:
                print(f"loading {model} ...", file=sys.stderr)
            model = load_lrm(model, device=device)
        records, metrics, saliencies = _analyse(model, rows, stepflow=None, label="baseline",
                                                max_new_tokens=max_new_tokens,
                                                progress=progress)
        right = [s for s in saliencies if s.meta["correct"]]
        wrong = [s for s in saliencies if not s.meta["correct"]]
        comparison = compare(right, wrong) if len(right) >= 2 and len(wrong) >= 2 else None

        write_jsonl(tmp / "traces.jsonl", records)
        write_csv(metrics, tmp / "metrics.csv")
        if comparison is not None:
            write_csv(comparison, tmp / "compare.csv")
        from stepsal_lens.apps.circuits import demo_causality

        causal_part = demo_causality(model, saliencies, limit=causal) if causal else None
        if causal_part is not None:
            write_csv(causal_part["per_trace"], tmp / "causal.csv")
        flow = None
        if stepflow is not None:
            settings = stepflow.resolve(model.cfg.n_layers)
            sf_records, sf_metrics, _ = _analyse(model, rows, stepflow=settings,
                                                 label="StepFlow",
                                                 max_new_tokens=max_new_tokens,
                                                 progress=progress)
            write_jsonl(tmp / "traces_stepflow.jsonl", sf_records)
            write_csv(sf_metrics, tmp / "metrics_stepflow.csv")
            flow = {"settings": settings.to_dict(), "records": sf_records,
                    "metrics": sf_metrics,
                    "mcnemar": compare_runs(_as_run(records), _as_run(sf_records))}
        result = DemoResult(tmp, records, metrics, comparison, saliencies, flow,
                            causal_part)
        write_demo_report(result, model_name=name)
    result.out = Path(out)
    return result


def _as_run(records: list[dict[str, Any]]):
    from stepsal_lens.eval.runs import EvalRun

    recs = [{"id": str(r["index"]), "sample": 0, "correct": bool(r["correct"])} for r in records]
    # both passes answer the same questions, in the same order
    return EvalRun(Path("."), recs, {}, {"problems": "the demo's questions"})
