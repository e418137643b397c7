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
* :func:`~stepsal_lens.core.causal.saliency_effect_correlation` /
  :func:`~stepsal_lens.core.causal.correlation_summary` -- per layer, the
  Spearman correlation of the head-mean Step-Saliency map with the effect matrix over
  the lower triangle, and a test over traces.

The math lives in pure functions (:mod:`stepsal_lens.core.causal`); the model-facing functions
are thin loops around :class:`~stepsal_lens.lens.knockout.Knockout` and a few hooks, always
removed.

Examples
--------
>>> from stepsal_lens import load_lrm, step_effects, step_saliency
>>> from stepsal_lens.lens.generation import generate
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

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from stepsal_lens.core.causal import kl_per_position, receiver_kurtosis
from stepsal_lens.errors import StepSalError
from stepsal_lens.lens.knockout import Knockout
from stepsal_lens.core.knockout import Suppression
from stepsal_lens.lens.saliency import check_layers, trace_tokens
from stepsal_lens.results.effects import ReceiverHeads, StepEffects
from stepsal_lens.segments.association import model_name
from stepsal_lens.segments.trace import Trace, check_trace
from stepsal_lens.typing import StepMap
from stepsal_lens._checks import check_whole

__all__ = ["patch_step", "receiver_heads", "step_attention", "step_effects"]

#: Bytes of float32 logits one chunk of the KL computation may hold ([positions, vocab]).
_CHUNK_BYTES = 64 * 2**20



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


def step_effects(model: Any, trace: Trace, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None, *, per_layer: bool = False,
                 batch_size: int = 8, progress: bool = False) -> StepEffects:
    """The causal effect of cutting each step off the steps after it.

    ``effects[i, j]`` = mean over tokens ``t`` of step ``i`` (``t >= 1``) of
    ``KL(p(. | x_<t) || p_cut(. | x_<t))`` (nats), the next-token distribution made at
    position ``t - 1``, where ``p_cut`` is the model with every position from the end of
    step ``j`` on unable to attend to step ``j``'s tokens (the attention logits masked,
    rows renormalised, attention sinks kept, sliding windows respected; see
    :mod:`stepsal_lens.lens.knockout`). 0 where ``i <= j``.

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
    check_trace(trace, "trace")
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
            "n_heads": n_heads, "d_vocab": int(model.cfg.d_vocab),
            "tokenizer": getattr(trace, "tokenizer_fingerprint", None), "measure": "KL(p || p_cut) of next-token distributions, nats",
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
    check_trace(trace, "trace")
    from stepsal_lens.results.saliency import StepSaliency
    from stepsal_lens.core.pooling import pool_saliency

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
            "n_layers": model.cfg.n_layers, "n_heads": int(maps.shape[1]),
            "d_vocab": int(model.cfg.d_vocab), "text": trace.text}
    return StepSaliency(maps, layers, list(trace.steps), trace.token_ids.clone(), meta)


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
    for i, t in enumerate([traces] if isinstance(traces, Trace) else
                          traces if isinstance(traces, (list, tuple)) else [traces]):
        check_trace(t, "traces" if isinstance(traces, Trace) or not isinstance(
            traces, (list, tuple)) else f"traces[{i}]")
    from tqdm.auto import tqdm

    from stepsal_lens.lens.saliency import step_saliency

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
    ``target``'s answer tokens (:func:`~stepsal_lens.lens.saliency.answer_token_positions`)
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
    check_trace(source, "source")
    check_trace(target, "target")
    check_whole(step, "step", low=0)
    import pandas as pd

    from stepsal_lens.lens.targets import answer_token_positions

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
