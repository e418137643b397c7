"""Causal tools for ad hoc circuit analysis at the step level.

From "this step looks salient" to "this step causally matters, through these heads":

* :func:`step_effects` -- the causal effect matrix. ``effects[i, j]`` (query step ``i``,
  key step ``j``, the orientation of the saliency maps) is the mean over the tokens ``t``
  of step ``i`` (``t >= 1``) of ``KL(p(. | x_<t) || p_suppressed(. | x_<t))`` in nats,
  the next-token distributions made at position ``t - 1``, where the suppression stops
  every position from the end of step ``j`` on from attending to step ``j``'s tokens
  (:func:`~stepsal_lens.step_knockout`; rows renormalise, sinks stay). 0 where
  ``i <= j``. Optionally per layer (the suppression in one layer at a time).
* :func:`receiver_heads` -- Thought Anchors' receiver heads: per head, the *vertical
  score* of each step (its mean step-level attention from steps at least ``k`` later)
  and the kurtosis of that score over steps; the same with Step-Saliency in place of
  attention.
* :func:`patch_step` -- activation patching of one step between two traces that share
  the tokens before it (residual stream or one head's output), measuring the answer's
  log-probability.
* :func:`saliency_effect_correlation` / :func:`correlation_summary` -- per layer, the
  Spearman correlation of the head-mean Step-Saliency map with the effect matrix over
  the lower triangle, and a test over traces.

The math lives in pure functions (:func:`kl_per_position`, :func:`vertical_scores`,
:func:`receiver_kurtosis`, :func:`lower_triangle_spearman`); the model-facing functions
are thin loops around :class:`~stepsal_lens.knockout.Knockout` and a few hooks, always
removed.

Examples
--------
>>> from stepsal_lens import load_lrm, step_effects, step_saliency
>>> from stepsal_lens.generation import generate
>>> model = load_lrm("tiny-lrm")
>>> [gen] = generate(model, ["Start with 3. Add 4, then multiply by 2. What is the result?"],
...                  progress=False)
>>> trace = gen.trace(model)
>>> eff = step_effects(model, trace)
>>> tuple(eff.effects.shape) == (trace.n_steps, trace.n_steps)
True
>>> bool((eff.effects.triu() == 0).all())   # 0 where the query step is not after the key
True
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.knockout import Knockout, Suppression
from stepsal_lens.models import model_name
from stepsal_lens.saliency import check_layers, trace_tokens
from stepsal_lens.trace import Step, Trace
from stepsal_lens.typing import StepMap

__all__ = [
    "ReceiverHeads",
    "StepEffects",
    "correlation_summary",
    "kl_per_position",
    "lower_triangle_spearman",
    "patch_step",
    "plot_effects",
    "receiver_heads",
    "receiver_kurtosis",
    "saliency_effect_correlation",
    "step_attention",
    "step_effects",
    "vertical_scores",
]

#: Bytes of float32 logits one chunk of the KL computation may hold ([positions, vocab]).
_CHUNK_BYTES = 64 * 2**20


# ---- pure cores ----------------------------------------------------------------------------

def kl_per_position(logits_p: Float[Tensor, "pos vocab"],
                    logits_q: Float[Tensor, "pos vocab"]) -> Float[Tensor, " pos"]:
    """``KL(softmax(p) || softmax(q))`` per position, in nats, float32, clamped at 0.

    Examples
    --------
    >>> p = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    >>> [round(x, 4) for x in kl_per_position(p, torch.zeros(2, 2)).tolist()]
    [0.0, 0.3278]
    """
    lp = logits_p.float().log_softmax(-1)
    lq = logits_q.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)


def vertical_scores(maps: Float[Tensor, "*head step step"], k: int = 4
                    ) -> Float[Tensor, "*head key_step"]:
    """Mean of each column over the rows at least ``k`` steps below it.

    ``out[..., j] = mean_{i >= j + k} maps[..., i, j]`` for the key steps ``j`` that have
    such rows (``j < n_steps - k``), so the last dimension is ``n_steps - k``.

    >>> m = torch.arange(16.0).reshape(4, 4)
    >>> vertical_scores(m, k=2).tolist()   # column 0: rows 2, 3; column 1: row 3
    [10.0, 13.0]
    """
    if k < 1:
        raise StepSalError(f"k must be at least 1 step; got {k}")
    n = maps.shape[-1]
    if n - k < 1:
        return maps.new_zeros((*maps.shape[:-2], 0))
    i = torch.arange(n, device=maps.device)[:, None]
    j = torch.arange(n, device=maps.device)[None, :]
    below = (i >= j + k).to(maps.dtype)
    sums = (maps * below).sum(-2)[..., : n - k]
    return sums / below.sum(0)[: n - k]


def receiver_kurtosis(maps: Float[Tensor, "*head step step"], k: int = 4
                      ) -> Float[Tensor, "*head"]:
    """Kurtosis over key steps of the :func:`vertical_scores` (receiver-head score).

    Convention: ``scipy.stats.kurtosis(..., fisher=True, bias=True)`` -- excess kurtosis
    (a normal distribution scores 0), the biased (population) estimator. NaN with fewer
    than 2 scored steps or when every score is equal.

    >>> m = torch.zeros(8, 8); m[:, 1] = 1.0          # every later step reads step 1
    >>> round(float(receiver_kurtosis(m, k=2)), 3)    # one spike among 6 scores
    1.2
    """
    from scipy import stats

    v = vertical_scores(maps.double(), k).cpu().numpy()
    if v.shape[-1] < 2:
        return torch.full(v.shape[:-1], float("nan"))
    flat = np.ptp(v, axis=-1) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kurt = stats.kurtosis(v, axis=-1, fisher=True, bias=True)
    kurt = np.where(flat, np.nan, kurt)
    return torch.as_tensor(np.asarray(kurt), dtype=torch.float32)


def lower_triangle_spearman(a: Float[Tensor, "step step"], b: Float[Tensor, "step step"]
                            ) -> tuple[float, float, int]:
    """Spearman's rho (``scipy.stats.spearmanr``) between two step maps over ``i > j``.

    Returns ``(rho, p, n_pairs)``; rho and p are NaN with fewer than 3 pairs or when
    either side is constant.

    >>> a = torch.tensor([[0., 0, 0], [1, 0, 0], [2, 3, 0]])
    >>> lower_triangle_spearman(a, a * 10)[:2]
    (1.0, 0.0)
    """
    from scipy import stats

    n = a.shape[-1]
    i, j = torch.tril_indices(n, n, -1)
    x, y = a[i, j].double().cpu().numpy(), b[i, j].double().cpu().numpy()
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), len(x)
    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue), len(x)


# ---- shared plumbing ---------------------------------------------------------------------

class _Stop(Exception):
    """Ends a forward pass once the final residual stream is captured."""


def _final_states(model: Any, tokens: Tensor, extra_hooks=()) -> Tensor:
    """The input of the unembedding ``[batch, pos, d_model]`` (the forward stops there,
    so no ``[batch, pos, vocab]`` logits are ever made)."""
    kept: dict[str, Tensor] = {}

    def grab(x, hook):
        kept["x"] = x.detach()
        raise _Stop

    try:
        with model.hooks(fwd_hooks=[*extra_hooks, ("unembed.hook_in", grab)]):
            model(tokens)
    except _Stop:
        pass
    if "x" not in kept:
        raise StepSalError("the model never reached its unembedding (unembed.hook_in); "
                           "step_effects and patch_step need a TransformerBridge from load_lrm")
    return kept["x"]


def _chunk(model: Any) -> int:
    return max(1, _CHUNK_BYTES // (4 * model.cfg.d_vocab))


def _check_heads(heads: Sequence[int] | None, n_heads: int) -> list[int] | None:
    if heads is None:
        return None
    heads = sorted({int(h) for h in heads})
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad or not heads:
        raise StepSalError(f"heads {bad or heads} are not valid for a model with {n_heads} "
                           f"heads; pass indices in [0, {n_heads})")
    return heads


# ---- the causal effect matrix --------------------------------------------------------------

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
        """Read what :meth:`save` wrote."""
        from safetensors.torch import load_file

        directory = Path(directory)
        files = [directory / "step_effects.safetensors", directory / "step_effects.json"]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise StepSalError(f"{str(directory)!r} has no {missing}; pass a folder written by "
                               f"StepEffects.save or `stepsal effects`")
        t = load_file(files[0])
        doc = json.loads(files[1].read_text())
        return cls(t["effects"], [Step.from_dict(s) for s in doc["steps"]], t["token_ids"],
                   t.get("effects_per_layer"), doc["layers"], doc["heads"], doc["meta"])

    def plot(self, **kwargs: Any):
        """:func:`plot_effects` of this result."""
        return plot_effects(self, **kwargs)

    def __repr__(self) -> str:
        n = self.n_steps
        per = "" if self.per_layer is None else f", per layer x {self.per_layer.shape[0]}"
        return (f"StepEffects({n}x{n} steps{per}, max {float(self.effects.max()):.4g} nats, "
                f"model={self.meta.get('model')!r})")


def step_effects(model: Any, trace: Trace, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None, *, per_layer: bool = False,
                 batch_size: int = 8, progress: bool = False) -> StepEffects:
    """The causal effect of cutting each step off the steps after it.

    ``effects[i, j]`` = mean over tokens ``t`` of step ``i`` (``t >= 1``) of
    ``KL(p(. | x_<t) || p_cut(. | x_<t))`` (nats), the next-token distribution made at
    position ``t - 1``, where ``p_cut`` is the model with every position from the end of
    step ``j`` on unable to attend to step ``j``'s tokens (the attention logits masked,
    rows renormalised, attention sinks kept, sliding windows respected; see
    :mod:`stepsal_lens.knockout`). 0 where ``i <= j``.

    Key steps are batched (``batch_size`` copies of the trace per forward pass, each
    cutting another step). The forward stops at the unembedding and the KL is computed
    in chunks of positions, so no ``[batch, pos, vocab]`` logits are ever held.

    Parameters
    ----------
    model
        A ``TransformerBridge`` from :func:`~stepsal_lens.load_lrm`.
    trace
        The :class:`~stepsal_lens.Trace` (built with this model's tokenizer).
    layers
        Layers the cut applies in (default: all).
    heads
        Heads the cut applies to (default: all).
    per_layer
        Also the matrix with the cut in one layer at a time, for each of ``layers``
        (``len(layers)`` times the work).
    batch_size
        Forward passes run together.
    progress
        Show a tqdm bar over the forward passes.

    Returns
    -------
    StepEffects
        ``effects`` ``[n_steps, n_steps]`` float32 (and ``per_layer``
        ``[len(layers), n_steps, n_steps]``).

    Examples
    --------
    >>> import tempfile
    >>> from stepsal_lens import Trace, load_lrm
    >>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
    >>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp()), format="think-tags")
    >>> trace = Trace.from_segments("Start with 7. Add 5. What is the result?",
    ...     "We start with the number 7. Adding 5 to 7 gives 12.", "The result is 12.", model)
    >>> eff = step_effects(model, trace, per_layer=True)
    >>> tuple(eff.per_layer.shape), bool(eff.effects[3, 0] > 0)
    ((2, 4, 4), True)
    """
    from tqdm.auto import tqdm

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layers = check_layers(layers, n_layers)
    heads = _check_heads(heads, n_heads)
    if batch_size < 1:
        raise StepSalError(f"batch_size must be at least 1; got {batch_size}")
    tokens = trace_tokens(model, trace)
    n, n_tok = trace.n_steps, trace.n_tokens
    heads_t = None if heads is None else tuple(heads)
    # jobs: (row of the output, key step, layers cut)
    groups: list[tuple[int, ...]] = [tuple(layers)]
    if per_layer:
        groups += [(l,) for l in layers]
    jobs = [(g, j) for g in range(len(groups)) for j in range(n - 1)]
    out = torch.zeros(len(groups), n, n)
    step_of = trace.step_of_token
    chunk = _chunk(model)
    bar = tqdm(total=len(jobs), desc="step effects", unit="cut", disable=not progress)
    try:
        with torch.no_grad():
            base = _final_states(model, tokens)[0]  # [pos, d_model]
            for a in range(0, len(jobs), batch_size):
                batch = jobs[a:a + batch_size]
                rows = [[Suppression(tuple(trace.steps[j].token_span), None, groups[g], heads_t)]
                        for g, j in batch]
                ko = Knockout(model, rows=rows)
                with ko.active():
                    cut = _final_states(model, tokens.expand(len(batch), -1))
                for r, (g, j) in enumerate(batch):
                    start = trace.steps[j + 1].token_span[0]  # first token of a later step
                    # predictions at positions t - 1 for tokens t from `start` on
                    kl = torch.zeros(n_tok)
                    for p in range(max(start - 1, 0), n_tok - 1, chunk):
                        q = min(p + chunk, n_tok - 1)
                        kl[p + 1:q + 1] = kl_per_position(model.unembed(base[p:q]),
                                                          model.unembed(cut[r, p:q])).cpu()
                    # mean over the tokens t >= 1 of each later step
                    t_steps = step_of.clone()
                    t_steps[0] = -1
                    sums = torch.zeros(n + 1).index_add_(0, torch.where(t_steps < 0, n, t_steps),
                                                         kl)
                    counts = torch.bincount(torch.where(t_steps < 0, n, t_steps),
                                            minlength=n + 1).float()
                    col = sums[:n] / counts[:n].clamp_min(1)
                    col[: j + 1] = 0
                    out[g, :, j] = col
                bar.update(len(batch))
    finally:
        bar.close()
    if not bool(torch.isfinite(out).all()):
        raise StepSalError("the effect matrix holds NaN/inf: the model gives non-finite logits "
                           "on this trace; check its weights for NaN/inf and load it in float32")
    meta = {"model": model_name(model), "format": trace.format.name, "n_layers": n_layers,
            "n_heads": n_heads, "measure": "KL(p || p_cut) of next-token distributions, nats",
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "truncated": trace.truncated, "text": trace.text}
    return StepEffects(out[0], list(trace.steps), trace.token_ids.clone(),
                       out[1:] if per_layer else None, layers, heads, meta)


# ---- attention step maps and receiver heads ------------------------------------------------

def step_attention(model: Any, trace: Trace, layers: Sequence[int] | None = None):
    """Step-pooled attention: ``M[l, h, i, j]`` = mean ``A[l, h, q, k]`` over the token
    pairs of steps ``i`` and ``j`` (pooled exactly like the saliency maps).

    Returns a :class:`~stepsal_lens.StepSaliency` whose maps are attention
    (``meta["target"] == "attention"``), so the explorer and plots take it as is.

    >>> from stepsal_lens import Trace, load_lrm
    >>> model = load_lrm("tiny-lrm")
    >>> trace = Trace.from_segments("Start with 2. Add 3. What is the result?",
    ...     "We start with 2. Adding 3 to 2 gives 5.", "The result is \\\\boxed{5}.", model)
    >>> att = step_attention(model, trace)
    >>> tuple(att.maps.shape)
    (4, 4, 4, 4)
    """
    from stepsal_lens.saliency import StepSaliency, pool_saliency

    layers = check_layers(layers, model.cfg.n_layers)
    tokens = trace_tokens(model, trace)
    step_of = trace.step_of_token.to(tokens.device)
    out: dict[int, Tensor] = {}

    def pool(pattern, hook):
        layer = int(hook.name.split(".")[1])
        ones = pattern.new_ones(()).expand_as(pattern)
        out[layer] = pool_saliency(pattern.detach(), ones, step_of, trace.n_steps).cpu()

    hooks = [(f"blocks.{l}.attn.hook_pattern", pool) for l in layers]
    with torch.no_grad():
        _final_states(model, tokens, hooks)
    maps = torch.stack([out[l] for l in layers])
    meta = {"model": model_name(model), "format": trace.format.name, "target": "attention",
            "n_layers": model.cfg.n_layers, "n_heads": int(maps.shape[1]), "text": trace.text}
    return StepSaliency(maps, layers, list(trace.steps), trace.token_ids.clone(), meta)


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
        from stepsal_lens.plots import new_figure

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
        """Read what :meth:`save` wrote."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / "receiver_heads.json").exists():
            raise StepSalError(f"{str(directory)!r} has no receiver_heads.json; pass a folder "
                               f"written by ReceiverHeads.save")
        doc = json.loads((directory / "receiver_heads.json").read_text())
        return cls(dict(load_file(directory / "receiver_heads.safetensors")), doc["layers"],
                   doc["k"], doc["segments"], doc["meta"])


def _restrict(maps: StepMap, segments_of: Sequence[str], keep: Sequence[str]) -> Tensor:
    idx = [i for i, s in enumerate(segments_of) if s in keep]
    return maps[:, :, idx][:, :, :, idx]


def receiver_heads(model: Any, traces: Sequence[Trace] | Trace, *, k: int = 4,
                   segments: Sequence[str] = ("thinking",), saliency: bool = True,
                   saliencies: Sequence[Any] | None = None, target: str = "lm",
                   progress: bool = False) -> ReceiverHeads:
    """Receiver heads (Thought Anchors): heads whose attention singles out a few steps.

    For each trace and head: the step-pooled attention map (:func:`step_attention`)
    restricted to the steps of ``segments``; each key step's *vertical score* -- its mean
    attention from the steps at least ``k`` later (:func:`vertical_scores`); and the
    kurtosis of those scores over steps (:func:`receiver_kurtosis`: excess kurtosis,
    biased estimator). Heads are ranked by the mean over traces. The same with the
    Step-Saliency maps in place of attention when ``saliency`` is true.

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm`.
    traces
        One trace or several.
    k
        Minimum distance in steps between the receiving and the reading step (paper: 4).
    segments
        Segments whose steps are scored (default the thinking, as in Thought Anchors).
    saliency
        Also score the Step-Saliency maps (one backward pass per trace).
    saliencies
        Precomputed :class:`~stepsal_lens.StepSaliency` results, one per trace.
    target
        Saliency target when computing them.
    progress
        tqdm bar over traces.

    Returns
    -------
    ReceiverHeads
        ``.to_dataframe()`` ranks the heads; ``.plot()`` draws layer x head heat maps.

    Examples
    --------
    >>> from stepsal_lens import Trace, load_lrm
    >>> model = load_lrm("tiny-lrm")
    >>> trace = Trace.from_segments("Start with 2. Add 3, then add 4. What is the result?",
    ...     "We start with 2. Adding 3 to 2 gives 5. Adding 4 to 5 gives 9. So we get 9 now. "
    ...     "The total is 9 here. The result is 9 then.", "The result is \\\\boxed{9}.", model)
    >>> rh = receiver_heads(model, trace, k=2)
    >>> list(rh.to_dataframe().columns)[:4]
    ['layer', 'head', 'kurtosis_attention', 'std_attention']
    """
    from tqdm.auto import tqdm

    from stepsal_lens.saliency import step_saliency

    traces = [traces] if isinstance(traces, Trace) else list(traces)
    if not traces:
        raise StepSalError("receiver_heads needs at least one trace")
    if saliencies is not None and len(saliencies) != len(traces):
        raise StepSalError(f"got {len(saliencies)} saliencies for {len(traces)} traces; pass one "
                           f"per trace (or none)")
    bad = [s for s in segments if s not in ("question", "thinking", "summary")]
    if bad:
        raise StepSalError(f"segments must be among question, thinking, summary; got {bad}")
    out: dict[str, list[Tensor]] = {"attention": []}
    if saliency or saliencies is not None:
        out["saliency"] = []
    too_short = 0
    for t, trace in enumerate(tqdm(traces, desc="receiver heads", unit="trace",
                                   disable=not progress)):
        att = step_attention(model, trace)
        segs = att.segments
        if sum(s in segments for s in segs) < k + 2:
            too_short += 1
        out["attention"].append(receiver_kurtosis(_restrict(att.maps, segs, segments), k))
        if "saliency" in out:
            sal = saliencies[t] if saliencies is not None else step_saliency(model, trace,
                                                                             target=target)
            if list(sal.token_ids.tolist()) != trace.token_ids.tolist():
                raise StepSalError(f"saliencies[{t}] is not of traces[{t}] (other tokens)")
            out["saliency"].append(receiver_kurtosis(_restrict(sal.maps, segs, segments), k))
    meta = {"model": model_name(model), "n_traces": len(traces), "too_short": too_short,
            "kurtosis": "scipy.stats.kurtosis(fisher=True, bias=True) over key steps",
            "saliency_target": target if "saliency" in out else None}
    return ReceiverHeads({s: torch.stack(v) for s, v in out.items()},
                         list(range(model.cfg.n_layers)), k, list(segments), meta)


# ---- step patching ---------------------------------------------------------------------------

#: Patchable sites: hook name template and whether one head is patched.
PATCH_SITES = {"resid_pre": "blocks.{l}.hook_resid_pre", "resid_post": "blocks.{l}.hook_resid_post",
               "z": "blocks.{l}.attn.hook_z"}


def _check_patchable(source: Trace, target: Trace, step: int) -> tuple[int, int]:
    for name, tr in (("source", source), ("target", target)):
        if not 0 <= step < tr.n_steps:
            raise StepSalError(f"step {step} is not a step of the {name} trace "
                               f"(0..{tr.n_steps - 1})")
    span_s, span_t = tuple(source.steps[step].token_span), tuple(target.steps[step].token_span)
    if span_s != span_t:
        raise StepSalError(
            f"step {step} covers tokens {span_s} in the source but {span_t} in the target: "
            f"patching needs the same positions in both; pick a step whose token span is equal "
            f"(edit the text so the step keeps its token count)")
    a = span_t[0]
    s_ids, t_ids = source.token_ids[:a].tolist(), target.token_ids[:a].tolist()
    if s_ids != t_ids:
        first = next((i for i, (x, y) in enumerate(zip(s_ids, t_ids)) if x != y), None)
        tok = target.tokenizer
        where = (f"first at token {first}: source {tok.decode([s_ids[first]])!r} vs target "
                 f"{tok.decode([t_ids[first]])!r}" if first is not None else "lengths differ")
        raise StepSalError(
            f"the two traces' tokens before step {step} (positions 0..{a - 1}) differ ({where}); "
            f"patching a step needs a shared prefix: pick an earlier step, or build both traces "
            f"from the same prompt and thinking up to that step")
    return span_t


def patch_step(model: Any, source: Trace, target: Trace, step: int, *,
               site: str = "resid_pre", layers: Sequence[int] | None = None,
               heads: Sequence[int] | None = None, answer: str | None = None,
               batch_size: int = 8):
    """Patch one step's activations from ``source`` into ``target``; measure the answer.

    For each layer (and, with ``site="z"``, each head), run ``target`` with the activation
    at step ``step``'s tokens replaced by ``source``'s, and report the log-probability of
    ``target``'s answer tokens (:func:`~stepsal_lens.saliency.answer_token_positions`)
    before and after. The two traces must have the same tokens before the step and the
    step at the same positions (e.g. a correct and a wrong trace of one question that
    part at this step), else :class:`~stepsal_lens.StepSalError`.

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm`.
    source, target
        The trace to take activations from, and the one to run and measure.
    step
        Step index (the same in both traces).
    site
        ``"resid_pre"`` (the residual stream entering the layer), ``"resid_post"``, or
        ``"z"`` (one head's output, ``blocks.{l}.attn.hook_z``).
    layers, heads
        Layers to patch, one at a time (default: all); heads for ``site="z"`` (default:
        all), one at a time.
    answer
        The answer text in ``target``'s summary (default: its last ``\\boxed{}``).
    batch_size
        Patched runs per forward pass.

    Returns
    -------
    pandas.DataFrame
        One row per patch: ``site``, ``layer``, ``head`` (-1 for the residual stream),
        ``step``, ``logp_target`` (unpatched), ``logp_patched``, ``delta``.

    Examples
    --------
    >>> from stepsal_lens import Trace, load_lrm
    >>> model = load_lrm("tiny-lrm")
    >>> trace = Trace.from_segments("Start with 2. Add 3. What is the result?",
    ...     "We start with 2. Adding 3 to 2 gives 5.", "The result is \\\\boxed{5}.", model)
    >>> df = patch_step(model, trace, trace, step=1)   # identical traces: nothing changes
    >>> float(df.delta.abs().max()) < 1e-5
    True
    """
    import pandas as pd

    from stepsal_lens.saliency import answer_token_positions

    if site not in PATCH_SITES:
        raise StepSalError(f"site must be one of {sorted(PATCH_SITES)}; got {site!r}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layers = check_layers(layers, n_layers)
    if site == "z":
        heads_l: list[int | None] = list(_check_heads(heads, n_heads) or range(n_heads))
    elif heads is not None:
        raise StepSalError(f"heads= needs site='z' (one head's output); site {site!r} patches "
                           f"the whole residual stream")
    else:
        heads_l = [None]
    if batch_size < 1:
        raise StepSalError(f"batch_size must be at least 1; got {batch_size}")
    a, b = _check_patchable(source, target, step)
    src_tokens, tgt_tokens = trace_tokens(model, source), trace_tokens(model, target)
    pos = answer_token_positions(target, answer).to(tgt_tokens.device)
    ids = tgt_tokens[0, pos]

    def logp(x: Tensor) -> Tensor:  # x [batch, pos, d] -> answer log-prob per row
        lp = model.unembed(x[:, pos - 1]).float().log_softmax(-1)
        return lp.gather(-1, ids.expand(x.shape[0], -1)[..., None])[..., 0].sum(-1).cpu()

    names = {l: PATCH_SITES[site].format(l=l) for l in layers}
    kept: dict[int, Tensor] = {}

    def keep(act, hook):
        kept[int(hook.name.split(".")[1])] = act[0, a:b].detach().clone()

    jobs = [(l, h) for l in layers for h in heads_l]
    rows = []
    with torch.no_grad():
        _final_states(model, src_tokens, [(names[l], keep) for l in layers])
        clean = float(logp(_final_states(model, tgt_tokens))[0])
        for c in range(0, len(jobs), batch_size):
            batch = jobs[c:c + batch_size]

            def patch(act, hook, batch=batch):
                layer = int(hook.name.split(".")[1])
                out = act.clone()
                for r, (l, h) in enumerate(batch):
                    if l != layer:
                        continue
                    if h is None:
                        out[r, a:b] = kept[l].to(out.dtype)
                    else:
                        out[r, a:b, h] = kept[l][:, h].to(out.dtype)
                return out

            hooks = [(names[l], patch) for l in sorted({l for l, _ in batch})]
            x = _final_states(model, tgt_tokens.expand(len(batch), -1), hooks)
            for (l, h), v in zip(batch, logp(x).tolist()):
                rows.append({"site": site, "layer": l, "head": -1 if h is None else h,
                             "step": step, "logp_target": clean, "logp_patched": v,
                             "delta": v - clean})
    df = pd.DataFrame(rows)
    df.attrs["answer_tokens"] = model.tokenizer.decode(ids.tolist())
    return df


# ---- saliency vs causality -------------------------------------------------------------------

def saliency_effect_correlation(saliencies: Any, effects: Any):
    """Per layer, Spearman's rho between the head-mean Step-Saliency map and the effect
    matrix, over the lower triangle (query step after key step).

    Parameters
    ----------
    saliencies, effects
        A :class:`~stepsal_lens.StepSaliency` and a :class:`StepEffects` of the same trace,
        or two equally long lists of them.

    Returns
    -------
    pandas.DataFrame
        One row per (trace, layer): ``rho``, ``p``, ``n_pairs`` against the effects of the
        cut in every layer, and ``rho_same_layer``/``p_same_layer`` against the cut in that
        layer alone when the effects have ``per_layer``. NaN where a side is constant.

    Examples
    --------
    >>> import torch
    >>> from stepsal_lens import StepSaliency, Step
    >>> steps = [Step(i, "thinking", "s", (0, 1), (i, i + 1)) for i in range(4)]
    >>> m = torch.tril(torch.rand(4, 4), -1)
    >>> sal = StepSaliency(m.expand(2, 3, 4, 4), [0, 1], steps, torch.arange(4))
    >>> eff = StepEffects(m * 5, steps, torch.arange(4))
    >>> saliency_effect_correlation(sal, eff).rho.tolist()
    [1.0, 1.0]
    """
    import pandas as pd

    sal_list = saliencies if isinstance(saliencies, (list, tuple)) else [saliencies]
    eff_list = effects if isinstance(effects, (list, tuple)) else [effects]
    if len(sal_list) != len(eff_list):
        raise StepSalError(f"got {len(sal_list)} saliencies and {len(eff_list)} effects; pass one "
                           f"of each per trace")
    rows = []
    for t, (sal, eff) in enumerate(zip(sal_list, eff_list)):
        if not torch.equal(sal.token_ids.long(), eff.token_ids.long()):
            raise StepSalError(f"trace {t}: the saliency and the effects come from different "
                               f"token ids; compute both on the same Trace")
        if sal.n_steps != eff.n_steps:
            raise StepSalError(f"trace {t}: {sal.n_steps} saliency steps vs {eff.n_steps} effect "
                               f"steps; compute both on the same Trace")
        head_mean = sal.maps.mean(1)
        for li, layer in enumerate(sal.layers):
            rho, p, n_pairs = lower_triangle_spearman(head_mean[li], eff.effects)
            row = {"trace": t, "layer": layer, "rho": rho, "p": p, "n_pairs": n_pairs}
            if eff.per_layer is not None and layer in eff.layers:
                row["rho_same_layer"], row["p_same_layer"], _ = lower_triangle_spearman(
                    head_mean[li], eff.layer_map(layer))
            rows.append(row)
    return pd.DataFrame(rows)


def correlation_summary(df):
    """Per layer over traces: mean, std, median, min and max of rho, and tests that the
    mean is 0 (one-sample t-test; Wilcoxon signed-rank from 6 traces on).

    ``df`` is :func:`saliency_effect_correlation`'s output; NaN rows are skipped. The
    same for ``rho_same_layer`` when present (prefixed ``same_layer_``).

    >>> import pandas as pd
    >>> df = pd.DataFrame({"trace": [0, 1, 2], "layer": [0, 0, 0], "rho": [0.5, 0.6, 0.7]})
    >>> s = correlation_summary(df)
    >>> round(float(s.mean_rho[0]), 2), int(s.n[0])
    (0.6, 3)
    """
    import pandas as pd
    from scipy import stats

    out = []
    for layer, grp in df.groupby("layer"):
        row: dict[str, Any] = {"layer": layer}
        for col, prefix in (("rho", ""), ("rho_same_layer", "same_layer_")):
            if col not in grp:
                continue
            x = grp[col].dropna().to_numpy()
            row[f"{prefix}n"] = len(x)
            row[f"{prefix}mean_rho"] = float(x.mean()) if len(x) else float("nan")
            row[f"{prefix}std_rho"] = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
            row[f"{prefix}median_rho"] = float(np.median(x)) if len(x) else float("nan")
            row[f"{prefix}min_rho"] = float(x.min()) if len(x) else float("nan")
            row[f"{prefix}max_rho"] = float(x.max()) if len(x) else float("nan")
            t = p = w = float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if len(x) > 1 and np.ptp(x) > 0:
                    res = stats.ttest_1samp(x, 0.0)
                    t, p = float(res.statistic), float(res.pvalue)
                if len(x) >= 6 and (x != 0).any():
                    w = float(stats.wilcoxon(x).pvalue)
            row[f"{prefix}t"], row[f"{prefix}p_ttest"], row[f"{prefix}p_wilcoxon"] = t, p, w
        out.append(row)
    return pd.DataFrame(out)


# ---- views -----------------------------------------------------------------------------------

def plot_effects(effects: StepEffects, *, layers: Sequence[int] | None = None,
                 title: str | None = None, log: bool = True):
    """The effect matrix (and per-layer matrices, if computed) with Q/T/S boundaries.

    ``log`` shows ``log10`` of the effects (zeros at the floor), which spreads out KL
    values spanning orders of magnitude.
    """
    from stepsal_lens.plots import new_figure

    from stepsal_lens.plots import segment_boundaries

    panels = [("cut in all layers", effects.effects)]
    if effects.per_layer is not None:
        pick = effects.layers if layers is None else list(layers)
        panels += [(f"cut in layer {l} only", effects.layer_map(l)) for l in pick]
    data = [m.double() for _, m in panels]
    n = effects.n_steps
    below = torch.tril(torch.ones(n, n, dtype=torch.bool), -1)
    if log:
        pos = torch.cat([d[below & (d > 0)] for d in data])
        floor = float(pos.min()) if len(pos) else 1e-12
        data = [torch.log10(d.clamp_min(floor)).masked_fill(~below, float("nan")) for d in data]
    vmin = float(np.nanmin([np.nanmin(d.numpy()) for d in data])) if n > 1 else 0
    vmax = float(np.nanmax([np.nanmax(d.numpy()) for d in data])) if n > 1 else 1
    fig = new_figure(3.4 * len(panels) + 0.8, 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)
    runs = segment_boundaries(effects.segments)
    letters = {"question": "Q", "thinking": "T", "summary": "S"}
    for ax, (name, _), d in zip(axes[0], panels, data):
        im = ax.imshow(d.numpy(), cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        for _, a, _b in runs[1:]:
            ax.axhline(a - 0.5, color="cyan", lw=0.8)
            ax.axvline(a - 0.5, color="cyan", lw=0.8)
        ticks = [(a + b - 1) / 2 for _, a, b in runs]
        ax.set_xticks(ticks, [letters.get(s, s[:1]) for s, _, _ in runs])
        ax.set_yticks(ticks, [letters.get(s, s[:1]) for s, _, _ in runs])
        ax.set_title(name)
        ax.set_xlabel("key step (cut)")
    axes[0][0].set_ylabel("query step")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8,
                 label="log10 KL (nats)" if log else "KL (nats)")
    if title:
        fig.suptitle(title)
    return fig


def effect_map(effects: StepEffects, layer: int | None = None, scale: str = "row-normalised"
               ) -> np.ndarray:
    """The ``[step, step]`` effect map the explorer shows: the cut in ``layer`` alone
    (when per-layer effects exist for it) or in all layers, on the explorer's scales."""
    from stepsal_lens.metrics import normalize_rows

    m = effects.effects
    if layer is not None and effects.per_layer is not None and layer in effects.layers:
        m = effects.layer_map(layer)
    m = m.double()
    if scale == "row-normalised":
        m = normalize_rows(m)
    elif scale == "log":
        positive = m[m > 0]
        m = torch.log10(m.clamp_min(float(positive.min()) if len(positive) else 1e-12))
    return m.numpy()


def causal_explorer(result: Any, effects: StepEffects, *, model: Any = None,
                    trace: Any = None):
    """The Step-Saliency explorer with a "saliency | causal effect" toggle on the map.

    In causal mode the map is :func:`effect_map` for the slider's layer (the cut in that
    layer alone when ``effects`` has ``per_layer``, else in all layers). Also reached
    as ``explore(result, effects=effects)``.
    """
    from stepsal_lens.widgets import StepExplorer

    class CausalExplorer(StepExplorer):
        """StepExplorer plus a source toggle (``source``: ToggleButtons)."""

        def __init__(self):
            import ipywidgets as w

            if not torch.equal(result.token_ids.long(), effects.token_ids.long()):
                raise StepSalError("the saliency and the effects come from different token "
                                   "ids; compute both on the same Trace")
            self.effects = effects
            self.source = w.ToggleButtons(options=["saliency", "causal effect"],
                                          value="saliency")
            super().__init__(result, model=model, trace=trace)
            self.source.observe(self._redraw, names="value")
            self.widget = w.VBox([self.source, *self.widget.children])

        def _z(self):
            if getattr(self, "source", None) is None or self.source.value == "saliency":
                return super()._z()
            layer, _head, scale = self._current()
            return effect_map(self.effects, self.result.layers[layer], scale)

        def _title(self):
            if getattr(self, "source", None) is None or self.source.value == "saliency":
                return super()._title()
            layer, _head, scale = self._current()
            real = self.result.layers[layer]
            where = (f"cut in layer {real}" if self.effects.per_layer is not None
                     and real in self.effects.layers else "cut in all layers")
            return f"causal effect ({where}), {scale}"

    return CausalExplorer()


# ---- the demo report's section -----------------------------------------------------------------

def demo_causality(model: Any, saliencies: Sequence[Any], *, limit: int = 8) -> dict | None:
    """Effects of the first ``limit`` traces (with at least 3 steps) and their Spearman
    correlation with Step-Saliency per layer: ``{"per_trace", "summary"}`` DataFrames."""
    picked = [s for s in saliencies if s.n_steps >= 3][:limit]
    if not picked:
        return None
    effects = []
    for sal in picked:
        trace = Trace.from_token_ids(sal.token_ids, model)
        if [s.token_span for s in trace.steps] != [s.token_span for s in sal.steps]:
            raise StepSalError("the saliency's steps do not match its re-built trace")
        effects.append(step_effects(model, trace))
    per_trace = saliency_effect_correlation(picked, effects)
    per_trace["index"] = [picked[t].meta.get("index", t) for t in per_trace.trace]
    return {"per_trace": per_trace, "summary": correlation_summary(per_trace)}


def causality_section(causal: dict, out: Path) -> str:
    """The demo report's "Saliency vs causality" section (HTML), with its figure."""
    import html

    from stepsal_lens.plots import new_figure

    from stepsal_lens.plots import figure_png, img_tag

    per, summ = causal["per_trace"], causal["summary"]
    fig = new_figure(5, 3.2)
    ax = fig.subplots()
    for layer, grp in per.groupby("layer"):
        ax.scatter([layer] * len(grp), grp.rho, color="tab:gray", s=12)
    ax.errorbar(summ.layer, summ.mean_rho, yerr=summ.std_rho, color="tab:blue", marker="o",
                capsize=3, label="mean ± sd over traces")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("Spearman rho")
    ax.set_title("head-mean saliency vs effect matrix")
    ax.legend()
    png = figure_png(fig)
    (Path(out) / "causal_spearman.png").write_bytes(png)
    rows = "".join(
        f"<tr><td>{int(r.layer)}</td><td>{int(r.n)}</td><td>{r.mean_rho:.3f}</td>"
        f"<td>{r.std_rho:.3f}</td><td>{r.min_rho:.3f}</td><td>{r.max_rho:.3f}</td>"
        f"<td>{r.p_ttest:.3g}</td></tr>" for r in summ.itertuples())
    return ("<h2>Saliency vs causality</h2><p>On " + html.escape(str(per.trace.nunique()))
            + " traces: the causal effect of cutting each step off the later ones (mean KL of "
            "the next-token distributions, <code>step_effects</code>) against the head-mean "
            "Step-Saliency map, Spearman's rho over the lower triangle, per layer; t-test of "
            "mean rho = 0 over traces.</p><table><tr><th>layer</th><th>traces</th>"
            "<th>mean rho</th><th>sd</th><th>min</th><th>max</th><th>p</th></tr>" + rows
            + "</table>" + img_tag(png, "saliency vs causality"))
