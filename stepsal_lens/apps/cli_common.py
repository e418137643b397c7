"""What the command-line modules share: loading a model spec, reading trace files, the
StepFlow options (generated from :class:`~stepsal_lens.StepFlowConfig`'s fields) and the
Ray pool. :mod:`stepsal_lens.apps.cli` and :mod:`stepsal_lens.apps.batch` both import it;
neither imports the other's helpers.

Examples
--------
>>> import argparse
>>> p = argparse.ArgumentParser()
>>> add_stepflow_options(p)
>>> args = p.parse_args(["--stepflow", "--tau-max", "0.2", "--oeb-layers", "0,1"])
>>> cfg = stepflow_settings(args)
>>> cfg.tau_max, cfg.oeb_layers, cfg.alpha
(0.2, (0, 1), 0.06)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from stepsal_lens._checks import read_utf8
from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.scale import RayPool
from stepsal_lens.lens.models import load_lrm
from stepsal_lens.results.config import StepFlowConfig
from stepsal_lens.segments.trace import Trace
from stepsal_lens.typing import Model

__all__ = ["add_stepflow_options", "check_trace_doc", "load_model", "parse_layers",
           "pool_from_args", "read_trace", "read_trace_doc", "stepflow_settings"]


@contextmanager
def random_checkpoint(spec: str) -> Iterator[Path]:
    """``random:ARCH``: a tiny random checkpoint in a temporary folder, removed afterwards."""
    from stepsal_lens.zoo.tiny_random import ARCHITECTURES, make_random_checkpoint

    arch = spec.split(":", 1)[1]
    if arch not in ARCHITECTURES:
        raise StepSalError(f"--model {spec!r}: unknown architecture {arch!r}; use "
                           f"random:ARCH with ARCH one of {sorted(ARCHITECTURES)}")
    with tempfile.TemporaryDirectory(prefix="stepsal-random-") as folder:
        yield make_random_checkpoint(arch, Path(folder), n_layers=4)


def load_model(spec: str, *, device: str | None, dtype: str | None,
               format: str | None) -> Model:
    """``--model``: a folder, a hub name, a registered name, or ``random:ARCH``."""
    if spec.startswith("random:"):
        with random_checkpoint(spec) as folder:
            return load_lrm(folder, device=device, dtype=dtype, format=format or "think-tags")
    return load_lrm(spec, device=device, dtype=dtype, format=format)


def read_trace_doc(path: Path) -> dict:
    """The trace file's JSON object, checked before the model is loaded."""
    if not path.is_file():
        raise StepSalError(f"trace file {str(path)!r} does not exist")
    try:
        doc = json.loads(read_utf8(path, "trace file"))
    except json.JSONDecodeError as err:
        raise StepSalError(f"trace file {str(path)!r} is not valid JSON: {err}") from None
    return check_trace_doc(doc, f"trace file {str(path)!r}")


def check_trace_doc(doc: Any, where: str) -> dict:
    """A trace document (``{"question", "thinking", "summary"}`` or ``{"text"}``),
    checked; ``where`` names it in messages (a file, or a line of a JSONL file)."""
    if not isinstance(doc, dict):
        raise StepSalError(f"{where} must hold a JSON object")
    if "text" not in doc:
        missing = [k for k in ("question", "thinking", "summary") if k not in doc]
        if missing:
            raise StepSalError(f"{where} needs {{'question', 'thinking', "
                               f"'summary'}} or {{'text'}}; missing {missing}")
    keys = ["text"] if "text" in doc else ["question", "thinking", "summary"]
    bad = [k for k in keys if not isinstance(doc[k], str)]
    if bad:
        raise StepSalError(f"{where}: {bad} must be strings")
    return doc


def read_trace(path: Path, model: Model, format: str | None, doc: dict | None = None) -> Trace:
    """The :class:`~stepsal_lens.Trace` of a trace file (or of ``doc``, already read)."""
    doc = read_trace_doc(path) if doc is None else doc
    if "text" in doc:
        return Trace.from_text(doc["text"], model, format=format)
    return Trace.from_segments(doc["question"], doc["thinking"], doc["summary"], model,
                               format=format)


def parse_layers(text: str | None) -> list[int] | None:
    """``0,1,2`` -> ``[0, 1, 2]`` (None stays None)."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StepSalError(f"layers must be comma-separated integers like 0,1,2; got {text!r}") from None


#: Flag types by the annotation of a StepFlowConfig field (layer lists are parsed from
#: ``0,1,2`` by :func:`stepflow_settings`).
_TYPES = {"float": float, "int": int, "str": str}


def add_stepflow_options(p: argparse.ArgumentParser) -> None:
    """``--stepflow`` and one flag per :class:`~stepsal_lens.StepFlowConfig` field (name,
    type, default and help from the field; choices from the registry it names)."""
    g = p.add_argument_group("StepFlow (paper defaults unless set)")
    g.add_argument("--stepflow", action="store_true", help="turn StepFlow on")
    for f in fields(StepFlowConfig):
        help_ = f.metadata.get("help", "")
        if f.default is not MISSING and f.default is not None:
            help_ = f"{help_} ({f.default})"
        choices = f.metadata.get("choices")
        g.add_argument("--" + f.name.replace("_", "-"), default=None, help=help_,
                       type=_TYPES.get(str(f.type)),
                       choices=choices() if choices is not None else None)


def stepflow_settings(args: argparse.Namespace) -> StepFlowConfig | None:
    """The :class:`~stepsal_lens.StepFlowConfig` of the flags (None without ``--stepflow``;
    StepFlow flags without it are refused, naming them)."""
    given = {f.name: getattr(args, f.name) for f in fields(StepFlowConfig)
             if getattr(args, f.name, None) is not None}
    if not args.stepflow:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise StepSalError(f"{flags} set StepFlow options but StepFlow is off; add --stepflow")
        return None
    given["oeb_layers"] = parse_layers(given.get("oeb_layers"))
    given["smi_layers"] = parse_layers(given.get("smi_layers"))
    return StepFlowConfig(**{k: v for k, v in given.items() if v is not None})


def pool_from_args(args: argparse.Namespace, n_units: int) -> RayPool:
    """The CLI's pool: no more workers than units of work (when ``--workers`` is not
    given)."""
    pool = RayPool(args.model, workers=args.workers, address=args.ray_address,
                   device=args.device, dtype=getattr(args, "dtype", None), format=args.format,
                   loader=load_model)
    pool.default_cap = n_units
    return pool
