"""Saliency targets: the scalar ``L`` whose gradient Step-Saliency follows.

A target maps float32 logits ``[1, token, vocab]`` and the :class:`~stepsal_lens.Trace`
to a scalar. Built in: ``lm`` (next-token loss over the whole trace), ``summary`` (loss
over the summary's tokens), ``answer`` (log-probability of the final answer's tokens) and
``logit`` (one logit, at a position). Each built-in also has a *lean* form computed from
the final hidden states through the unembedding in chunks of positions, so the fused
engine never holds all ``[token, vocab]`` logits; :func:`register_target` adds your own
(``lean=`` optionally).

Examples
--------
>>> import torch
>>> from stepsal_lens.lens.targets import get_target, list_targets
>>> list_targets()
['answer', 'lm', 'logit', 'summary']
>>> get_target("lm").__name__
'_lm_target'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from stepsal_lens._registry import Registry
from stepsal_lens.errors import StepSalError
from stepsal_lens.segments.answers import find_answer
from stepsal_lens.segments.trace import Trace

__all__ = [
    "LEAN_TARGETS",
    "Target",
    "TargetFn",
    "answer_token_positions",
    "get_lean_target",
    "get_target",
    "list_targets",
    "logit_position",
    "register_target",
    "resolve_target",
]

#: A target function maps float32 logits ``[1, token, vocab]`` and the trace to a scalar.
TargetFn = Callable[..., Tensor]
#: A lean form, ``lean(hidden, unembed, trace, **kwargs) -> scalar``: from the final hidden
#: states ``[1, token, d_model]`` and the unembedding, so the fused engine never holds all
#: ``[token, vocab]`` logits (see :mod:`stepsal_lens.lens.fused`).
LeanFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Target:
    """A saliency target, resolved: its name, function, lean form and keyword arguments.

    Made once per call by :func:`resolve_target` (keywords checked against the function)
    and passed whole to the engine; :attr:`name` is what results record.

    Examples
    --------
    >>> t = resolve_target("logit", {"position": 3})
    >>> t.name, t.kwargs, t.lean is not None
    ('logit', {'position': 3}, True)
    """

    name: str
    fn: TargetFn
    lean: LeanFn | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def loss(self, logits: Tensor, trace: Trace) -> Any:
        """The scalar from float32 logits ``[1, token, vocab]`` (what the function returns,
        checked by the caller: a user's target may return anything)."""
        return self.fn(logits, trace, **self.kwargs)

    def lean_loss(self, hidden: Tensor, unembed: Callable[[Tensor], Tensor],
                  trace: Trace) -> Any:
        """The same scalar from the final hidden states (only when :attr:`lean` is set)."""
        return self.lean(hidden, unembed, trace, **self.kwargs)


#: The one registry: name -> :class:`Target` (no keyword arguments).
_TARGETS: Registry[Target] = Registry("saliency target", "register_target(name, fn)")


def register_target(name: str, fn: TargetFn, *, overwrite: bool = False,
                    lean: LeanFn | None = None) -> None:
    """Add a saliency target ``fn(logits, trace, **kwargs) -> scalar``.

    ``lean(hidden, unembed, trace, **kwargs)``, optional, computes the same scalar from
    the final hidden states and the unembedding (e.g. in chunks of positions); the fused
    engine uses it instead of materialising all logits.
    """
    _TARGETS.register(name, Target(name, fn, lean), overwrite=overwrite)


def get_lean_target(name: str | TargetFn) -> LeanFn | None:
    """The memory-lean form of a registered target (None if it has none)."""
    return _TARGETS.get(name).lean if isinstance(name, str) and name in _TARGETS else None


def list_targets() -> list[str]:
    """Names of the registered saliency targets."""
    return _TARGETS.names()


def get_target(name: str | TargetFn) -> TargetFn:
    """A target function by name (a callable passes through)."""
    return name if callable(name) else _TARGETS.get(name).fn


def resolve_target(target: str | TargetFn | Target, kwargs: Mapping[str, Any] | None = None
                   ) -> Target:
    """The :class:`Target` for a name (registered), a function (no lean form) or a
    :class:`Target` (its keywords updated), with ``kwargs`` checked against the function
    before any forward pass."""
    kwargs = dict(kwargs or {})
    if isinstance(target, Target):
        resolved = replace(target, kwargs={**target.kwargs, **kwargs})
    elif callable(target):
        resolved = Target(getattr(target, "__name__", "custom"), target, None, kwargs)
    else:
        resolved = replace(_TARGETS.get(target), kwargs=kwargs)
    _check_kwargs(resolved)
    return resolved


def _check_kwargs(target: Target) -> None:
    """Refuse keywords the target does not take, before the forward pass."""
    try:
        sig = inspect.signature(target.fn)
    except (TypeError, ValueError):  # a builtin without a signature: cannot tell
        return
    try:
        sig.bind(None, None, **target.kwargs)
    except TypeError:
        params = [p.name for p in list(sig.parameters.values())[2:]
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise StepSalError(f"target {target.name!r} does not take {sorted(target.kwargs)}; its "
                           f"options are {params or 'none'} (targets: {list_targets()})"
                           ) from None


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

    ``answer=None`` takes the summary's final answer as :func:`stepsal_lens.segments.answers.find_answer`
    reads it (the last ``\\boxed{...}`` with balanced braces, so all of ``\\frac{1}{2}``,
    else "the answer is ..."), located by its character span.
    """
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


# ---- memory-lean forms ----------------------------------------------------------------------


def chunked_cross_entropy(hidden: Float[Tensor, "pos d_model"], unembed: Callable[[Tensor], Tensor],
                          labels: Int[Tensor, " pos"], *, chunk: int | None = None,
                          budget: int = 512 * 2**20) -> Float[Tensor, ""]:
    """Mean cross-entropy of ``unembed(hidden)`` against ``labels``, never holding more
    than ``chunk`` positions of float32 logits: each chunk is recomputed in backward
    (activation checkpointing), so the ``[pos, vocab]`` logits never exist at once.

    Parameters
    ----------
    hidden
        Final hidden states of the predicting positions.
    unembed
        Maps hidden rows to logits (the model's ``lm_head``).
    labels
        Next-token ids, one per row.
    chunk
        Rows per chunk; default from ``budget`` (about four float32 copies of a chunk's
        logits are alive at once).

    Examples
    --------
    >>> w = torch.randn(10, 4)
    >>> h, y = torch.randn(6, 4), torch.tensor([1, 2, 3, 4, 5, 6])
    >>> lean = chunked_cross_entropy(h, lambda x: x @ w.T, y, chunk=4)
    >>> bool(torch.isclose(lean, F.cross_entropy(h @ w.T, y)))
    True
    """
    n = hidden.shape[0]
    if n == 0:
        raise StepSalError("no positions to compute the loss on")
    if chunk is None:
        probe = unembed(hidden[:1])
        chunk = max(1, budget // (4 * 4 * probe.shape[-1]))

    def piece(h: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(unembed(h).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, n, chunk):
        h = hidden[a:a + chunk]
        y = labels[a:a + chunk]
        total = total + (checkpoint(piece, h, y, use_reentrant=False) if h.requires_grad
                         else piece(h, y))
    return total / n


def lean_lm(hidden: Tensor, unembed: Callable[[Tensor], Tensor], trace, *,
            chunk: int | None = None) -> Tensor:
    """Target ``lm`` from final hidden states: mean next-token loss over positions 1..T-1."""
    ids = trace.token_ids.to(hidden.device)
    return chunked_cross_entropy(hidden[0, :-1], unembed, ids[1:], chunk=chunk)


def lean_summary(hidden: Tensor, unembed: Callable[[Tensor], Tensor], trace, *,
                 chunk: int | None = None) -> Tensor:
    """Target ``summary`` from final hidden states."""
    pos = _summary_positions(trace).to(hidden.device)
    ids = trace.token_ids.to(hidden.device)
    return chunked_cross_entropy(hidden[0, pos - 1], unembed, ids[pos], chunk=chunk)


def lean_answer(hidden: Tensor, unembed: Callable[[Tensor], Tensor], trace,
                answer: str | None = None) -> Tensor:
    """Target ``answer`` from final hidden states (logits at the answer's tokens only)."""
    pos = answer_token_positions(trace, answer).to(hidden.device)
    ids = trace.token_ids.to(hidden.device)
    logits = unembed(hidden[0, pos - 1]).float()
    return logits.log_softmax(-1).gather(-1, ids[pos, None]).sum()


def lean_logit(hidden: Tensor, unembed: Callable[[Tensor], Tensor], trace,
               position: int = -2, token: int | str | None = None) -> Tensor:
    """Target ``logit`` from final hidden states (one row of logits)."""
    pos, token = logit_position(trace, hidden.shape[1], position, token)
    return unembed(hidden[0, pos:pos + 1]).float()[0, token]


#: Lean forms of the built-in targets: ``fn(hidden, unembed, trace, **kwargs)``.
LEAN_TARGETS: dict[str, Callable[..., Tensor]] = {
    "lm": lean_lm, "summary": lean_summary, "answer": lean_answer, "logit": lean_logit,
}


for _name, _fn in (("lm", _lm_target), ("summary", _summary_target), ("answer", _answer_target),
                   ("logit", _logit_target)):
    register_target(_name, _fn, lean=LEAN_TARGETS[_name])
