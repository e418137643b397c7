"""StepSaliency: the step-to-step maps of one trace, with how they were made.

The result of :func:`~stepsal_lens.step_saliency`: maps ``[layer, head, step, step]``,
the steps, the exact token ids, and ``meta`` (model, format, target and its arguments,
layers, engine, dtype, StepFlow config or none, package version), saved as
``step_saliency.safetensors`` + ``steps.json``.

Examples
--------
>>> import tempfile, torch
>>> from stepsal_lens import Step, StepSaliency
>>> steps = [Step(0, "question", "Q?", (0, 2), (0, 2)), Step(1, "thinking", "T.", (2, 4), (2, 4))]
>>> result = StepSaliency(torch.rand(1, 2, 2, 2), [0], steps, torch.arange(4), {"target": "lm"})
>>> StepSaliency.load(result.save(tempfile.mkdtemp())).maps.shape
torch.Size([1, 2, 2, 2])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.results.checks import FIX_ANALYZE, FileCheck, read_json, read_safetensors
from stepsal_lens.segments.trace import Step
from stepsal_lens.typing import StepMap

__all__ = ["StepSaliency"]

#: The meta keys ``steps.json`` holds at its top level (the rest go under ``meta``).
_KEEP = ("model", "format", "target", "n_layers", "n_heads")


@dataclass
class StepSaliency:
    """Step-to-step saliency maps of one trace.

    Attributes
    ----------
    maps : Tensor
        ``[n_layers, n_heads, n_steps, n_steps]`` float32; ``maps[l, h, i, j]`` is the
        mean saliency from query step ``i`` to key step ``j``.
    layers : list[int]
        Model layer of each row of ``maps``.
    steps : list[Step]
        The trace's steps.
    token_ids : Tensor
        ``[n_tokens]`` int64, exactly the ids the model saw.
    meta : dict
        ``model``, ``format``, ``target``, ``n_layers``, ``n_heads``, ``text``, ...
    """

    maps: StepMap
    layers: list[int]
    steps: list[Step]
    token_ids: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def segments(self) -> list[str]:
        """Segment of each step (``question``, ``thinking``, ``summary``)."""
        return [s.segment for s in self.steps]

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def head_mean(self) -> Float[Tensor, "layer step step"]:
        """The paper's per-layer map: mean over heads."""
        return self.maps.mean(1)

    def row_normalized(self, head: int | None = None) -> Float[Tensor, "layer step step"]:
        """``Mn[i, j] = M[i, j] / sum_j M[i, j]`` (head-mean unless ``head`` is given):
        where each step draws its information from. All-zero rows stay zero."""
        from stepsal_lens.core.metrics import normalize_rows

        return normalize_rows(self.head_mean() if head is None else self.maps[:, head])

    def metrics(self, k: int = 3):
        """Per-layer failure-mode metrics (:func:`stepsal_lens.core.metrics.layer_metrics`)."""
        from stepsal_lens.core.metrics import layer_metrics

        return layer_metrics(self, k=k)

    def to_dataframe(self):
        """Tidy long form: layer, head, query_step, key_step, query_segment, key_segment,
        value."""
        import numpy as np
        import pandas as pd

        n_l, n_h, n_s, _ = self.maps.shape
        layer, head, q, k = np.meshgrid(self.layers, np.arange(n_h), np.arange(n_s),
                                        np.arange(n_s), indexing="ij")
        seg = np.array(self.segments, dtype=object)
        return pd.DataFrame({
            "layer": layer.ravel(), "head": head.ravel(), "query_step": q.ravel(),
            "key_step": k.ravel(), "query_segment": seg[q.ravel()],
            "key_segment": seg[k.ravel()], "value": self.maps.numpy().ravel(),
        })

    def steps_json(self) -> dict[str, Any]:
        """The ``steps.json`` document (model, format, target, sizes, steps)."""
        doc = {key: self.meta.get(key) for key in _KEEP}
        doc["layers"] = self.layers
        doc["steps"] = [s.to_dict() for s in self.steps]
        doc["meta"] = {k: v for k, v in self.meta.items() if k not in _KEEP}
        return doc

    def save(self, directory: str | Path) -> Path:
        """Write ``step_saliency.safetensors`` (maps, token_ids) and ``steps.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"maps": self.maps.float().contiguous(),
                   "token_ids": self.token_ids.long().contiguous()},
                  directory / "step_saliency.safetensors")
        (directory / "steps.json").write_text(json.dumps(self.steps_json(), indent=1,
                                                         ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> StepSaliency:
        """Read what :meth:`save` wrote, checking every field first.

        The folder is untrusted: ``maps`` must be a finite, non-negative 4-d float tensor
        ``[layer, head, step, step]`` over as many steps as ``steps.json`` lists and as
        many heads as it says; ``token_ids`` non-negative integers (inside the
        vocabulary where ``meta["d_vocab"]`` records it); each step a known segment
        (question, thinking, summary, in that order) with a non-empty token span inside
        the ids, after the previous one; ``layers`` one increasing index per map, inside
        ``n_layers``; text fields strings. Anything else raises one
        :class:`~stepsal_lens.StepSalError` naming the file, the field, the value and the
        fix (docs/errors.md, "Untrusted results").

        Raises
        ------
        StepSalError
            A file is missing, unreadable or holds a field outside the rules above.
        """
        directory = Path(directory)
        files = [directory / "step_saliency.safetensors", directory / "steps.json"]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise StepSalError(f"{str(directory)!r} has no {missing}; pass a folder written "
                               f"by StepSaliency.save or `stepsal analyze`")
        maps, layers, steps, ids, meta = _read_saved(files)
        return cls(maps, layers, steps, ids, meta)

    def __repr__(self) -> str:
        n_l, n_h, n_s, _ = self.maps.shape
        return (f"StepSaliency({n_l} layers x {n_h} heads x {n_s}x{n_s} steps, "
                f"target={self.meta.get('target')!r}, model={self.meta.get('model')!r})")


def _read_saved(files: list[Path]) -> tuple[Tensor, list[int], list[Step], Tensor,
                                          dict[str, Any]]:
    """Read and check what :meth:`StepSaliency.save` wrote: every failure names the file,
    the field and the value (:mod:`stepsal_lens.results.checks`)."""
    tfile, jfile = files
    tensors = read_safetensors(tfile, FIX_ANALYZE, ("maps", "token_ids"))
    doc = read_json(jfile, FIX_ANALYZE)
    tcheck, jcheck = FileCheck(tfile, FIX_ANALYZE), FileCheck(jfile, FIX_ANALYZE)
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list):
        jcheck.says("has no list of 'steps'")
    maps, ids = tensors["maps"], tensors["token_ids"]
    if maps.dim() != 4 or not maps.dtype.is_floating_point:
        tcheck.fail(f"maps must be a 4-d float tensor [layer, head, step, step]; got "
                    f"{maps.dtype} of shape {tuple(maps.shape)}")
    n = len(doc["steps"])
    if maps.shape[2] != maps.shape[3] or maps.shape[2] != n:
        tcheck.says(f"holds maps over {tuple(maps.shape[2:])} steps but {str(jfile)!r} lists "
                    f"{n} steps; the two files are from different runs")
    if not bool(torch.isfinite(maps).all()):
        bad = int((~torch.isfinite(maps)).sum())
        tcheck.fail(f"{bad} map values are NaN or infinite; saliency is never saved "
                    f"non-finite, so the file was altered")
    maps = tcheck.float_tensor("maps", maps, ("layer", "head", "step", "step"))
    meta = {k: doc.get(k) for k in _KEEP}
    for key in ("model", "format", "target"):
        jcheck.string(key, meta[key], optional=True)
    extra = jcheck.obj("meta", doc.get("meta"), optional=True)
    n_layers = meta["n_layers"]
    if n_layers is not None:
        jcheck.integer("n_layers", n_layers, low=1)
    if meta["n_heads"] is not None:
        jcheck.integer("n_heads", meta["n_heads"], low=1)
        if meta["n_heads"] != maps.shape[1]:
            jcheck.bad("n_heads", meta["n_heads"], f"but the maps hold {maps.shape[1]} heads")
    vocab = extra.get("d_vocab")
    if vocab is not None:
        jcheck.integer("meta.d_vocab", vocab, low=1)
    for key in ("text", "tokenizer"):
        jcheck.string(f"meta.{key}", extra.get(key), optional=True)
    if extra.get("stepflow") is not None:  # replay() runs the model with these settings
        from stepsal_lens.results.config import StepFlowConfig

        flow = jcheck.obj("meta.stepflow", extra["stepflow"])
        try:
            StepFlowConfig.from_dict(flow)
        except (StepSalError, TypeError) as err:
            jcheck.bad("meta.stepflow", flow, f"not StepFlow settings ({err})")
    ids = tcheck.token_ids(ids, vocab)
    layers = doc.get("layers")
    layers = (list(range(maps.shape[0])) if layers is None else
              jcheck.layer_list("layers", layers, count=maps.shape[0], n_layers=n_layers))
    steps = jcheck.steps(doc["steps"], len(ids))
    meta.update(extra)
    return maps, layers, steps, ids, meta
