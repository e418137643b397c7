"""StepFlow's state, the same for every engine: what OEB and SMI need at each pass.

An engine attaches StepFlow to a model (:mod:`stepsal_lens.lens.engines`): it calls
:meth:`StepFlowState.follow` with each forward pass's token ids, and at each OEB layer
:meth:`~StepFlowState.oeb_groups` + :meth:`~StepFlowState.oeb_apply`, at each SMI layer
:meth:`~StepFlowState.smi` (and :meth:`~StepFlowState.keep_values` first, for a variant
whose site is ``hook_z``). The ``hook_pattern`` engine calls them from hooks on the
bridge's hook points, the fused engine from its attention function and from hooks on the
Hugging Face modules; the state knows neither. The edits themselves are the pure cores
:func:`~stepsal_lens.core.interventions.oeb_groups` /
:func:`~stepsal_lens.core.interventions.apply_oeb` and
:func:`~stepsal_lens.core.interventions.step_momentum`.

Examples
--------
>>> import torch
>>> from stepsal_lens import StepFlowConfig, load_lrm
>>> model = load_lrm("tiny-lrm")
>>> state = StepFlowState(model, StepFlowConfig(tau_max=0.5))
>>> tokens = model.to_tokens("Start with 3. Add 4.\\n<think>\\nStart with 3.\\nAdd 4 to get 7.")
>>> state.follow(tokens, None, fresh=True)
>>> n = tokens.shape[1]
>>> groups = state.oeb_groups(0, n, n)  # thinking queries: thinking (same) / question (bridge)
>>> pattern = torch.softmax(torch.randn(1, 2, n, n).masked_fill(
...     torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")), -1)
>>> state.oeb_apply(pattern, groups, 0, count=True).shape == pattern.shape
True
>>> state.stats.to_dict()["oeb"]["eligible_rows"] > 0
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import einops
import torch
from torch import Tensor

from stepsal_lens.core.interventions import OEBGroups, apply_oeb, oeb_groups, step_momentum
from stepsal_lens.errors import StepSalError
from stepsal_lens.results.config import SMI_VARIANTS, SMIVariant, StepFlowConfig
from stepsal_lens.results.stats import StepFlowStats
from stepsal_lens.segments.association import info_of
from stepsal_lens.segments.tracker import SEGMENT_CODES, SegmentTracker
from stepsal_lens.typing import Model, Pattern

__all__ = ["GROUP_OF", "StepFlowState", "sliding_windows"]

_THINKING, _SUMMARY = SEGMENT_CODES["thinking"], SEGMENT_CODES["summary"]

#: OEB's group of a key, indexed by (query segment + 1, key segment + 1): 1 = same,
#: 2 = bridge, 0 = neither. A thinking query's same group is thinking and its bridge the
#: question; a summary query's are summary and thinking; other queries are left alone.
GROUP_OF = torch.tensor([[0, 0, 0, 0],   # query in no segment (template, padding)
                         [0, 0, 0, 0],   # question
                         [0, 2, 1, 0],   # thinking
                         [0, 0, 2, 1]],  # summary
                        dtype=torch.uint8)


def sliding_windows(model: Model) -> dict[int, int]:
    """Layer -> sliding-window width, for layers with local attention (GPT-OSS)."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    width = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not width or not types:
        return {}
    return {i: int(width) for i, t in enumerate(types) if t == "sliding_attention"}


class StepFlowState:
    """StepFlow's engine-agnostic state: the tracker, OEB's groups, SMI's windows, stats.

    ``config`` is the resolved :class:`~stepsal_lens.StepFlowConfig` (explicit layers),
    ``variant`` its :class:`~stepsal_lens.results.config.SMIVariant`, ``tracker`` the
    :class:`~stepsal_lens.SegmentTracker` fed by :meth:`follow`, ``stats`` the
    :class:`~stepsal_lens.StepFlowStats`.
    """

    def __init__(self, model: Model, config: StepFlowConfig | None = None):
        fmt = info_of(model).format
        self.model = model
        self.config = (config or StepFlowConfig()).resolve(model.cfg.n_layers, model.cfg.n_ctx)
        self.variant: SMIVariant = SMI_VARIANTS[self.config.smi_variant]
        self.tracker = SegmentTracker(model.tokenizer, fmt, self.config.splitter)
        self.stats = StepFlowStats(list(self.config.oeb_layers), list(self.config.smi_layers))
        self._oeb_set = set(self.config.oeb_layers)
        self._windows = sliding_windows(model)
        self._device = torch.device(model.cfg.device)
        self._group_of = GROUP_OF.to(self._device)
        self._buffers: dict[int, dict[str, Any]] = {}
        self._values: dict[int, Tensor] = {}  # this pass's hook_v per layer (site "z")
        self._pass = 0
        self._counted: set[tuple[int, int, str]] = set()
        self._per_pass: dict[Any, Any] = {}
        self._labels: dict[str, Tensor] | None = None

    # ---- what runs where ---------------------------------------------------------------------
    def edits_oeb(self, layer: int) -> bool:
        """Whether OEB edits ``layer``'s attention (an OEB layer, ``tau_max > 0``)."""
        return self.config.tau_max > 0 and layer in self._oeb_set

    @property
    def smi_on(self) -> bool:
        """Whether SMI adds anything (``alpha != 0``)."""
        return self.config.alpha != 0

    # ---- following the model's forward passes ----------------------------------------------
    def follow(self, tokens: Tensor, mask: Tensor | None, fresh: bool) -> None:
        """Feed one forward pass's token ids to the tracker: a fresh pass (prompt, trace or
        re-feed) starts over, a KV-cached step appends. Every engine calls it."""
        if fresh:
            self.stats.archive_batch()
            self.tracker.reset(tokens, mask)
            self.stats.start_batch(len(self.tracker.rows))
            self._buffers = {}
        else:
            self.tracker.extend(tokens, mask)
        self._pass += 1
        self._counted.clear()
        self._values.clear()
        self._per_pass = {}  # label slices and OEB groups shared by layers
        labels = self.tracker.tensors()
        if labels["segment"].device != self._device:
            labels = {name: labels[name].to(self._device) for name, _, _ in self.tracker.FIELDS}
        self._labels = labels

    @property
    def labels(self) -> dict[str, Tensor] | None:
        """This pass's label tensors (``segment``, ``step``, ``step_start``, ``anchored``,
        ``valid``, each ``[batch, position]``), on the model's device."""
        return self._labels

    def check_batch(self, act: Tensor) -> dict[str, Tensor]:
        """The labels, refused when ``act``'s batch is not the one the tracker followed."""
        lab = self._labels
        if lab is None or act.shape[0] != lab["segment"].shape[0]:
            raise StepSalError(
                f"StepFlow's hook got a batch of {act.shape[0]} but followed "
                f"{0 if lab is None else lab['segment'].shape[0]} sequences; call the model "
                f"with token ids (model(tokens) / model.generate(...)) inside the stepflow block")
        return lab

    def once_per_pass(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` the first time ``key`` is asked for in this pass, then the same value
        (label slices and groups that several layers share)."""
        if key not in self._per_pass:
            self._per_pass[key] = make()
        return self._per_pass[key]

    def count(self, layer: int, kind: str) -> bool:
        """Count each hook once per forward pass (checkpointed backward re-runs it)."""
        key = (self._pass, layer, kind)
        if key in self._counted:
            return False
        self._counted.add(key)
        return True

    # ---- OEB ---------------------------------------------------------------------------------
    def first_edited_row(self, act: Tensor, n_q: int) -> int:
        """First of this pass's ``n_q`` query rows that is a thinking or summary query in
        some batch row (``n_q`` when none is: OEB leaves the whole pass alone)."""
        def first() -> int:
            seg = self.check_batch(act)["segment"][:, -n_q:]
            rows = ((seg == _THINKING) | (seg == _SUMMARY)).any(0).nonzero()
            return int(rows[0]) if len(rows) else n_q

        return self.once_per_pass(("first row", n_q), first)

    def oeb_groups(self, layer: int, n_q: int, n_k: int,
                   rows: tuple[int, int] | None = None) -> OEBGroups | None:
        """OEB's same and bridge groups (key masks ``[batch, 1, row, key]``) for query rows
        ``rows`` (default: all ``n_q``) of a pass with ``n_q`` queries and ``n_k`` keys, or
        None when no row is a thinking or summary query (nothing to edit). Layers of one
        pass with the same keys and window share them."""
        rows = None if rows == (0, n_q) else rows
        return self.once_per_pass(("oeb", n_q, n_k, rows, self._windows.get(layer)),
                                  lambda: self._make_groups(layer, n_q, n_k, rows))

    def _make_groups(self, layer: int, n_q: int, n_k: int,
                     rows: tuple[int, int] | None) -> OEBGroups | None:
        lab = self._labels
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
        return oeb_groups(group[:, None] == 1, group[:, None] == 2, self.config.tau_max)

    def oeb_apply(self, pattern: Pattern, groups: OEBGroups, layer: int,
                  count: bool) -> Pattern:
        """:func:`~stepsal_lens.core.interventions.apply_oeb` on ``pattern`` with the given
        groups; adds to the statistics when ``count`` (the first time this pass reaches
        ``layer``; on detached values, so that checkpointing does not see it)."""
        out, act, row, m_b = apply_oeb(pattern, groups)
        if count:
            self.stats.add_oeb(layer, act, row, m_b, groups.tau_b, groups.nonempty)
        return out

    # ---- SMI ---------------------------------------------------------------------------------
    def keep_values(self, v: Tensor, layer: int) -> None:
        """``hook_v`` ``[batch, pos, kv_head, d_head]``: keep it with the key/value heads
        expanded to query heads (Hugging Face's ``repeat_kv`` order), for ``hook_z``."""
        n_rep = self.model.cfg.n_heads // v.shape[2]
        self._values[layer] = einops.repeat(
            v, "batch pos kv_head d -> batch pos (kv_head rep) d", rep=n_rep)

    def smi(self, act: Tensor, layer: int) -> Tensor:
        """SMI on one layer's activation ``[batch, pos, ...]`` at the variant's site
        (``hook_resid_post``, or ``hook_z`` for a ``"z"`` site), for any engine."""
        n_q = act.shape[1]
        key = ("smi", n_q, act.shape[0])
        skip_spaces = self.variant.skip_spaces
        if key not in self._per_pass and n_q == 1:  # a generation step: the rows' last labels
            self.check_batch(act)
            rows = self.tracker.rows
            thinking = [r.segment[-1] == _THINKING for r in rows]
            # the window: the step's last non-space tokens (skip_spaces), or its last
            # tokens (spaces inside it included)
            steps = [r.step[-1] if t and (r.anchored[-1] or not skip_spaces)
                     else -1 for r, t in zip(rows, thinking)]
            starts = [t and r.start[-1] for r, t in zip(rows, thinking)]
            live = [s >= 0 for s in steps]
            live = torch.tensor(live, device=act.device) if any(live) and not all(live) \
                else any(live)
            self._per_pass[key] = (steps, starts, live)
        elif key not in self._per_pass:  # the labels of this pass's positions
            lab = self.check_batch(act)
            total = lab["segment"].shape[1]
            pos = slice(total - n_q, total)
            thinking = lab["segment"][:, pos] == _THINKING
            inside = thinking & lab["anchored"][:, pos] if skip_spaces else thinking
            self._per_pass[key] = (torch.where(inside, lab["step"][:, pos], -1).tolist(),
                                   (thinking & lab["step_start"][:, pos]).tolist(), None)
        steps, starts, live = self._per_pass[key]  # [batch] or [batch][pos] lists
        if self.variant.site == "resid_post":
            src = act  # the window's activations at the same hook
        else:
            src = self._values.pop(layer, None)  # the values
            if src is None or src.shape[:2] != act.shape[:2]:
                raise StepSalError(f"smi_variant={self.variant.name!r} saw "
                                   f"blocks.{layer}.attn.hook_z without the same pass's hook_v "
                                   f"(the attention ran outside its block?); use "
                                   f"smi_variant='resid_post' for this model")
        # Per row: the last `window` source activations of the latest thinking step seen so
        # far (right-aligned in `vec`, `count` of them valid). Each pass starts from the
        # state the previous pass left, so a pass re-run by checkpointing starts the same way.
        state = self._buffers.get(layer)
        if state is None or state["pass"] != self._pass:
            b, w = act.shape[0], self.config.window
            init = state["end"] if state else {
                "vec": src.new_zeros((b, w, *src.shape[2:])).detach(),
                "count": [0] * b, "step": [-1] * b}
            state = {"pass": self._pass, "init": init}
            self._buffers[layer] = state
        count = self.count(layer, "smi")
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
        out[b, i] = step_momentum(act[b, i], window, self.config.alpha)
        if count:
            self.stats.smi_injections[layer][b] += 1
        return out

    def _smi_one(self, act, src, steps, starts, live, buf, layer, count):
        """One new position per row (a KV-cached step): the bookkeeping on the rows' plain
        ints, the window shifted by one tensor op for all rows. ``act`` is edited, ``src``
        feeds the window (the same tensor for ``resid_post``); ``steps`` and ``starts``
        hold one label per row, ``live`` says which rows' windows move (True: all, False:
        none, else a ``[batch]`` mask)."""
        w = self.config.window
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
        w = self.config.window
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
