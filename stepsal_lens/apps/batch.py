"""Step-Saliency of many traces: ``stepsal analyze --traces FILE.jsonl --out DIR``.

Each line of the JSONL file is one trace document, as ``stepsal analyze --trace`` reads
it (``{"question", "thinking", "summary"}`` or ``{"text"}``), plus an optional ``id``
(names the trace's folder; default ``line-N``, N the line number) and an optional
``correct`` (true / false: the trace's answer was right). :func:`analyze_traces` writes

* ``traces/NAME/``: what ``stepsal analyze`` writes for that trace alone
  (``step_saliency.safetensors``, ``steps.json``, ``metrics.json``, ``maps.png``), with
  ``effects=True`` also what ``stepsal effects`` writes (``step_effects.safetensors``,
  ``effects.json``, ``effects.png``), and ``trace.json`` (the input line);
* ``metrics.csv``: one row per (trace, layer) with every metric of
  :data:`~stepsal_lens.core.metrics.METRICS` and the trace's ``decay``;
* ``compare.csv`` and ``compare.json``: correct vs wrong traces per metric and layer
  (:func:`~stepsal_lens.core.metrics.compare`), when the lines carry ``correct`` and each
  group holds at least 2 traces;
* ``run.json`` (settings) and ``summary.json`` (counts, truncated traces, what was
  compared).

The folder resumes like an evaluation run: a trace's folder appears (renamed into
place) only when it is complete, so running the same command again computes only the
missing traces; one process writes the folder at a time (its lock, see
:mod:`stepsal_lens.results.outputs`). ``run.json`` records the fingerprints of the traces
and of the model: a resume after either changed is refused, naming what changed. With a
:class:`~stepsal_lens.eval.scale.RayPool` instead of a model the traces are spread over Ray
workers and the driver still writes every file, through the same code.

Examples
--------
>>> import json, tempfile
>>> from pathlib import Path
>>> from stepsal_lens import load_lrm
>>> from stepsal_lens.apps.batch import analyze_traces
>>> model = load_lrm("tiny-lrm")
>>> root = Path(tempfile.mkdtemp())
>>> lines = [{"id": "a", "question": "Start with 7. Add 5. What is the result?",
...           "thinking": "We start with 7. 7 plus 5 makes 12.",
...           "summary": "The result is \\\\boxed{12}."}]
>>> _ = (root / "traces.jsonl").write_text("".join(json.dumps(x) + "\\n" for x in lines))
>>> result = analyze_traces(model, root / "traces.jsonl", root / "out", model_name="tiny-lrm",
...                         progress=False)
>>> sorted(p.name for p in (root / "out" / "traces" / "a").iterdir())
['.stepsal', 'maps.png', 'metrics.json', 'step_saliency.safetensors', 'steps.json', 'trace.json']
>>> list(result.metrics.columns[:3])
['trace', 'id', 'layer']
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepsal_lens._checks import check_id
from stepsal_lens._version import __version__
from stepsal_lens.apps.circuits import plot_effects
from stepsal_lens.apps.cli_common import check_trace_doc, load_model, pool_from_args, read_trace
from stepsal_lens.apps.escape import write_csv
from stepsal_lens.apps.plots import plot_step_maps
from stepsal_lens.core.causal import saliency_effect_correlation
from stepsal_lens.core.metrics import METRICS, compare, trace_metrics
from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.runs import check_run_folder
from stepsal_lens.eval.scale import RayPool, check_ray_options
from stepsal_lens.lens.causal import step_effects
from stepsal_lens.lens.models import model_fingerprint
from stepsal_lens.lens.saliency import step_saliency
from stepsal_lens.results.jsonl import read_jsonl
from stepsal_lens.results.outputs import clean_leftovers, output_dir, run_folder, write_text_atomic
from stepsal_lens.segments.association import info_of, model_name as name_of
from stepsal_lens.results.saliency import StepSaliency
from stepsal_lens.segments.formats import get_format
from stepsal_lens.segments.trace import Trace
from stepsal_lens.typing import Model

__all__ = ["BatchAnalysis", "TraceLine", "analyze_traces", "check_batch_folder", "read_traces",
           "write_analysis", "write_effects"]

_FIX = ('each line must be a trace object like {"id": "p1", "question": "...", '
        '"thinking": "...", "summary": "...", "correct": true} (or {"text": "..."})')
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ---- one trace: the files `stepsal analyze` and `stepsal effects` write ---------------------

def write_analysis(model: Model, trace: Trace, folder: str | Path, *, model_name: str,
                   target: str = "lm", engine: str = "auto", low_memory: bool = False,
                   progress: bool = False):
    """Step-Saliency of one trace into ``folder``: ``step_saliency.safetensors``,
    ``steps.json``, ``metrics.json`` and ``maps.png`` (what ``stepsal analyze`` writes).

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm`.
    trace
        A :class:`~stepsal_lens.Trace` built with that model.
    folder
        Where to write (created if needed).
    model_name
        Recorded in ``steps.json`` and the figure's title.
    target, engine, low_memory
        As in :func:`~stepsal_lens.step_saliency`.
    progress
        Show the saliency's progress bar.

    Returns
    -------
    StepSaliency
        The result that was written.
    """

    folder = Path(folder)
    result = step_saliency(model, trace, target=target, low_memory=low_memory, engine=engine,
                           progress=progress)
    result.meta["model"] = model_name
    result.save(folder)
    (folder / "metrics.json").write_text(json.dumps(trace_metrics(result), indent=1))
    fig = plot_step_maps(result.head_mean(), result.segments, layers=result.layers,
                         title=f"{model_name}: step saliency (target {target})")
    fig.savefig(folder / "maps.png", dpi=110)
    return result


def write_effects(model: Model, trace: Trace, saliency: StepSaliency, folder: str | Path, *,
                  model_name: str, target: str = "lm", layers: list[int] | None = None,
                  per_layer: bool = False, batch_size: int = 8, progress: bool = False):
    """The causal effect matrix of one trace into ``folder``: ``step_effects.safetensors``,
    ``effects.json`` (Spearman per layer against ``saliency``) and ``effects.png`` (what
    ``stepsal effects`` writes, besides ``steps.json``).

    Parameters
    ----------
    model, trace
        As in :func:`write_analysis`.
    saliency
        The trace's :class:`~stepsal_lens.StepSaliency` (target ``target``).
    layers, per_layer, batch_size
        As in :func:`~stepsal_lens.lens.causal.step_effects`.

    Returns
    -------
    StepEffects
        The effects that were written.
    """
    from safetensors.torch import save_file


    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    eff = step_effects(model, trace, layers=layers, per_layer=per_layer,
                       batch_size=batch_size, progress=progress)
    eff.meta["model"] = model_name
    save_file(eff.tensors(), folder / "step_effects.safetensors")
    corr = saliency_effect_correlation(saliency, eff)
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
            for r in corr.drop(columns="trace").to_dict(orient="records")]
    doc = {"model": model_name, "format": trace.format.name, "saliency_target": target,
           "effect_layers": eff.layers, "per_layer": per_layer,
           "measure": eff.meta["measure"], "spearman": rows}
    (folder / "effects.json").write_text(json.dumps(doc, indent=1))
    fig = plot_effects(eff, title=f"{model_name}: causal effects of cutting each step")
    fig.savefig(folder / "effects.png", dpi=110)
    return eff


def analysis_files(model: Model, doc: dict[str, Any], *, model_name: str, format: str | None,
                   target: str, engine: str, low_memory: bool,
                   effects: bool) -> dict[str, Any]:
    """The unit of work of :func:`analyze_traces`: one trace document's files as bytes
    (computed in a private temporary folder; the caller writes them) and facts about it."""
    trace = read_trace(Path("-"), model, format, doc)
    with tempfile.TemporaryDirectory(prefix="stepsal-trace-") as tmp:
        sal = write_analysis(model, trace, tmp, model_name=model_name, target=target,
                             engine=engine, low_memory=low_memory)
        if effects:
            write_effects(model, trace, sal, tmp, model_name=model_name, target=target)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}
    return {"files": files, "truncated": bool(trace.truncated), "n_steps": trace.n_steps}


# ---- the input file -----------------------------------------------------------------------

@dataclass(frozen=True)
class TraceLine:
    """One line of a traces file: its folder name, line number, document, id, correct."""

    name: str
    line: int
    doc: dict[str, Any]
    id: str | None = None
    correct: bool | None = None


def read_traces(path: str | Path) -> list[TraceLine]:
    """Read and check every line of a traces JSONL file (before any model is loaded).

    A line is a trace document (``question``/``thinking``/``summary`` strings, or
    ``text``) with an optional ``id`` (string or whole number; the trace's folder name,
    with characters other than letters, digits, ``.``, ``_`` and ``-`` replaced by
    ``_``) and an optional ``correct`` (true or false). Folder names must be unique.

    Examples
    --------
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> f = Path(tempfile.mkdtemp()) / "t.jsonl"
    >>> _ = f.write_text(json.dumps({"id": "test/1", "text": "x", "correct": True}) + "\\n"
    ...                  + json.dumps({"text": "y"}) + "\\n")
    >>> [(t.name, t.line, t.correct) for t in read_traces(f)]
    [('test_1', 1, True), ('line-2', 2, None)]
    """

    path = Path(path)
    if path.is_dir():
        raise StepSalError(f"traces file {str(path)!r} is a folder; pass a .jsonl file with "
                           f"one trace per line")
    out, seen = [], {}
    for where, row in read_jsonl(path, what="traces file", fix=_FIX):
        line = int(where.rsplit(":", 1)[1])
        check_trace_doc(row, where)
        tid = row.get("id")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, (str, int))):
            raise StepSalError(f"{where}: 'id' must be a string or a whole number, not "
                               f"{type(tid).__name__}; {_FIX}")
        if tid is not None:
            check_id(str(tid), f"{where}: 'id'")
        correct = row.get("correct")
        if correct is not None and not isinstance(correct, bool):
            raise StepSalError(f"{where}: 'correct' must be true or false, not "
                               f"{correct!r}; leave it out when unknown")
        name = f"line-{line}" if tid is None else _SAFE.sub("_", str(tid)).strip(".") or "_"
        if name in seen:
            raise StepSalError(f"{where} and {seen[name]} both name the folder {name!r}; give "
                               f"every line its own 'id'")
        seen[name] = where
        out.append(TraceLine(name, line, row, None if tid is None else str(tid), correct))
    if not out:
        raise StepSalError(f"traces file {str(path)!r} holds no traces; {_FIX}")
    return out


# ---- many traces --------------------------------------------------------------------------

@dataclass
class BatchAnalysis:
    """A finished (or resumed) batch: its folder, per-layer metrics and comparison."""

    out: Path
    traces: list[TraceLine]
    metrics: Any  # pandas DataFrame: one row per (trace, layer)
    comparison: Any | None  # pandas DataFrame from compare(), None without 2 per group
    summary: dict[str, Any] = field(default_factory=dict)


def traces_fingerprint(lines: list[TraceLine]) -> str:
    """``"sha256:<hex>"`` of a batch's traces by content (folder names, documents and
    labels, in order): an edited traces file gives another value."""
    import hashlib

    h = hashlib.sha256()
    for t in lines:
        h.update(json.dumps([t.name, t.doc, t.correct], sort_keys=True,
                            ensure_ascii=False).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def batch_settings(model_name: str, format_name: str | None, *, target: str, engine: str,
                   low_memory: bool, effects: bool, lines: list[TraceLine],
                   model_fingerprint: str | None) -> dict[str, Any]:
    """The ``run.json`` of a batch folder (a resumed run must match it): the settings
    and what the results were made from (traces and model, by content)."""

    return {"command": "analyze", "model": model_name, "format": format_name,
            "target": target, "engine": engine, "low_memory": low_memory, "effects": effects,
            "stepsal": __version__, "traces": traces_fingerprint(lines),
            "n_traces": len(lines), "model_fingerprint": model_fingerprint}


def check_batch_folder(out: str | Path, settings: dict[str, Any],
                       inputs: dict[str, Any] | None = None) -> None:
    """Refuse a batch folder before any work: one another process writes, one holding
    other files (not a batch run), or a batch run made from other traces, another model
    or other ``settings``."""

    check_run_folder(out, settings, command="analyze-traces", inputs=inputs)


def _check_done(folder: Path, t: TraceLine) -> bool:
    """Whether a trace's folder is complete and was made from this very line."""
    if not folder.is_dir():
        return False
    try:
        old = json.loads((folder / "trace.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old != t.doc:
        raise StepSalError(f"{str(folder)!r} was computed from another trace than line {t.line} "
                           f"of the traces file (ids or lines changed?); delete that folder to "
                           f"recompute it, or choose another --out")
    return True


def analyze_traces(model: "Model | RayPool", traces: str | Path | list[TraceLine], out: str | Path, *,
                   model_name: str | None = None, format: str | None = None,
                   target: str = "lm", engine: str = "auto", low_memory: bool = False,
                   effects: bool = False, progress: bool = True,
                   after_result: Callable[[Any, int], None] | None = None) -> BatchAnalysis:
    """Step-Saliency (and with ``effects`` the causal effect matrix) of every trace of a
    JSONL file, one folder per trace plus ``metrics.csv`` and the correct-vs-wrong
    comparison; resumable. See the module docstring for the files.

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm`, or a
        :class:`~stepsal_lens.eval.scale.RayPool` to spread the traces over Ray workers.
    traces
        The JSONL file (or :func:`read_traces`'s list).
    out
        The batch folder (new, empty, or an earlier batch with the same settings).
    model_name
        Recorded in the files (default: the model's name, or the pool's model).
    format
        Reasoning format name used to read ``text`` traces (default: the model's).
    target, engine, low_memory
        As in :func:`~stepsal_lens.step_saliency`.
    effects
        Also the causal effect matrix of each trace (:func:`write_effects`).
    progress
        A progress bar over traces.
    after_result
        Called in the driver after each trace's folder is written, with ``model`` and the
        number of traces done in this call (monitoring; tests use it to stop a worker).

    Returns
    -------
    BatchAnalysis

    Notes
    -----
    Ctrl-C raises ``KeyboardInterrupt("interrupted after N of M traces; ...")``; the
    finished traces' folders stay, and the same call resumes.
    """
    from tqdm.auto import tqdm


    pool = _as_pool(model)
    lines = traces if isinstance(traces, list) else read_traces(traces)
    if model_name is None:
        model_name = pool.model if pool is not None else name_of(model)
    if pool is not None:
        format_name = pool.info["format"] if format is None else _format_name(format)
        fingerprint = pool.info.get("fingerprint")
    else:
        format_name = info_of(model).format.name if format is None else _format_name(format)
        fingerprint = info_of(model).fingerprint
    settings = batch_settings(model_name, format_name, target=target, engine=engine,
                              low_memory=low_memory, effects=effects, lines=lines,
                              model_fingerprint=fingerprint)
    inputs = {"traces": None if isinstance(traces, list) else traces,
              "model": pool.model if pool is not None else info_of(model).source or None}
    out = Path(out)
    check_batch_folder(out, settings, inputs)
    with run_folder(out, command="analyze-traces", inputs=inputs):
        check_batch_folder(out, settings, inputs)  # again, now that the folder is ours
        write_text_atomic(out / "run.json", json.dumps(settings, indent=1) + "\n")
        root = out / "traces"
        root.mkdir(exist_ok=True)
        clean_leftovers(root)  # of a run that was killed
        todo = [t for t in lines if not _check_done(root / t.name, t)]
        kwargs = {"model_name": model_name, "format": format, "target": target,
                  "engine": engine, "low_memory": low_memory, "effects": effects}
        bar = tqdm(total=len(todo), desc="analyzing", unit="trace", disable=not progress)
        n_done = 0

        def write(t: TraceLine, result: dict[str, Any]) -> None:
            nonlocal n_done
            _write_trace_folder(root / t.name, t, result)
            n_done += 1
            bar.update(1)
            if after_result is not None:
                after_result(model, n_done)

        try:
            if pool is None:
                for t in todo:
                    write(t, analysis_files(model, t.doc, **kwargs))
            else:
                pool.map(analysis_files, todo, write, kwargs=kwargs,
                         args_of=lambda t: (t.doc,))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"interrupted after {len(lines) - len(todo) + n_done} of {len(lines)} traces; "
                f"the finished ones are in {str(root)!r}: run the same command to "
                f"resume") from None
        finally:
            bar.close()
        return _combine(out, lines, settings)


def _as_pool(model: Any):
    """The model as a RayPool, or None when it is a model (scale imports ray lazily)."""

    return model if isinstance(model, RayPool) else None


def _format_name(format: str) -> str:

    return get_format(format).name


def _write_trace_folder(folder: Path, t: TraceLine, result: dict[str, Any]) -> None:

    with output_dir(folder, command="analyze", what="trace folder") as tmp:
        for name, data in result["files"].items():
            (tmp / name).write_bytes(data)
        (tmp / "trace.json").write_text(json.dumps(t.doc, indent=1, ensure_ascii=False))


def _metric_frame(doc: dict[str, Any]):
    """A trace's ``metrics.json`` as :func:`~stepsal_lens.core.metrics.layer_metrics`'s frame."""
    import pandas as pd


    frame = pd.DataFrame({"layer": doc["layer"]})
    for name in METRICS:
        frame[name] = pd.Series(doc[name], dtype="float64")  # None (NaN in JSON) -> NaN
    return frame


def _combine(out: Path, lines: list[TraceLine], settings: dict[str, Any]) -> BatchAnalysis:
    """``metrics.csv``, ``compare.csv``/``compare.json`` and ``summary.json`` from every
    trace's folder (so a resumed batch combines what earlier runs computed too)."""
    import pandas as pd


    frames, groups, truncated = [], {True: [], False: []}, []
    for t in lines:
        folder = out / "traces" / t.name
        doc = json.loads((folder / "metrics.json").read_text())
        frame, decay = _metric_frame(doc), doc["decay"]
        steps = json.loads((folder / "steps.json").read_text())
        if not any(s["segment"] == "summary" for s in steps["steps"]):
            truncated.append(t.name)
        if t.correct is not None:
            groups[t.correct].append(frame)
        rows = frame.copy()
        rows.insert(0, "trace", t.name)
        rows.insert(1, "id", t.id)
        if any(x.correct is not None for x in lines):
            rows.insert(2, "correct", t.correct)
        rows["decay"] = float("nan") if decay is None else decay
        frames.append(rows)
    metrics = pd.concat(frames, ignore_index=True)
    write_csv(metrics, out / "metrics.csv")
    comparison, why = None, None
    n_right, n_wrong = len(groups[True]), len(groups[False])
    if n_right + n_wrong == 0:
        why = "no line carries 'correct'"
    elif n_right < 2 or n_wrong < 2:
        why = f"needs at least 2 correct and 2 wrong traces; got {n_right} and {n_wrong}"
    else:
        comparison = compare(groups[True], groups[False])
        write_csv(comparison, out / "compare.csv")
        records = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                   for r in comparison.to_dict(orient="records")]
        write_text_atomic(out / "compare.json", json.dumps(records, indent=1) + "\n")
    for stale in ("compare.csv", "compare.json"):
        if comparison is None:
            (out / stale).unlink(missing_ok=True)
    summary = {"n": len(lines), "correct": n_right, "wrong": n_wrong,
               "unlabelled": len(lines) - n_right - n_wrong,
               "compared": comparison is not None, "not_compared_because": why,
               "no_summary": truncated, "settings": settings}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return BatchAnalysis(out, lines, metrics, comparison, summary)


def _print_summary(result: BatchAnalysis) -> None:
    """The CLI's closing lines."""
    s = result.summary
    if s["no_summary"]:
        print(f"warning: {len(s['no_summary'])} trace(s) have no summary (the thinking never "
              f"closes): {', '.join(s['no_summary'][:5])}", file=sys.stderr)
    compared = ("compare.csv, compare.json" if s["compared"]
                else f"no comparison ({s['not_compared_because']})")
    print(f"{s['n']} traces; wrote {result.out}/traces/, metrics.csv, summary.json, {compared}",
          file=sys.stderr)


def batch_cmd(args: Any) -> int:
    """``stepsal analyze --traces FILE.jsonl --out DIR [--effects] [--ray ...]``."""

    use_ray = check_ray_options(args)
    if args.overwrite:
        raise StepSalError("--overwrite replaces the folder of one trace; a --traces folder "
                           "resumes instead: run the same command to finish it, or delete it "
                           "(or choose another --out) to start over")
    lines = read_traces(args.traces)
    known = batch_settings(args.model, None if args.format is None else
                           _format_name(args.format), target=args.target, engine=args.engine,
                           low_memory=args.low_memory, effects=args.effects, lines=lines,
                           model_fingerprint=model_fingerprint(args.model))
    inputs = {"--traces": args.traces, "--model": args.model}
    check_batch_folder(args.out, known, inputs)  # before any model is loaded
    options = {"model_name": args.model, "format": args.format, "target": args.target,
               "engine": args.engine, "low_memory": args.low_memory, "effects": args.effects}
    with run_folder(args.out, command="analyze-traces", inputs=inputs):
        if use_ray:
            print(f"starting Ray workers for {args.model} ...", file=sys.stderr)
            with pool_from_args(args, len(lines)) as pool:
                result = analyze_traces(pool, lines, args.out, **options)
        else:
            print(f"loading {args.model} ...", file=sys.stderr)
            model = load_model(args.model, device=args.device, dtype=args.dtype,
                                format=args.format)
            result = analyze_traces(model, lines, args.out, **options)
    _print_summary(result)
    return 0
