"""Step knockout: suppress attention between chosen steps by masking attention logits.

Suppressing key tokens ``K`` for a query is masking their attention logits with ``-inf``:
the softmax renormalises over the keys that stay visible (and, for GPT-OSS, over the
attention sink, whose logit stays). On the post-softmax pattern
(``blocks.{l}.attn.hook_pattern``) this is exact::

    A'[k] = 0                                   for k in K
    A'[k] = A[k] / (sum_{k' not in K} A[k'] + sink)   otherwise

where ``sink = 1 - sum_k A[k]`` is the sink's mass (0 without sinks), i.e. the divisor is
``1 - (suppressed mass)`` of the row including the sink. Keys a query cannot see (causal
mask, sliding window, padding) already have ``A = 0``, so windows and padding are
respected without being known here. **A row whose every visible key is suppressed** (and
that has no sink) has nothing to renormalise over; it is **left unchanged** and counted in
:attr:`Knockout.rows_left_alone` (the default query range, every position after the key
step, never produces one: a query always sees itself).

The pure cores are :func:`~stepsal_lens.core.knockout.suppression_mask` (which (query, key)
pairs are cut, from token positions) and
:func:`~stepsal_lens.core.knockout.suppress_attention` (the renormalisation). :class:`Knockout` is the
thin hook wrapper: a forward pre-hook on the model follows every pass (a teacher-forced
batch, a KV-cached generation step, left-padded prompts), so each row's query and key
positions are known in the row's own token numbering, and a ``hook_pattern`` hook applies
the edit. It composes with :func:`~stepsal_lens.lens.stepflow` and with
:func:`~stepsal_lens.step_saliency`; hooks are always removed, also on errors.

Examples
--------
>>> import tempfile, torch
>>> from stepsal_lens import Trace, load_lrm, step_knockout
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp()), format="think-tags")
>>> trace = Trace.from_segments("Start with 7. Add 5. What is the result?",
...     "We start with the number 7. Adding 5 to 7 gives 12.", "The result is 12.", model)
>>> ids = trace.token_ids[None]
>>> with step_knockout(model, trace, keys=[1]) as ko:   # nobody after step 1 may read it
...     cut = model(ids)
>>> plain = model(ids)
>>> end = trace.steps[1].token_span[1]
>>> bool(torch.equal(cut[0, :end], plain[0, :end])), bool((cut[0, end:] != plain[0, end:]).any())
(True, True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from stepsal_lens.core.knockout import Span, Suppression, suppress_attention, suppression_mask
from stepsal_lens.errors import StepSalError
from stepsal_lens.typing import Pattern
from stepsal_lens.segments.trace import check_trace

__all__ = ["Knockout", "has_sinks", "step_knockout"]


# ---- pure cores ----------------------------------------------------------------------------


# ---- the hook wrapper ----------------------------------------------------------------------

def has_sinks(model: Any) -> bool:
    """Whether the model's attention has sink logits (GPT-OSS)."""
    hf = getattr(model, "original_model", None)
    if hf is None:
        return False
    return any(getattr(m, "sinks", None) is not None for m in hf.modules())


class _Positions:
    """Follows the model's forward passes: each row's token position of every column."""

    def __init__(self, model: Any):
        self.model = model
        self.pos: Tensor | None = None  # [batch, total], -1 at padding

    def before_forward(self, module, args, kwargs):
        tokens = args[0] if args else kwargs.get("input")
        if isinstance(tokens, (str, list)):
            tokens = self.model.to_tokens(tokens)
        if not isinstance(tokens, Tensor):
            self.pos = None
            return
        tokens = tokens[None] if tokens.dim() == 1 else tokens
        mask = kwargs.get("attention_mask")
        fresh = kwargs.get("past_key_values") is None
        if mask is not None and mask.dim() == 2:
            m = mask.to(torch.long)
            self.pos = torch.where(m > 0, m.cumsum(-1) - 1, -1)
        elif fresh or self.pos is None:
            b, n = tokens.shape
            self.pos = torch.arange(n).expand(b, n)
        else:  # a cached pass without a mask: new positions continue each row
            n = tokens.shape[1]
            last = self.pos.max(-1, keepdim=True).values
            self.pos = torch.cat([self.pos, last + 1 + torch.arange(n)], dim=1)


class Knockout:
    """Live suppression hooks (made by :func:`step_knockout`, or directly for per-row cuts).

    Parameters
    ----------
    model
        A ``TransformerBridge`` from :func:`~stepsal_lens.load_lrm`.
    cuts
        :class:`Suppression` s applied to every row of every batch.
    rows
        Alternatively one list of cuts per batch row (e.g. a different key step per
        row); the model must then be called with exactly ``len(rows)`` rows.

    Attributes
    ----------
    rows_left_alone : int
        Attention rows left unchanged because every key they see was suppressed.
    """

    def __init__(self, model: Any, cuts: Sequence[Suppression] = (), *,
                 rows: Sequence[Sequence[Suppression]] | None = None):
        if rows is not None and len(cuts):
            raise StepSalError("pass cuts (the same for every row) or rows=[...] (one list per "
                               "row), not both")
        self.model = model
        self.cuts = list(cuts)
        self.rows = None if rows is None else [list(r) for r in rows]
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        for s in self.cuts + [s for r in self.rows or [] for s in r]:
            bad_l = [l for l in s.layers or () if not 0 <= l < n_layers]
            bad_h = [h for h in s.heads or () if not 0 <= h < n_heads]
            if bad_l or bad_h:
                raise StepSalError(f"{'layers ' + str(bad_l) if bad_l else 'heads ' + str(bad_h)}"
                                   f" out of range: the model has layers 0..{n_layers - 1} and "
                                   f"heads 0..{n_heads - 1}")
        self.sinks = has_sinks(model)
        self.rows_left_alone = 0
        self._positions = _Positions(model)

    def _layers(self) -> list[int]:
        every = self.cuts + [s for r in self.rows or [] for s in r]
        if any(s.layers is None for s in every):
            return list(range(self.model.cfg.n_layers))
        return sorted({l for s in every for l in s.layers})

    def hooks(self) -> list[tuple[str, Any]]:
        """``(hook name, function)`` pairs on ``hook_pattern``."""
        return [(f"blocks.{l}.attn.hook_pattern", self._hook) for l in self._layers()]

    def _hook(self, pattern: Pattern, hook) -> Pattern:
        pos = self._positions.pos
        b, n_heads, n_q, n_k = pattern.shape
        if pos is None or pos.shape[0] != b or pos.shape[1] < max(n_q, n_k):
            raise StepSalError(
                f"the knockout hook saw a pattern {tuple(pattern.shape)} it cannot place "
                f"(followed {None if pos is None else tuple(pos.shape)} positions); call the "
                f"model with token ids (model(tokens) / model.generate(...)) inside the block")
        rows = self.rows if self.rows is not None else [self.cuts] * b
        if len(rows) != b:
            raise StepSalError(f"the knockout has cuts for {len(rows)} rows but the model ran "
                               f"a batch of {b}; call it with {len(rows)} rows")
        pos = pos.to(pattern.device)
        # queries are the last n_q positions, keys the last n_k (a sliding-window cache
        # may hold fewer than all)
        mask = suppression_mask(pos[:, -n_q:], pos[:, -n_k:], rows, n_heads,
                                int(hook.name.split(".")[1]))
        if mask is None:
            return pattern
        out, left = suppress_attention(pattern, mask, sinks=self.sinks)
        self.rows_left_alone += int(left)
        return out

    @contextmanager
    def active(self) -> Iterator[Knockout]:
        """Hooks on for the block; always removed, even on errors."""
        with ExitStack() as stack:
            handle = self.model.register_forward_pre_hook(self._positions.before_forward,
                                                          with_kwargs=True)
            stack.callback(handle.remove)
            stack.enter_context(self.model.hooks(fwd_hooks=self.hooks()))
            yield self

    def __repr__(self) -> str:
        what = f"{len(self.cuts)} cuts" if self.rows is None else f"{len(self.rows)} rows of cuts"
        return f"Knockout({what}, sinks={self.sinks})"


def _span(x: Any, trace: Any, what: str) -> Span:
    if isinstance(x, (tuple, list)) and len(x) == 2:
        if x[1] is None and what == "query step":
            return int(x[0]), None
        return int(x[0]), int(x[1])
    if trace is None:
        raise StepSalError(f"{what} {x!r} is a step index, which needs trace=...; or pass token "
                           f"spans (start, end)")
    i = int(x)
    if not 0 <= i < trace.n_steps:
        raise StepSalError(f"{what} {i} is not a step of the trace (0..{trace.n_steps - 1})")
    return tuple(trace.steps[i].token_span)


def _ints(x: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if x is None:
        return None
    return (int(x),) if isinstance(x, int) else tuple(int(v) for v in x)


@contextmanager
def step_knockout(model: Any, trace: Any = None, keys: Any = (), *, queries: Any = None,
             layers: int | Sequence[int] | None = None,
             heads: int | Sequence[int] | None = None) -> Iterator[Knockout]:
    """Suppress attention to chosen key steps for every forward pass inside the block.

    Works with teacher-forced passes, :func:`~stepsal_lens.step_saliency` and KV-cached
    or uncached ``model.generate`` (batched prompts included; positions are counted in
    each row's own tokens, padding excluded). Hooks are removed when the block ends, also
    on an exception.

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm`.
    trace
        The :class:`~stepsal_lens.Trace` whose step indices ``keys``/``queries`` name
        (not needed when they are token spans).
    keys
        Key steps to suppress: step indices, ``(start, end)`` token spans, or a mix.
    queries
        Query steps (indices or spans; ``(start, None)`` runs to the end, generated tokens
        included) that lose access to every key step. Default ``None``: for each key
        step, every token after it (generated tokens included).
    layers, heads
        Where to cut (default: every layer, every head).

    Yields
    ------
    Knockout
        ``ko.rows_left_alone`` counts rows left unchanged (everything they see cut).

    Examples
    --------
    >>> import tempfile
    >>> from stepsal_lens import load_lrm
    >>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
    >>> model = load_lrm(make_random_checkpoint("llama", tempfile.mkdtemp()), format="think-tags")
    >>> ids = model.to_tokens("one two three four five six")
    >>> with step_knockout(model, keys=[(1, 3)], layers=[0], heads=[1]) as ko:
    ...     _ = model(ids)
    >>> ko
    Knockout(1 cuts, sinks=False)
    """
    if trace is not None:
        check_trace(trace, "trace")
    key_list = [keys] if isinstance(keys, int) else list(keys)
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(v, int) for v in keys) \
            and trace is None:
        key_list = [keys]
    key_spans = [_span(k, trace, "key step") for k in key_list]
    layers_t, heads_t = _ints(layers), _ints(heads)
    if queries is None:
        cuts = [Suppression(k, None, layers_t, heads_t) for k in key_spans]
    else:
        q_list = [queries] if isinstance(queries, int) else list(queries)
        q_spans = [_span(q, trace, "query step") for q in q_list]
        cuts = [Suppression(k, q, layers_t, heads_t) for k in key_spans for q in q_spans]
    ko = Knockout(model, cuts)
    with ko.active():
        yield ko
