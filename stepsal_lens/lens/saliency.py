"""Step-Saliency: attention x gradient on ``hook_pattern``, pooled into step-to-step maps.

For layer ``l``, head ``h``, query ``q`` and key ``k``::

    I[l,h,q,k] = | A[l,h,q,k] * dL/dA[l,h,q,k] |
    M[l,h,i,j] = mean_{q in step i, k in step j} I[l,h,q,k]

Two engines compute the same maps. ``fused`` (the default) swaps a fused attention into
the bridge's Hugging Face model for the call: its backward recomputes ``A`` block by
block of query rows and pools ``|A * dL/dA|`` at once, at about the cost of one plain
forward+backward pass (:mod:`stepsal_lens.fused`). ``hook_pattern`` is the readable
reference: a forward hook keeps each layer's pattern (a view autograd saves anyway) and
the backward hook multiplies it by the incoming gradient and pools it, so no layer's
token-level saliency outlives its hook; it also runs the users' hooks (StepFlow, knockouts),
so a hooked model uses it. ``low_memory=True`` checkpoints every layer and recomputes one
at a time in backward, with either engine.

Examples
--------
>>> import tempfile
>>> from stepsal_lens import Trace, load_lrm, step_saliency
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp()), format="think-tags")
>>> trace = Trace.from_segments("Start with 7. Add 5. What is the result?",
...     "We start with the number 7. Adding 5 to 7 gives 12.", "The result is 12.", model)
>>> sal = step_saliency(model, trace)
>>> tuple(sal.maps.shape), sal.meta["engine"]  # [n_layers, n_heads, n_steps, n_steps]
((2, 4, 4, 4), 'fused')
>>> bool((sal.maps[:, :, 0, 1:] == 0).all())  # the question cannot attend to later steps
True
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepsal_lens.models import model_name
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from stepsal_lens._registry import Registry
from stepsal_lens.errors import StepSalError
from stepsal_lens.trace import Step, Trace
from stepsal_lens.typing import Pattern, PatternGrad, StepMap

__all__ = [
    "StepSaliency",
    "get_target",
    "list_targets",
    "pool_saliency",
    "register_target",
    "step_saliency",
    "token_saliency",
]


# ---- pure core ----------------------------------------------------------------------------

def pool_saliency(pattern: Pattern, grad: PatternGrad, step_of_token: Int[Tensor, " token"],
                  n_steps: int, *, chunk: int = 256) -> Float[Tensor, "head step step"]:
    """Pool ``|A * dL/dA|`` of one layer into a step-to-step map, in float32.

    Parameters
    ----------
    pattern, grad
        ``[1, head, token, token]`` post-softmax pattern and its gradient (any dtype);
        causal (zero above the diagonal), as for every supported model.
    step_of_token
        ``[token]`` step index of each token, ``-1`` for tokens in no step; each step's
        tokens form one contiguous range (query row ``i`` is token ``key - query + i``).
    n_steps
        Number of steps.
    chunk
        Query rows processed at a time (bounds the temporaries to
        ``head x chunk x token`` floats).

    Returns
    -------
    Tensor
        ``[head, step, step]``: the mean saliency over all (query, key) pairs of two
        steps, causally masked pairs (zeros) included.
    """
    from stepsal_lens.fused import pool_block, step_bounds, step_means

    if pattern.shape[0] != 1:
        raise StepSalError(f"pool_saliency takes one sequence; got batch {pattern.shape[0]}")
    n_heads, n_q, n_k = pattern.shape[1:]
    starts, ends = step_bounds(spans_of_steps(step_of_token, n_steps), pattern.device)
    offset = n_k - n_q  # keys before the first query (0 without a KV cache)
    # Query rows in chunks so temporaries stay small; each chunk stops at its last visible
    # key (the pattern is exactly 0 beyond it), and steps are pooled by their boundaries.
    sums = torch.zeros(n_heads, n_steps, n_steps, device=pattern.device)
    for a in range(0, n_q, chunk):
        b = min(a + chunk, n_q)
        k = b + offset
        sal = (pattern[0, :, a:b, :k].float() * grad[0, :, a:b, :k].float()).abs_()
        pool_block(sal, starts, ends, row0=a + offset, key0=0, out=sums)
    return step_means(sums, starts, ends)


def spans_of_steps(step_of_token: Int[Tensor, " token"], n_steps: int) -> list[tuple[int, int]]:
    """Token span of each step from a per-token step index (``-1``: no step); every step's
    tokens must be one contiguous range, as in a :class:`~stepsal_lens.Trace`.

    >>> spans_of_steps(torch.tensor([-1, 0, 0, -1, 1]), 2)
    [(1, 3), (4, 5)]
    """
    spans = []
    for i in range(n_steps):
        where = (step_of_token == i).nonzero().flatten()
        if len(where) == 0:
            raise StepSalError(f"step {i} has no tokens (n_steps={n_steps})")
        a, b = int(where[0]), int(where[-1]) + 1
        if len(where) != b - a:
            raise StepSalError(f"step {i}'s tokens are not one contiguous range "
                               f"({where.tolist()[:8]}...); steps are contiguous token spans")
        spans.append((a, b))
    return spans


# ---- targets ------------------------------------------------------------------------------

#: A target maps float32 logits ``[1, token, vocab]`` and the trace to a scalar.
Target = Callable[..., Tensor]
_TARGETS: Registry[Target] = Registry("saliency target", "register_target(name, fn)")


#: Memory-lean forms of targets, ``lean(hidden, unembed, trace, **kwargs) -> scalar``: from
#: the final hidden states ``[1, token, d_model]`` and the unembedding, so the fused engine
#: never holds all ``[token, vocab]`` logits (see :mod:`stepsal_lens.fused`).
_LEAN: dict[str, Callable[..., Tensor]] = {}


def register_target(name: str, fn: Target, *, overwrite: bool = False,
                    lean: Callable[..., Tensor] | None = None) -> None:
    """Add a saliency target ``fn(logits, trace, **kwargs) -> scalar``.

    ``lean(hidden, unembed, trace, **kwargs)``, optional, computes the same scalar from
    the final hidden states and the unembedding (e.g. in chunks of positions); the fused
    engine uses it instead of materialising all logits.
    """
    _TARGETS.register(name, fn, overwrite=overwrite)
    if lean is not None:
        _LEAN[name] = lean
    else:
        _LEAN.pop(name, None)


def get_lean_target(name: str | Target) -> Callable[..., Tensor] | None:
    """The memory-lean form of a registered target (None if it has none)."""
    return _LEAN.get(name) if isinstance(name, str) else None


def list_targets() -> list[str]:
    """Names of the registered saliency targets."""
    return _TARGETS.names()


def get_target(name: str | Target) -> Target:
    """A target by name (a callable passes through)."""
    return name if callable(name) else _TARGETS.get(name)


def _check_target_kwargs(fn: Target, target: Any, kwargs: dict[str, Any]) -> None:
    """Refuse keywords the target does not take, before the forward pass."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: cannot tell
        return
    try:
        sig.bind(None, None, **kwargs)
    except TypeError:
        name = target if isinstance(target, str) else getattr(target, "__name__", "custom")
        params = [p.name for p in list(sig.parameters.values())[2:]
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise StepSalError(f"target {name!r} does not take {sorted(kwargs)}; its options are "
                           f"{params or 'none'} (targets: {list_targets()})") from None


def _lm_target(logits: Tensor, trace: Trace) -> Tensor:
    ids = trace.token_ids.to(logits.device)
    return F.cross_entropy(logits[0, :-1], ids[1:])


def _summary_positions(trace: Trace) -> Tensor:
    idx = trace.steps_in("summary")
    if not idx:
        raise StepSalError("target 'summary' needs a summary, but the trace has none "
                           f"({'truncated' if trace.truncated else 'empty summary'}); use target='lm'")
    pos = torch.cat([torch.arange(*trace.steps[i].token_span) for i in idx])
    return pos[pos > 0]


def _summary_target(logits: Tensor, trace: Trace) -> Tensor:
    pos = _summary_positions(trace).to(logits.device)
    ids = trace.token_ids.to(logits.device)
    return F.cross_entropy(logits[0, pos - 1], ids[pos])


def answer_token_positions(trace: Trace, answer: str | None = None) -> Tensor:
    """Positions of the answer's tokens in the summary (last occurrence).

    ``answer=None`` takes the summary's final answer as :func:`stepsal_lens.answers.find_answer`
    reads it (the last ``\\boxed{...}`` with balanced braces, so all of ``\\frac{1}{2}``,
    else "the answer is ..."), located by its character span.
    """
    from stepsal_lens.answers import find_answer

    a, b = trace.segment_char_span("summary")
    summary = trace.text[a:b]
    if answer is None:
        found = find_answer(summary)
        if found is None:
            raise StepSalError("target 'answer' needs answer=... (no \\boxed{} or \"answer is\" "
                               f"in the summary {summary[:80]!r})")
        at, answer = found.start, found.text
    else:
        at = summary.rfind(answer) if answer else -1
    if at < 0:
        raise StepSalError(f"answer {answer!r} not found in the summary {summary[:80]!r}")
    lo, hi = a + at, a + at + len(answer)
    pos = [t for t, (s, e) in enumerate(trace.offsets) if s < hi and e > lo and t > 0]
    return torch.tensor(pos, dtype=torch.long)


def _answer_target(logits: Tensor, trace: Trace, answer: str | None = None) -> Tensor:
    pos = answer_token_positions(trace, answer).to(logits.device)
    ids = trace.token_ids.to(logits.device)
    return logits[0, pos - 1].log_softmax(-1).gather(-1, ids[pos, None]).sum()


def logit_position(trace: Trace, n: int, position: int = -2,
                   token: int | str | None = None) -> tuple[int, int]:
    """The ``logit`` target's (position, token id): ``token`` defaults to the trace's next
    token, a string is looked up in the tokenizer."""
    if not -n <= position < n:
        raise StepSalError(f"position {position} is outside the trace of {n} tokens")
    pos = position % n
    if token is None:
        if pos + 1 >= n:
            raise StepSalError("target 'logit' at the last position needs token=...")
        token = int(trace.token_ids[pos + 1])
    if isinstance(token, str):
        token = trace.tokenizer.convert_tokens_to_ids(token)
    return pos, token


def _logit_target(logits: Tensor, trace: Trace, position: int = -2,
                  token: int | str | None = None) -> Tensor:
    pos, token = logit_position(trace, logits.shape[1], position, token)
    return logits[0, pos, token]


def _register_builtin_targets() -> None:
    from stepsal_lens import fused

    register_target("lm", _lm_target, lean=fused.lean_lm)
    register_target("summary", _summary_target, lean=fused.lean_summary)
    register_target("answer", _answer_target, lean=fused.lean_answer)
    register_target("logit", _logit_target, lean=fused.lean_logit)


_register_builtin_targets()


# ---- result -------------------------------------------------------------------------------

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
        from stepsal_lens.metrics import normalize_rows

        return normalize_rows(self.head_mean() if head is None else self.maps[:, head])

    def replay(self, model: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(model, *args, target=..., **target_kwargs, **kwargs)`` the way this
        result was made: the same target and target arguments, inside the same StepFlow
        settings (if it was made with StepFlow on). The explorer's token drill-down uses
        it, so the tokens shown pool exactly to the map shown."""
        from contextlib import nullcontext

        from stepsal_lens.results.config import StepFlowConfig
        from stepsal_lens.stepflow import stepflow

        target = self.meta.get("target", "lm")
        if target not in _TARGETS:
            raise StepSalError(f"this result was made with target {target!r}, which is not "
                               f"registered; register it with register_target({target!r}, fn) "
                               f"to replay it")
        target_kwargs = {k[len("target_"):]: v for k, v in self.meta.items()
                         if k.startswith("target_")}
        flow = self.meta.get("stepflow")
        ctx = stepflow(model, StepFlowConfig.from_dict(flow)) if flow else nullcontext()
        with ctx:
            return fn(model, *args, target=target, **target_kwargs, **kwargs)

    def metrics(self, k: int = 3):
        """Per-layer failure-mode metrics (:func:`stepsal_lens.metrics.layer_metrics`)."""
        from stepsal_lens.metrics import layer_metrics

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


# ---- hooks --------------------------------------------------------------------------------

@contextmanager
def _activation_grads_only(model):
    """Turn off weight gradients (saliency needs only activation gradients) and restore
    the caller's flags afterwards, also on error."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _saliency_hooks(layers: Sequence[int], step_of_token: Tensor, n_steps: int,
                    out: dict[int, Tensor], bar):
    """Forward hooks keep each pattern; backward hooks pool ``|A * dA|`` and drop it."""
    patterns: dict[int, Tensor] = {}
    fwd, bwd = [], []
    for layer in layers:
        name = f"blocks.{layer}.attn.hook_pattern"

        def keep(pattern, hook, layer=layer):
            patterns[layer] = pattern.detach()

        def pool_grad(grad, hook, layer=layer):
            out[layer] = pool_saliency(patterns.pop(layer), grad, step_of_token, n_steps)
            bar.update(1)

        fwd.append((name, keep))
        bwd.append((name, pool_grad))
    return fwd, bwd


@contextmanager
def _checkpointed(model, enabled: bool):
    """Activation checkpointing of the wrapped Hugging Face layers: the forward keeps only
    each layer's input and backward recomputes one layer at a time, so one layer's
    attention graph is alive at once. The hooks fire again on the recompute, which is
    where the pattern with a gradient path is kept and pooled."""
    if not enabled:
        yield
        return
    hf = model.original_model
    # transformers renamed gradient_checkpointing_* to activation_checkpointing_* in 5.x
    was_training = model.training
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        disable = hf.activation_checkpointing_disable
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = hf.gradient_checkpointing_disable
    model.train()  # HF layers checkpoint only in training mode; these models have no dropout
    try:
        yield
    finally:
        disable()
        model.train(was_training)


def _require_grad(x, hook):
    return x.detach().requires_grad_(True)


def _refuse_float16(model) -> None:
    """float16 has too little exponent range for attention gradients: on a trained model
    most rows of ``dL/dA`` underflow to exactly 0, so the maps (and every share metric)
    would silently read 0. bfloat16 keeps float32's range at the same memory."""
    if any(p.dtype == torch.float16 for p in model.parameters()):
        raise StepSalError("Step-Saliency does not run on a float16 model: float16 underflows "
                           "the attention gradients (whole rows of the maps come out exactly "
                           "0); load it with load_lrm(..., dtype='bfloat16') (same memory, "
                           "float32's range) or dtype='float32'")


def _backward(loss: Any, target: Any) -> None:
    """``loss.backward()`` after checking that the target is finite."""
    target = target if isinstance(target, str) else getattr(target, "__name__", "custom")
    if not isinstance(loss, Tensor):
        raise StepSalError(f"the saliency target {target!r} returned a {type(loss).__name__}; "
                           f"it must return a scalar tensor computed from the logits")
    if loss.dim() != 0:
        raise StepSalError(f"the saliency target must be a scalar; {target!r} gave shape "
                           f"{tuple(loss.shape)}")
    if not bool(torch.isfinite(loss)):
        raise StepSalError(f"the saliency target {target!r} is {loss.item()}: the model gives "
                           f"non-finite logits on this trace; check its weights for NaN/inf "
                           f"(torch.isfinite on each parameter) and load it in float32")
    if not loss.requires_grad:
        raise StepSalError(f"the saliency target {target!r} does not depend on the logits (no "
                           f"gradient); compute it from the logits it is given")
    loss.backward()


def _refuse_non_finite(maps: Tensor, layers: Sequence[int], what: str) -> None:
    """Raise when any layer's saliency is NaN or infinite (never report it as a number)."""
    bad = [l for l, m in zip(layers, maps) if not bool(torch.isfinite(m).all())]
    if bad:
        raise StepSalError(f"the {what} of layers {bad} are not finite (NaN/inf attention "
                           f"gradients, though the target was finite): the model's weights "
                           f"or activations hold non-finite values; check its weights for "
                           f"NaN/inf and load it in float32")


def token_saliency(model, trace: Trace, layer: int, *, target: str | Target = "lm",
                   **target_kwargs: Any) -> tuple[Float[Tensor, "head query key"],
                                                  Float[Tensor, "head query key"]]:
    """Token-level saliency ``|A * dL/dA|`` and attention ``A`` of one layer, unpooled.

    What :func:`step_saliency` pools into its maps, for drilling from a step pair down to
    tokens; ``[n_heads, n_tokens, n_tokens]`` float32 each, so keep traces short.
    """
    fn = get_target(target)
    _check_target_kwargs(fn, target, target_kwargs)
    if not 0 <= layer < model.cfg.n_layers:
        raise StepSalError(f"layer {layer} is not valid for a model with {model.cfg.n_layers} "
                           f"layers")
    _refuse_float16(model)
    tokens = trace.token_ids[None].to(next(model.parameters()).device)
    kept: dict[str, Tensor] = {}
    name = f"blocks.{layer}.attn.hook_pattern"

    def keep(pattern, hook):
        kept["pattern"] = pattern.detach()

    def saliency(grad, hook):
        kept["saliency"] = (kept["pattern"].float() * grad.float()).abs()[0].cpu()

    with _activation_grads_only(model), torch.enable_grad():
        with model.hooks(fwd_hooks=[(name, keep), ("hook_embed", _require_grad)],
                         bwd_hooks=[(name, saliency)]):
            _backward(fn(model(tokens).float(), trace, **target_kwargs), target)
    _refuse_non_finite(kept["saliency"][None], [layer], "token saliencies")
    return kept["saliency"], kept["pattern"][0].float().cpu()


#: Step-Saliency engines: ``fused`` (attention x gradient pooled inside a fused attention
#: backward, :mod:`stepsal_lens.fused`) and ``hook_pattern`` (hooks on the bridge's eager
#: ``hook_pattern``: the readable reference, and the one that sees users' hooks).
ENGINES = ("auto", "fused", "hook_pattern")


def _choose_engine(model, engine: str) -> tuple[str, str]:
    """The engine to run and why."""
    from stepsal_lens.fused import attention_hooks_in_use

    if engine not in ENGINES:
        raise StepSalError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    if engine == "hook_pattern":
        return engine, "requested"
    hooked = attention_hooks_in_use(model)
    from stepsal_lens.knockout import has_sinks

    if engine == "auto" and not hooked and has_sinks(model) \
            and next(model.parameters()).dtype != torch.float32:
        # measured on a gpt-oss checkpoint with harmony's long prompt: the fused sink path
        # in bfloat16 is off by 13.6% of the map maximum, the hook_pattern engine by 1.6%
        return "hook_pattern", "attention sinks in a low-precision model"
    if not hooked:
        return "fused", "requested" if engine == "fused" else "default"
    if engine == "fused":
        raise StepSalError(
            f"the fused engine does not run the bridge's hooks, and hooks are attached to "
            f"{hooked[:4]}{' ...' if len(hooked) > 4 else ''}; use engine='hook_pattern' "
            f"(or engine='auto'), or remove the hooks (model.reset_hooks())")
    return "hook_pattern", f"hooks attached to {hooked[:4]}{' ...' if len(hooked) > 4 else ''}"


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """Sorted distinct layer indices (None: all), refused when out of range or empty."""
    layers = list(range(n_layers)) if layers is None else sorted({int(l) for l in layers})
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise StepSalError(f"layers {bad or layers} are not valid for a model with {n_layers} "
                           f"layers; pass indices in [0, {n_layers})")
    return layers


def trace_tokens(model, trace: Trace) -> Tensor:
    """``[1, n_tokens]`` ids on the model's device, refused when the trace was built with
    another tokenizer (ids beyond the model's vocabulary)."""
    if int(trace.token_ids.max()) >= model.cfg.d_vocab:
        raise StepSalError("the trace has token ids beyond the model's vocabulary; build the "
                           "Trace with this model (Trace.from_text(text, model))")
    return trace.token_ids[None].to(next(model.parameters()).device)


def _hook_pattern_maps(model, trace: Trace, fn: Target, layers: list[int], low_memory: bool,
                       bar, target_kwargs: dict[str, Any], target: Any = None) -> list[Tensor]:
    device = next(model.parameters()).device
    tokens = trace.token_ids[None].to(device)
    out: dict[int, Tensor] = {}
    with _activation_grads_only(model), torch.enable_grad():
        fwd, bwd = _saliency_hooks(layers, trace.step_of_token.to(device), trace.n_steps,
                                   out, bar)
        fwd.append(("hook_embed", _require_grad))
        with _checkpointed(model, low_memory), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            logits = model(tokens)
            _backward(fn(logits.float(), trace, **target_kwargs), target)
    return [out[l] for l in layers]


def _fused_maps(model, trace: Trace, target: str | Target, layers: list[int],
                low_memory: bool, chunk_size: int | None, bar,
                target_kwargs: dict[str, Any]) -> list[Tensor]:
    from stepsal_lens import fused

    fn, lean = get_target(target), get_lean_target(target)
    hf = model.original_model
    tokens = trace.token_ids[None].to(next(model.parameters()).device)
    spans = [s.token_span for s in trace.steps]
    maps: dict[int, Tensor] = {}

    def done(layer: int) -> None:
        bar.update(1)

    with _activation_grads_only(model), torch.enable_grad(), _checkpointed(model, low_memory):
        with fused.fused_attention(model, spans, layers, chunk=chunk_size,
                                   on_layer_done=done) as state:
            hidden = fused.final_hidden(model, tokens)
            unembed = hf.get_output_embeddings()
            if lean is not None:
                loss = lean(hidden, unembed, trace, **target_kwargs)
            else:
                loss = fn(unembed(hidden).float(), trace, **target_kwargs)
            del hidden
            _backward(loss, target)
        for layer in layers:
            sums = state.plans[layer].sums
            if sums is None:  # the target does not depend on this layer's attention
                sums = torch.zeros(model.cfg.n_heads, trace.n_steps, trace.n_steps)
            maps[layer] = fused.step_means(sums, state.starts, state.ends).cpu()
    return [maps[l] for l in layers]


def step_saliency(model, trace: Trace, *, target: str | Target = "lm",
                  layers: Sequence[int] | None = None, engine: str = "auto",
                  low_memory: bool = False, chunk_size: int | None = None,
                  progress: bool = False, **target_kwargs: Any) -> StepSaliency:
    """Step-Saliency of a trace: ``|A * dL/dA|`` of every attention pattern, pooled per
    step pair.

    Parameters
    ----------
    model
        A ``TransformerBridge`` from :func:`stepsal_lens.load_lrm`.
    trace
        The :class:`~stepsal_lens.Trace` (built with this model's tokenizer).
    target
        ``"lm"`` (mean next-token loss over the whole trace, as Hugging Face computes
        it for ``labels=input_ids``), ``"summary"`` (the same restricted to summary
        tokens), ``"answer"`` (log-prob of the answer's tokens; ``answer=`` or the last
        ``\\boxed{}``), ``"logit"`` (``position=``, ``token=``; the model's own logit, as
        Hugging Face computes it), or a registered/callable target.
    layers
        Layers to measure (default: all).
    engine
        ``"fused"``: the attention x gradient product is formed and pooled inside a
        fused attention backward, one block of query rows at a time (time and memory
        close to one plain forward+backward; :mod:`stepsal_lens.fused`).
        ``"hook_pattern"``: hooks on the bridge's ``hook_pattern`` (the readable
        reference; it runs the users' hooks, e.g. StepFlow's). ``"auto"`` (default):
        fused, unless hooks are attached to the model. ``meta["engine"]`` records which
        ran and ``meta["engine_reason"]`` why.
    low_memory
        Activation checkpointing per layer: backward recomputes one layer at a time, so
        one layer's activations are alive. Same maps; about one extra forward pass of
        time. Runs the model in training mode for the call (these models have no dropout).
    chunk_size
        Fused engine: query rows per block (default: from a memory budget, 48 MiB of
        blocks on CPU, a quarter of free memory up to 4 GiB on CUDA).
    progress
        Show a tqdm bar over layers.
    **target_kwargs
        Passed to the target (``answer``, ``position``, ``token``).

    Returns
    -------
    StepSaliency
        ``maps`` ``[len(layers), n_heads, n_steps, n_steps]`` float32.

    Raises
    ------
    StepSalError
        On a float16 model (its attention gradients underflow to 0: load in bfloat16 or
        float32), when the target is NaN/inf, or when any map is NaN/inf; a non-finite
        result is never returned.
    """
    fn = get_target(target)
    _check_target_kwargs(fn, target, target_kwargs)
    n_layers = model.cfg.n_layers
    layers = check_layers(layers, n_layers)
    _refuse_float16(model)
    trace_tokens(model, trace)
    if chunk_size is not None and chunk_size < 1:
        raise StepSalError(f"chunk_size must be a positive number of query rows; got {chunk_size}")
    used, reason = _choose_engine(model, engine)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(layers), desc=f"step saliency ({used})", unit="layer",
               disable=not progress)
    try:
        if used == "fused":
            maps = _fused_maps(model, trace, target, layers, low_memory, chunk_size, bar,
                               target_kwargs)
        else:
            maps = _hook_pattern_maps(model, trace, fn, layers, low_memory, bar, target_kwargs,
                                      target)
    finally:
        bar.close()
    maps = torch.stack(maps).cpu()
    _refuse_non_finite(maps, layers, "saliency maps")
    from stepsal_lens import __version__
    from stepsal_lens.stepflow import active_stepflow

    flow = active_stepflow(model)
    meta = {
        "model": model_name(model),
        "stepsal_lens": __version__,
        "stepflow": None if flow is None else flow.config.to_dict(),
        "format": trace.format.name,
        "target": target if isinstance(target, str) else getattr(target, "__name__", "custom"),
        "n_layers": n_layers,
        "n_heads": int(maps.shape[1]),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "truncated": trace.truncated,
        "engine": used,
        "engine_reason": reason,
        "low_memory": low_memory,
        "text": trace.text,
        **{f"target_{k}": v for k, v in target_kwargs.items()},
    }
    return StepSaliency(maps, layers, list(trace.steps), trace.token_ids.clone(), meta)
