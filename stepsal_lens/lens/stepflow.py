"""StepFlow: Odds-Equal Bridge (OEB) and Step Momentum Injection (SMI) at generation time.

Two test-time interventions (docs/stepflow.md, docs/concepts.md), no retraining:

* **OEB** on ``blocks.{l}.attn.hook_pattern`` of shallow layers. For a query in the
  thinking segment the *same* group S is the visible thinking tokens and the *bridge*
  group B is the question; for a summary query S is the visible summary and B the
  thinking segment. With masses measured on the row renormalised over its keys, if
  ``p_B < tau_B = min(sqrt(|B| / (|B| + |S|)), tau_max)`` then B is rescaled to
  ``tau_B``, S to ``tau_S = 1 - p_O - tau_B`` and everything else is left alone (the KL
  projection the paper writes as the logit shift ``z_k + log(tau_g / p_g)``). A row that
  sums to less than 1 (attention sinks) keeps its sink mass.
* **SMI** at the first token of each new thinking step, in one of two variants
  (:data:`~stepsal_lens.results.config.SMI_VARIANTS`). ``"resid_post"`` (default; docs/concepts.md): add ``alpha``
  times the mean ``blocks.{l}.hook_resid_post`` over the last ``window`` non-space tokens
  of the previous step, in every SMI layer. ``"paper_code"`` (what the paper's code
  does): add ``alpha`` times the mean of the attention *values*
  (``blocks.{l}.attn.hook_v``, GQA heads expanded) over the last ``window`` tokens of the
  previous step to each head's attention output (``blocks.{l}.attn.hook_z``), in the
  first SMI layer only.

The pure cores are :func:`~stepsal_lens.core.interventions.odds_equal_bridge` and
:func:`~stepsal_lens.core.interventions.step_momentum`; the hooks here are thin wrappers
that read per-position labels from a :class:`~stepsal_lens.segments.tracker.SegmentTracker`,
which follows every forward pass of the model (a fresh pass, a KV-cached generation step,
a batch of left-padded prompts) through a forward pre-hook.

Examples
--------
>>> import tempfile
>>> from stepsal_lens import load_lrm, stepflow
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp(), n_layers=4),
...                  format="think-tags")
>>> tokens = model.to_tokens("Start with 7. Add 5.\\n<think>\\nWe start with the number 7. "
...                          "Adding 5 to 7 gives 12.\\n</think>\\n\\nThe result is 12.")
>>> with stepflow(model, tau_max=0.15, alpha=0.06) as sf:
...     logits = model(tokens)
>>> sorted(sf.stats.to_dict())
['oeb', 'smi']
>>> sf.stats.to_dict()["smi"]["injections"]  # one new thinking step, one SMI layer
1
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import fields, replace
from typing import Any

import einops
import torch
from torch import Tensor

from stepsal_lens.core.interventions import _groups, _Groups, _oeb, step_momentum
from stepsal_lens.errors import StepSalError
from stepsal_lens.segments.association import info_of
from stepsal_lens._checks import describe_value
from stepsal_lens.lens.models import require_hooks
from stepsal_lens.results.config import StepFlowConfig
from stepsal_lens.results.stats import StepFlowStats
from stepsal_lens.segments.tracker import SegmentTracker, _T
from stepsal_lens.typing import Pattern

__all__ = ["StepFlow", "active_stepflow", "stepflow"]

#: OEB's group of a key, indexed by (query segment + 1, key segment + 1): 1 = same,
#: 2 = bridge, 0 = neither. A thinking query's same group is thinking and its bridge the
#: question; a summary query's are summary and thinking; other queries are left alone.
_GROUP_OF = torch.tensor([[0, 0, 0, 0],   # query in no segment (template, padding)
                          [0, 0, 0, 0],   # question
                          [0, 2, 1, 0],   # thinking
                          [0, 0, 2, 1]],  # summary
                         dtype=torch.uint8)


# ---- hooks ---------------------------------------------------------------------------------

def _layer_of(name: str) -> int:
    return int(name.split(".")[1])


class StepFlow:
    """The live intervention: hooks, tracker and stats (made by :func:`stepflow`).

    ``config`` is the resolved :class:`~stepsal_lens.StepFlowConfig` (explicit layers);
    ``engine`` is ``"hook_pattern"`` (hooks on the bridge's hook points) or ``"fused"``
    (:mod:`stepsal_lens.lens.fused_stepflow`), ``engine_reason`` why it was chosen.
    """

    def __init__(self, model: Any, config: StepFlowConfig | None = None,
                 engine: str = "hook_pattern", engine_reason: str = "requested"):
        if engine not in ("fused", "hook_pattern"):
            raise StepSalError(f"StepFlow runs engine 'fused' or 'hook_pattern'; got {engine!r} "
                               f"(stepflow(..., engine='auto') chooses one)")
        fmt = info_of(model).format
        self.model = model
        self.engine, self.engine_reason = engine, engine_reason
        self.config = (config or StepFlowConfig()).resolve(model.cfg.n_layers, model.cfg.n_ctx)
        c = self.config
        self.tau_max, self.alpha, self.window = c.tau_max, c.alpha, c.window
        self.oeb_layers, self.smi_layers = list(c.oeb_layers), list(c.smi_layers)
        self.smi_variant = c.smi_variant
        self.tracker = SegmentTracker(model.tokenizer, fmt, c.splitter)
        self.stats = StepFlowStats(list(self.oeb_layers), list(self.smi_layers))
        self._windows = _sliding_windows(model)
        self._device = torch.device(model.cfg.device)
        self._group_of = _GROUP_OF.to(self._device)
        self._buffers: dict[int, dict[str, Any]] = {}
        self._values: dict[int, Tensor] = {}  # this pass's hook_v per layer (paper_code)
        self._pass = 0
        self._counted: set[tuple[int, int, str]] = set()
        self._per_pass: dict[Any, Any] = {}
        self._labels: dict[str, Tensor] | None = None

    def hooks(self) -> list[tuple[str, Any]]:
        """``(hook name, function)`` pairs, for ``model.hooks(fwd_hooks=...)``."""
        out = [(f"blocks.{l}.attn.hook_pattern", self._oeb_hook) for l in self.oeb_layers
               if self.tau_max > 0]
        if self.alpha == 0:
            return out
        if self.smi_variant == "resid_post":
            return out + [(f"blocks.{l}.hook_resid_post", self._smi_hook) for l in self.smi_layers]
        for l in self.smi_layers:  # hook_v fires before hook_z in the same layer
            out += [(f"blocks.{l}.attn.hook_v", self._keep_values),
                    (f"blocks.{l}.attn.hook_z", self._smi_hook)]
        return out

    # ---- following the model's forward passes ----------------------------------------------
    def _before_forward(self, module, args, kwargs):
        """Forward pre-hook on the bridge (the ``hook_pattern`` engine)."""
        tokens = args[0] if args else kwargs.get("input")
        if isinstance(tokens, (str, list)):
            tokens = self.model.to_tokens(tokens)
        self._follow(tokens, kwargs.get("attention_mask"), kwargs.get("past_key_values") is None)

    def _follow(self, tokens: Tensor, mask: Tensor | None, fresh: bool) -> None:
        """Feed one forward pass's token ids to the tracker: a fresh pass (prompt, trace or
        re-feed) starts over, a KV-cached step appends. Both engines call it."""
        if fresh:
            self.stats._archive_batch()
            self.tracker.reset(tokens, mask)
            self.stats.start_batch(len(self.tracker.rows))
            self._buffers = {}
        else:
            self.tracker.extend(tokens, mask)
        self._pass += 1
        self._counted.clear()
        self._values.clear()
        self._per_pass: dict[Any, Any] = {}  # label slices and OEB groups shared by layers
        labels = self.tracker._tensors()
        if labels["segment"].device != self._device:
            labels = {name: labels[name].to(self._device) for name, _, _ in self.tracker._FIELDS}
        self._labels = labels

    def _count(self, layer: int, kind: str) -> bool:
        """Count each hook once per forward pass (checkpointed backward re-runs it)."""
        key = (self._pass, layer, kind)
        if key in self._counted:
            return False
        self._counted.add(key)
        return True

    def _oeb_hook(self, pattern: Pattern, hook) -> Pattern:
        layer = _layer_of(hook.name)
        lab = self._check_batch(pattern)
        n_q, n_k = pattern.shape[-2:]
        groups = self._oeb_groups(lab, layer, n_q, n_k)
        if groups is None:
            return pattern
        return self._oeb_apply(pattern, groups, layer, self._count(layer, "oeb"))

    def _oeb_groups(self, lab: dict[str, Tensor], layer: int, n_q: int, n_k: int,
                    rows: tuple[int, int] | None = None) -> _Groups | None:
        """OEB's same and bridge groups (key masks ``[batch, 1, row, key]``) for query rows
        ``rows`` (default: all ``n_q``) of a pass with ``n_q`` queries and ``n_k`` keys, or
        None when no row is a thinking or summary query (nothing to edit). Layers of one
        pass with the same keys and window share them."""
        rows = None if rows == (0, n_q) else rows
        key = ("oeb", n_q, n_k, rows, self._windows.get(layer))
        if key not in self._per_pass:
            self._per_pass[key] = self._make_groups(lab, layer, n_q, n_k, rows)
        return self._per_pass[key]

    def _make_groups(self, lab: dict[str, Tensor], layer: int, n_q: int, n_k: int,
                     rows: tuple[int, int] | None) -> _Groups | None:
        total = lab["segment"].shape[1]
        a, b = rows or (0, n_q)
        # queries are the last n_q known positions, keys the last n_k (a sliding-window
        # cache may hold fewer than all)
        q0 = total - n_q
        q_seg = lab["segment"][:, q0 + a:q0 + b]
        k_seg = lab["segment"][:, total - n_k:]
        group = self._group_of[(q_seg + 1)[:, :, None], (k_seg + 1)[:, None, :]]
        visible = lab["valid"][:, None, total - n_k:]
        width = self._windows.get(layer)
        if n_q > 1 or width is not None:
            dev = visible.device
            q_pos = torch.arange(q0 + a, q0 + b, device=dev)[:, None]
            k_pos = torch.arange(total - n_k, total, device=dev)[None, :]
            sight = k_pos <= q_pos
            if width is not None:
                sight = sight & (k_pos > q_pos - width)
            visible = visible & sight
        group = group * visible  # [batch, row, key]: 1 same, 2 bridge, 0 neither
        if not bool(group.any()):
            return None
        return _groups(group[:, None] == 1, group[:, None] == 2, self.tau_max)

    def _oeb_apply(self, pattern: Pattern, groups: _Groups, layer: int,
                   count: bool) -> Pattern:
        """:func:`odds_equal_bridge` on ``pattern`` with the given groups; adds to the
        statistics when ``count`` (the first time this pass reaches ``layer``; on
        detached values, so that checkpointing does not see it)."""
        out, act, row, m_b = _oeb(pattern, groups)
        if count:
            self.stats.add_oeb(layer, act, row, m_b, groups.tau_b, groups.nonempty)
        return out

    def _keep_values(self, v: Tensor, hook) -> None:
        self._keep_v(v, _layer_of(hook.name))

    def _keep_v(self, v: Tensor, layer: int) -> None:
        """``hook_v`` ``[batch, pos, kv_head, d_head]``: keep it with the key/value heads
        expanded to query heads (Hugging Face's ``repeat_kv`` order), for ``hook_z``."""
        n_rep = self.model.cfg.n_heads // v.shape[2]
        self._values[layer] = einops.repeat(
            v, "batch pos kv_head d -> batch pos (kv_head rep) d", rep=n_rep)

    def _smi_hook(self, act: Tensor, hook) -> Tensor:
        return self._smi(act, _layer_of(hook.name))

    def _smi(self, act: Tensor, layer: int) -> Tensor:
        """SMI on one layer's activation ``[batch, pos, ...]`` (``hook_resid_post``, or
        ``hook_z`` for ``paper_code``), for either engine."""
        n_q = act.shape[1]
        key = ("smi", n_q, act.shape[0])
        if key not in self._per_pass and n_q == 1:  # a generation step: the rows' last labels
            self._check_batch(act)
            rows = self.tracker.rows
            thinking = [r.segment[-1] == _T for r in rows]
            # resid_post's window: the step's last non-space tokens; paper_code's: the
            # step's last tokens (spaces inside it included)
            steps = [r.step[-1] if t and (r.anchored[-1] or self.smi_variant != "resid_post")
                     else -1 for r, t in zip(rows, thinking)]
            starts = [t and r.start[-1] for r, t in zip(rows, thinking)]
            live = [s >= 0 for s in steps]
            live = torch.tensor(live, device=act.device) if any(live) and not all(live) \
                else any(live)
            self._per_pass[key] = (steps, starts, live)
        elif key not in self._per_pass:  # the labels of this pass's positions
            lab = self._check_batch(act)
            total = lab["segment"].shape[1]
            pos = slice(total - n_q, total)
            thinking = lab["segment"][:, pos] == _T
            # resid_post's window: the step's last non-space tokens; paper_code's: the
            # step's last tokens (spaces inside it included)
            inside = thinking & lab["anchored"][:, pos] if self.smi_variant == "resid_post" \
                else thinking
            self._per_pass[key] = (torch.where(inside, lab["step"][:, pos], -1).tolist(),
                                   (thinking & lab["step_start"][:, pos]).tolist(), None)
        steps, starts, live = self._per_pass[key]  # [batch] or [batch][pos] lists
        if self.smi_variant == "resid_post":
            src = act  # the window's activations at the same hook
        else:
            src = self._values.pop(layer, None)  # the values
            if src is None or src.shape[:2] != act.shape[:2]:
                raise StepSalError(f"smi_variant='paper_code' saw blocks.{layer}.attn.hook_z "
                                   f"without the same pass's hook_v (the attention ran outside "
                                   f"its block?); use smi_variant='resid_post' for this model")
        # Per row: the last `window` source activations of the latest thinking step seen so
        # far (right-aligned in `vec`, `count` of them valid). Each pass starts from the
        # state the previous pass left, so a pass re-run by checkpointing starts the same way.
        state = self._buffers.get(layer)
        if state is None or state["pass"] != self._pass:
            b, w = act.shape[0], self.window
            init = state["end"] if state else {
                "vec": src.new_zeros((b, w, *src.shape[2:])).detach(),
                "count": [0] * b, "step": [-1] * b}
            state = {"pass": self._pass, "init": init}
            self._buffers[layer] = state
        count = self._count(layer, "smi")
        if n_q == 1:
            out, state["end"] = self._smi_one(act, src, steps, starts, live, state["init"],
                                              layer, count)
        else:
            out, state["end"] = self._smi_block(act, src, steps, starts, state["init"], layer,
                                                count)
        return out

    def _inject(self, out: Tensor, act: Tensor, b: int, i: int, window: Tensor, layer: int,
                count: bool) -> Tensor:
        if out is act:
            out = act.clone()
        out[b, i] = step_momentum(act[b, i], window, self.alpha)
        if count:
            self.stats.smi_injections[layer][b] += 1
        return out

    def _smi_one(self, act, src, steps, starts, live, buf, layer, count):
        """One new position per row (a KV-cached step): the bookkeeping on the rows' plain
        ints, the window shifted by one tensor op for all rows. ``act`` is edited, ``src``
        feeds the window (the same tensor for ``resid_post``); ``steps`` and ``starts``
        hold one label per row, ``live`` says which rows' windows move (True: all, False:
        none, else a ``[batch]`` mask)."""
        w = self.window
        vec, n, step = buf["vec"], list(buf["count"]), list(buf["step"])
        out = act
        for b, (s, is_start) in enumerate(zip(steps, starts)):
            if s < 0:
                continue
            if is_start and step[b] == s - 1 and n[b] > 0:
                out = self._inject(out, act, b, 0, vec[b, w - n[b]:], layer, count)
            if s != step[b]:
                n[b], step[b] = 0, s
            n[b] = min(n[b] + 1, w)
        if live is not False:
            new = src[:, :1]
            new = new.detach() if new.requires_grad else new
            shifted = torch.cat([vec[:, 1:], new if new.dtype == vec.dtype else new.to(vec.dtype)],
                                dim=1)
            if live is not True:
                shifted = torch.where(live.view(-1, *([1] * (vec.dim() - 1))), shifted, vec)
            vec = shifted
        return out, {"vec": vec, "count": n, "step": step}

    def _smi_block(self, act, src, steps, starts, buf, layer, count):
        """Many positions per row (prompt, teacher-forced trace, uncached step)."""
        w = self.window
        out = act
        vec, n, step = buf["vec"].clone(), list(buf["count"]), list(buf["step"])
        for b in range(act.shape[0]):
            if all(s < 0 for s in steps[b]):
                continue
            cur = step[b]
            win = [vec[b, j] for j in range(w - n[b], w)]
            for i, (s, is_start) in enumerate(zip(steps[b], starts[b])):
                if s < 0:
                    continue
                if is_start and cur == s - 1 and win:
                    out = self._inject(out, act, b, i, torch.stack(win), layer, count)
                if cur != s:
                    cur, win = s, []
                win = (win + [src[b, i]])[-w:]
            step[b], n[b] = cur, len(win)
            vec[b] = 0
            if win:  # copies: later hooks may edit the activation in place
                vec[b, w - len(win):] = torch.stack(win).detach().to(vec.dtype)
        return out, {"vec": vec, "count": n, "step": step}

    def _check_batch(self, act: Tensor) -> dict[str, Tensor]:
        lab = getattr(self, "_labels", None)
        if lab is None or act.shape[0] != lab["segment"].shape[0]:
            raise StepSalError(
                f"StepFlow's hook got a batch of {act.shape[0]} but followed "
                f"{0 if lab is None else lab['segment'].shape[0]} sequences; call the model "
                f"with token ids (model(tokens) / model.generate(...)) inside the stepflow block")
        return lab

    # ---- context management ----------------------------------------------------------------
    @contextmanager
    def active(self) -> Iterator[StepFlow]:
        """Hooks on for the duration of the block; always removed, even on errors.

        Blocks do not nest on one model: two trackers would each see every pass and two
        sets of edits would compound, so a second block raises.
        """
        if self.model in _ACTIVE:
            raise StepSalError(f"a stepflow block is already active on this model "
                               f"({_ACTIVE[self.model].config}); stepflow blocks do not "
                               f"nest - leave the first block, or change its StepFlowConfig")
        hooks = self.hooks() if self.engine == "hook_pattern" else []
        require_hooks(self.model, [name for name, _ in hooks])
        with ExitStack() as stack:
            _ACTIVE[self.model] = self
            stack.callback(_ACTIVE.pop, self.model, None)
            if self.engine == "fused":
                from stepsal_lens.lens.fused_stepflow import fused_hooks

                stack.enter_context(fused_hooks(self))
                yield self
                return
            handle = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            stack.callback(handle.remove)
            stack.enter_context(self.model.hooks(fwd_hooks=hooks))
            yield self

    def __repr__(self) -> str:
        return f"StepFlow({self.config}, engine={self.engine!r})"


#: The StepFlow active on each model (blocks do not nest).
_ACTIVE: weakref.WeakKeyDictionary[Any, StepFlow] = weakref.WeakKeyDictionary()


def active_stepflow(model: Any) -> StepFlow | None:
    """The StepFlow whose block is open on ``model`` (None outside any block); results
    computed inside record its config."""
    return _ACTIVE.get(model)


def _smi_site(settings: dict[str, Any]) -> dict[str, Any]:
    """Map the removed ``smi_site`` option, or refuse it naming the new one."""
    site = settings.pop("smi_site", None)
    if site is not None and (site != "resid_post"
                             or settings.get("smi_variant", "resid_post") != "resid_post"):
        raise StepSalError(
            f"smi_site={site!r} was removed; pass smi_variant='paper_code' for the paper "
            f"code's SMI (alpha * mean of the values added to each head's hook_z, first "
            f"SMI layer only) or smi_variant='resid_post' (the default)")
    return settings


def _sliding_windows(model: Any) -> dict[int, int]:
    """Layer -> sliding-window width, for layers with local attention (GPT-OSS)."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    width = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not width or not types:
        return {}
    return {i: int(width) for i, t in enumerate(types) if t == "sliding_attention"}


@contextmanager
def stepflow(model: Any, config: StepFlowConfig | None = None, *, engine: str = "auto",
             **settings: Any) -> Iterator[StepFlow]:
    """Turn StepFlow on for every forward pass of ``model`` inside the block.

    Works with KV-cached and uncached ``model.generate`` (batched prompts included) and
    with teacher-forced forward passes, e.g. :func:`~stepsal_lens.step_saliency` over a
    fixed trace. Hooks are removed when the block ends, also on an exception. Blocks do
    not nest on one model (a second raises).

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm` (its format locates the segments).
    config
        A :class:`~stepsal_lens.StepFlowConfig` (default: the paper's settings).
    **settings
        Fields of :class:`~stepsal_lens.StepFlowConfig` that override ``config``
        (``tau_max``, ``alpha``, ``oeb_layers``, ``smi_layers``, ``window``,
        ``smi_variant``). ``smi_variant="resid_post"`` (the design card) adds ``alpha``
        times the mean ``hook_resid_post`` over the previous step's last ``window``
        non-space tokens at each new thinking step's first token, in every SMI layer;
        ``"paper_code"`` (the paper's code) adds the mean value vector (``hook_v``) to
        each head's ``hook_z``, in the first SMI layer only (docs/stepflow.md).
    engine
        ``"hook_pattern"``: hooks on the bridge's ``hook_pattern`` and ``hook_resid_post``
        (anything can run inside the block: other hooks, ``run_with_cache``,
        :func:`~stepsal_lens.step_saliency`). ``"fused"``: OEB as an attention function
        and SMI as module hooks on the Hugging Face model inside the bridge
        (:mod:`stepsal_lens.lens.fused_stepflow`; the same results, at Hugging Face's speed,
        for forward passes and generation only: the bridge's hook points do not run).
        ``"auto"`` (default): ``"hook_pattern"`` in a block;
        :func:`~stepsal_lens.lens.generation.generate` chooses ``"fused"``.

    Yields
    ------
    StepFlow
        ``sf.config`` (resolved), ``sf.stats`` (:class:`StepFlowStats`), ``sf.tracker``
        (:class:`SegmentTracker`) and ``sf.engine`` (the engine that runs).
    """
    if config is not None and not isinstance(config, StepFlowConfig):
        hint = (f"pass settings as keywords, stepflow(model, **{config!r})"
                if isinstance(config, dict) else "e.g. StepFlowConfig(alpha=0.06)")
        raise StepSalError(f"config must be a StepFlowConfig or None; got "
                           f"{describe_value(config)}; {hint}, or stepflow(model, StepFlowConfig(...))")
    settings = _smi_site(dict(settings))
    config = config or StepFlowConfig()
    if settings:
        try:
            config = replace(config, **settings)
        except TypeError:
            known = [f.name for f in fields(StepFlowConfig)]
            raise StepSalError(f"unknown StepFlow setting(s) {sorted(settings)}; known: "
                               f"{known}") from None
    from stepsal_lens.lens.fused_stepflow import choose_engine

    used, reason = choose_engine(model, engine, block=True)
    sf = StepFlow(model, config, used, reason)
    with sf.active():
        yield sf
