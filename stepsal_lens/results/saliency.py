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
from stepsal_lens.segments.trace import Step
from stepsal_lens.typing import StepMap

__all__ = ["StepSaliency"]


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
        keep = ("model", "format", "target", "n_layers", "n_heads")
        doc = {key: self.meta.get(key) for key in keep}
        doc["layers"] = self.layers
        doc["steps"] = [s.to_dict() for s in self.steps]
        doc["meta"] = {k: v for k, v in self.meta.items() if k not in keep}
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
        """Read what :meth:`save` wrote, checking shapes, dtypes, finiteness and that the
        step count of ``steps.json`` matches the maps."""
        directory = Path(directory)
        files = [directory / "step_saliency.safetensors", directory / "steps.json"]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise StepSalError(f"{str(directory)!r} has no {missing}; pass a folder written "
                               f"by StepSaliency.save or `stepsal analyze`")
        tensors, doc = _read_saved(files)
        steps = [Step.from_dict(s) for s in doc["steps"]]
        meta = {k: doc.get(k) for k in ("model", "format", "target", "n_layers", "n_heads")}
        meta.update(doc.get("meta") or {})
        layers = doc.get("layers") or list(range(tensors["maps"].shape[0]))
        return cls(tensors["maps"], layers, steps, tensors["token_ids"], meta)

    def __repr__(self) -> str:
        n_l, n_h, n_s, _ = self.maps.shape
        return (f"StepSaliency({n_l} layers x {n_h} heads x {n_s}x{n_s} steps, "
                f"target={self.meta.get('target')!r}, model={self.meta.get('model')!r})")


def _read_saved(files: list[Path]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and check what :meth:`StepSaliency.save` wrote: every failure names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tfile, jfile = files
    fix = "write it again with StepSaliency.save or `stepsal analyze`"
    try:
        tensors = load_file(tfile)
    except (SafetensorError, OSError) as err:
        raise StepSalError(f"{str(tfile)!r} is not a readable safetensors file ({err}); {fix}"
                           ) from None
    try:
        doc = json.loads(jfile.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise StepSalError(f"{str(jfile)!r} is not valid JSON ({err}); {fix}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list):
        raise StepSalError(f"{str(jfile)!r} has no list of 'steps'; {fix}")
    missing = sorted({"maps", "token_ids"} - set(tensors))
    if missing:
        raise StepSalError(f"{str(tfile)!r} lacks the tensor(s) {missing}; {fix}")
    maps, ids = tensors["maps"], tensors["token_ids"]
    if maps.dim() != 4 or not maps.dtype.is_floating_point:
        raise StepSalError(f"{str(tfile)!r}: maps must be a 4-d float tensor [layer, head, "
                           f"step, step]; got {maps.dtype} of shape {tuple(maps.shape)}; {fix}")
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise StepSalError(f"{str(tfile)!r}: token_ids must be a 1-d integer tensor; got "
                           f"{ids.dtype} of shape {tuple(ids.shape)}; {fix}")
    n = len(doc["steps"])
    if maps.shape[2] != maps.shape[3] or maps.shape[2] != n:
        raise StepSalError(f"{str(tfile)!r} holds maps over {tuple(maps.shape[2:])} steps but "
                           f"{str(jfile)!r} lists {n} steps; the two files are from different "
                           f"runs - {fix}")
    if not bool(torch.isfinite(maps).all()):
        bad = int((~torch.isfinite(maps)).sum())
        raise StepSalError(f"{str(tfile)!r}: {bad} map values are NaN or infinite; saliency is "
                           f"never saved non-finite, so the file was altered - {fix}")
    layers = doc.get("layers")
    if layers is not None and (not isinstance(layers, list) or len(layers) != maps.shape[0]
                               or not all(isinstance(l, int) for l in layers)):
        raise StepSalError(f"{str(jfile)!r}: 'layers' must list {maps.shape[0]} layer indices "
                           f"(one per map); got {layers!r}; {fix}")
    keys = ("index", "segment", "text", "token_start", "token_end")
    for i, st in enumerate(doc["steps"]):
        if not isinstance(st, dict) or any(k not in st for k in keys):
            raise StepSalError(f"{str(jfile)!r}: step {i} needs the keys {list(keys)}; {fix}")
        a, b = st["token_start"], st["token_end"]
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= len(ids)):
            raise StepSalError(f"{str(jfile)!r}: step {i} spans tokens {a}-{b}, outside the "
                               f"{len(ids)} saved token ids; {fix}")
    return {"maps": maps.float(), "token_ids": ids.long()}, doc
