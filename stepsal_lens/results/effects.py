"""Results of the causal tools: the step effect matrix and receiver-head scores.

Both save to safetensors + JSON and load back with checks; ``.plot()`` is a convenience
that calls the figure code in :mod:`stepsal_lens.apps.circuits`.

Examples
--------
>>> import tempfile, torch
>>> from stepsal_lens import Step, StepEffects
>>> steps = [Step(0, "question", "Q?", (0, 2), (0, 2)), Step(1, "thinking", "T.", (2, 4), (2, 4))]
>>> eff = StepEffects(torch.tensor([[0.0, 0.0], [0.5, 0.0]]), steps, torch.arange(4))
>>> StepEffects.load(eff.save(tempfile.mkdtemp())).effects[1, 0].item()
0.5
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.results.checks import (
    FIX_EFFECTS,
    FIX_RECEIVERS,
    FileCheck,
    read_json,
    read_safetensors,
)
from stepsal_lens.segments.trace import SEGMENTS, Step

__all__ = ["ReceiverHeads", "StepEffects"]


@dataclass
class StepEffects:
    """The causal effect matrix of one trace (made by :func:`step_effects`).

    Attributes
    ----------
    effects : Tensor
        ``[n_steps, n_steps]`` float32: ``effects[i, j]`` = mean KL (nats) over the tokens
        of query step ``i`` when every later position is cut off key step ``j`` in all
        of :attr:`layers`; 0 where ``i <= j``.
    per_layer : Tensor or None
        ``[len(layers), n_steps, n_steps]``: the same with the cut in one layer at a
        time (row ``r`` is layer ``layers[r]``), when asked for.
    layers : list[int]
        Layers the cut applies in.
    heads : list[int] or None
        Heads the cut applies to (``None``: all).
    steps : list[Step]
    token_ids : Tensor
        ``[n_tokens]`` int64, the ids the model saw.
    meta : dict
        ``model``, ``format``, ``n_layers``, ``n_heads``, ``measure``, ``text``.
    """

    effects: Float[Tensor, "step step"]
    steps: list[Step]
    token_ids: Tensor
    per_layer: Float[Tensor, "layer step step"] | None = None
    layers: list[int] = field(default_factory=list)
    heads: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def segments(self) -> list[str]:
        """Segment of each step."""
        return [s.segment for s in self.steps]

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def layer_map(self, layer: int) -> Float[Tensor, "step step"]:
        """The effect matrix with the cut in model layer ``layer`` only."""
        if self.per_layer is None or layer not in self.layers:
            raise StepSalError(f"no per-layer effects for layer {layer}; run step_effects(..., "
                               f"per_layer=True) (layers with them: "
                               f"{self.layers if self.per_layer is not None else []})")
        return self.per_layer[self.layers.index(layer)]

    def to_dataframe(self):
        """Tidy form: one row per (query step > key step): ``layer`` ("all" for the cut
        in every layer), query/key step and segment, ``effect``."""
        import pandas as pd

        n = self.n_steps
        i, j = torch.tril_indices(n, n, -1)
        seg = np.array(self.segments, dtype=object)
        maps = [("all", self.effects)]
        if self.per_layer is not None:
            maps += list(zip(self.layers, self.per_layer))
        frames = [pd.DataFrame({"layer": [str(name)] * len(i), "query_step": i.numpy(),
                                "key_step": j.numpy(), "query_segment": seg[i.numpy()],
                                "key_segment": seg[j.numpy()],
                                "effect": m[i, j].numpy()}) for name, m in maps]
        return pd.concat(frames, ignore_index=True)

    def top(self, n: int = 5):
        """The ``n`` largest effects (cut in every layer) with both steps' text."""
        df = self.to_dataframe()
        df = df[df.layer == "all"].nlargest(n, "effect").drop(columns="layer")
        df["query_text"] = [self.steps[i].text for i in df.query_step]
        df["key_text"] = [self.steps[j].text for j in df.key_step]
        return df.reset_index(drop=True)

    def key_importance(self) -> Float[Tensor, " step"]:
        """Mean effect of cutting each key step over all later query steps (NaN for the
        last step)."""
        n = self.n_steps
        later = torch.tril(torch.ones(n, n), -1)
        return (self.effects * later).sum(0) / later.sum(0)

    def tensors(self) -> dict[str, Tensor]:
        """What ``step_effects.safetensors`` holds: ``effects`` float32, ``token_ids``
        int64 and ``effects_per_layer`` if computed."""
        out = {"effects": self.effects.float().contiguous(),
               "token_ids": self.token_ids.long().contiguous()}
        if self.per_layer is not None:
            out["effects_per_layer"] = self.per_layer.float().contiguous()
        return out

    def save(self, directory: str | Path) -> Path:
        """Write ``step_effects.safetensors`` (``effects`` float32 ``[n_steps, n_steps]``,
        ``token_ids`` int64, ``effects_per_layer`` if any) and ``step_effects.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), directory / "step_effects.safetensors")
        doc = {"layers": self.layers, "heads": self.heads, "meta": self.meta,
               "steps": [s.to_dict() for s in self.steps]}
        (directory / "step_effects.json").write_text(json.dumps(doc, indent=1,
                                                                ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> StepEffects:
        """Read what :meth:`save` wrote, checking every field first: ``effects`` a
        finite, non-negative ``[step, step]`` float matrix, 0 on and above the diagonal,
        over the steps of ``step_effects.json``; ``effects_per_layer`` (if saved) one such
        matrix per layer of ``layers`` (increasing, inside ``meta["n_layers"]``);
        ``heads`` None or increasing indices inside ``meta["n_heads"]``; ``token_ids``
        and the steps as :meth:`StepSaliency.load <stepsal_lens.StepSaliency.load>`
        checks them. Anything else raises one :class:`~stepsal_lens.StepSalError` naming
        the file, the field, the value and the fix."""
        directory = Path(directory)
        files = [directory / "step_effects.safetensors", directory / "step_effects.json"]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise StepSalError(f"{str(directory)!r} has no {missing}; pass a folder written by "
                               f"StepEffects.save or `stepsal effects`")
        t = read_safetensors(files[0], FIX_EFFECTS, ("effects", "token_ids"))
        doc = read_json(files[1], FIX_EFFECTS)
        tcheck, jcheck = FileCheck(files[0], FIX_EFFECTS), FileCheck(files[1], FIX_EFFECTS)
        if not isinstance(doc, dict):
            jcheck.says(f"holds a JSON {type(doc).__name__}, not an object")
        meta = jcheck.obj("meta", jcheck.key(doc, "meta"), optional=True)
        n_layers, n_heads, vocab = (meta.get(k) for k in ("n_layers", "n_heads", "d_vocab"))
        for key, value in (("n_layers", n_layers), ("n_heads", n_heads), ("d_vocab", vocab)):
            if value is not None:
                jcheck.integer(f"meta.{key}", value, low=1)
        for key in ("text", "tokenizer", "model"):
            jcheck.string(f"meta.{key}", meta.get(key), optional=True)
        ids = tcheck.token_ids(t["token_ids"], vocab)
        steps = jcheck.steps(jcheck.key(doc, "steps"), len(ids))
        n = len(steps)
        effects = tcheck.float_tensor("effects", t["effects"], ("step", "step"))
        if tuple(effects.shape) != (n, n):
            tcheck.fail(f"effects has shape {tuple(effects.shape)} but {str(files[1])!r} lists "
                        f"{n} steps; the two files are from different runs")
        layers = jcheck.key(doc, "layers")
        if not isinstance(layers, list):
            jcheck.bad("layers", layers, "must be a list of layer indices")
        layers = jcheck.layer_list("layers", layers, count=len(layers), n_layers=n_layers)
        heads = jcheck.key(doc, "heads")
        if heads is not None:
            if not isinstance(heads, list) or not heads:
                jcheck.bad("heads", heads, "must be null (all heads) or a list of head indices")
            for i, h in enumerate(heads):
                jcheck.integer(f"heads[{i}]", h, low=0,
                               high=None if n_heads is None else n_heads - 1)
        per_layer = t.get("effects_per_layer")
        if per_layer is not None:
            per_layer = tcheck.float_tensor("effects_per_layer", per_layer,
                                            ("layer", "step", "step"))
            if tuple(per_layer.shape) != (len(layers), n, n):
                tcheck.fail(f"effects_per_layer has shape {tuple(per_layer.shape)}; expected "
                            f"{(len(layers), n, n)} (one matrix per layer of {layers})")
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool))
        for name, m in (("effects", effects), ("effects_per_layer", per_layer)):
            if m is not None and bool((m[..., upper] != 0).any()):
                tcheck.fail(f"{name} is non-zero on or above the diagonal; a step has no "
                            f"effect on itself or on earlier steps")
        return cls(effects, steps, ids, per_layer, layers, heads, meta)

    def plot(self, **kwargs: Any):
        """:func:`~stepsal_lens.apps.circuits.plot_effects` of this result."""
        from stepsal_lens.apps.circuits import plot_effects

        return plot_effects(self, **kwargs)

    def __repr__(self) -> str:
        n = self.n_steps
        per = "" if self.per_layer is None else f", per layer x {self.per_layer.shape[0]}"
        return (f"StepEffects({n}x{n} steps{per}, max {float(self.effects.max()):.4g} nats, "
                f"model={self.meta.get('model')!r})")


@dataclass
class ReceiverHeads:
    """Receiver-head scores over a set of traces (made by :func:`receiver_heads`).

    Attributes
    ----------
    kurtosis : dict[str, Tensor]
        ``"attention"`` (and ``"saliency"``) -> ``[n_traces, n_layers, n_heads]``
        kurtosis of the vertical scores (NaN for a trace with too few steps).
    layers : list[int]
    k : int
        Minimum step distance of the vertical score.
    segments : list[str]
        Segments whose steps were scored.
    meta : dict
    """

    kurtosis: dict[str, Float[Tensor, "trace layer head"]]
    layers: list[int]
    k: int = 4
    segments: list[str] = field(default_factory=lambda: ["thinking"])
    meta: dict[str, Any] = field(default_factory=dict)

    def mean(self, source: str = "attention") -> Float[Tensor, "layer head"]:
        """Mean kurtosis over traces (NaN-skipping) of one source."""
        if source not in self.kurtosis:
            raise StepSalError(f"source must be one of {sorted(self.kurtosis)}; got {source!r}")
        return torch.nanmean(self.kurtosis[source], 0)

    def to_dataframe(self):
        """One row per (layer, head): mean and std of the kurtosis over traces and the
        rank (1 = strongest receiver) per source; sorted by the attention rank."""
        import pandas as pd

        n_h = next(iter(self.kurtosis.values())).shape[-1]
        layer, head = np.meshgrid(self.layers, np.arange(n_h), indexing="ij")
        df = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel()})
        for source, k in self.kurtosis.items():
            arr = k.double().numpy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                df[f"kurtosis_{source}"] = np.nanmean(arr, 0).ravel()
                df[f"std_{source}"] = np.nanstd(arr, 0).ravel()
            df[f"rank_{source}"] = df[f"kurtosis_{source}"].rank(ascending=False,
                                                                   method="min").astype("Int64")
        df["n_traces"] = int(next(iter(self.kurtosis.values())).shape[0])
        return df.sort_values("rank_attention").reset_index(drop=True)

    def plot(self):
        """Layer x head heat maps of the mean kurtosis, one panel per source."""
        from stepsal_lens.apps.plots import new_figure

        sources = list(self.kurtosis)
        fig = new_figure(3.6 * len(sources) + 0.6, 3.2)
        axes = fig.subplots(1, len(sources), squeeze=False)
        for ax, source in zip(axes[0], sources):
            m = self.mean(source).numpy()
            im = ax.imshow(m, cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_yticks(range(len(self.layers)), [str(l) for l in self.layers])
            ax.set_xticks(range(m.shape[1]))
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"receiver kurtosis ({source})")
            fig.colorbar(im, ax=ax, shrink=0.8)
        return fig

    def save(self, directory: str | Path) -> Path:
        """Write ``receiver_heads.safetensors`` and ``receiver_heads.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.float().contiguous() for k, v in self.kurtosis.items()},
                  directory / "receiver_heads.safetensors")
        (directory / "receiver_heads.json").write_text(json.dumps(
            {"layers": self.layers, "k": self.k, "segments": self.segments, "meta": self.meta},
            indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ReceiverHeads:
        """Read what :meth:`save` wrote, checking every field first: kurtosis tensors
        named ``attention`` / ``saliency``, float ``[trace, layer, head]`` of one shape,
        without infinities (NaN marks a trace with too few steps); ``layers`` one
        increasing index per layer row; ``k`` a positive integer; ``segments`` known
        segment names. Anything else raises one :class:`~stepsal_lens.StepSalError`
        naming the file, the field, the value and the fix."""
        directory = Path(directory)
        jfile, tfile = directory / "receiver_heads.json", directory / "receiver_heads.safetensors"
        missing = [f.name for f in (tfile, jfile) if not f.exists()]
        if missing:
            raise StepSalError(f"{str(directory)!r} has no {missing}; pass a folder "
                               f"written by ReceiverHeads.save")
        kurtosis = read_safetensors(tfile, FIX_RECEIVERS, ("attention",))
        doc = read_json(jfile, FIX_RECEIVERS)
        tcheck, jcheck = FileCheck(tfile, FIX_RECEIVERS), FileCheck(jfile, FIX_RECEIVERS)
        if not isinstance(doc, dict):
            jcheck.says(f"holds a JSON {type(doc).__name__}, not an object")
        unknown = sorted(set(kurtosis) - {"attention", "saliency"})
        if unknown:
            tcheck.says(f"holds the tensor(s) {unknown}; only 'attention' and 'saliency'")
        shape = tuple(kurtosis["attention"].shape)
        for name, k in kurtosis.items():
            if k.dim() != 3 or not k.dtype.is_floating_point or bool(torch.isinf(k).any()) \
                    or tuple(k.shape) != shape:
                tcheck.fail(f"{name} must be a float [trace, layer, head] tensor without "
                            f"infinities, of the shape of 'attention' {shape}; got {k.dtype} "
                            f"of shape {tuple(k.shape)}")
        meta = jcheck.obj("meta", jcheck.key(doc, "meta"), optional=True)
        layers = jcheck.layer_list("layers", jcheck.key(doc, "layers"), count=shape[1],
                                   n_layers=meta.get("n_layers") if isinstance(
                                       meta.get("n_layers"), int) else None)
        k = jcheck.integer("k", jcheck.key(doc, "k"), low=1)
        segments = jcheck.key(doc, "segments")
        if not isinstance(segments, list) or not segments \
                or any(s not in SEGMENTS for s in segments):
            jcheck.bad("segments", segments, f"must list segments of {list(SEGMENTS)}")
        return cls({name: t.float() for name, t in kurtosis.items()}, layers, k, segments,
                   meta)
