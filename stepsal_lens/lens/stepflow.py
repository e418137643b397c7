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
:func:`~stepsal_lens.core.interventions.step_momentum`. :class:`StepFlow` is the
engine-agnostic :class:`~stepsal_lens.lens.flow_state.StepFlowState` (per-position labels
from a :class:`~stepsal_lens.segments.tracker.SegmentTracker`, which follows every forward
pass of the model: a fresh pass, a KV-cached generation step, a batch of left-padded
prompts) plus the :class:`~stepsal_lens.lens.engines.Engine` that attaches it
(:mod:`stepsal_lens.lens.engines`).

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

from stepsal_lens.errors import StepSalError
from stepsal_lens._checks import describe_value
from stepsal_lens.lens.engines import HOOK_PATTERN, Engine, choose, get_engine
from stepsal_lens.lens.flow_state import StepFlowState
from stepsal_lens.results.config import StepFlowConfig
from stepsal_lens.typing import Model

__all__ = ["StepFlow", "active_stepflow", "stepflow"]


class StepFlow(StepFlowState):
    """The live intervention: the StepFlow state and the engine that runs it (made by
    :func:`stepflow`).

    ``config`` is the resolved :class:`~stepsal_lens.StepFlowConfig` (explicit layers);
    ``engine`` is ``"hook_pattern"`` (hooks on the bridge's hook points) or ``"fused"``
    (:mod:`stepsal_lens.lens.fused_stepflow`), ``engine_reason`` why it was chosen, and
    ``runner`` the :class:`~stepsal_lens.lens.engines.Engine` itself.
    """

    def __init__(self, model: Model, config: StepFlowConfig | None = None,
                 engine: str | Engine = "hook_pattern", engine_reason: str = "requested"):
        self.runner = engine if isinstance(engine, Engine) else get_engine(engine, engine_reason)
        super().__init__(model, config)

    @property
    def engine(self) -> str:
        """The name of the engine that runs (``"fused"`` or ``"hook_pattern"``)."""
        return self.runner.name

    @property
    def engine_reason(self) -> str:
        """Why that engine runs."""
        return self.runner.reason

    def hooks(self) -> list[tuple[str, Any]]:
        """``(hook name, function)`` pairs on the bridge's hook points (the
        ``hook_pattern`` engine's), for ``model.hooks(fwd_hooks=...)``."""
        return HOOK_PATTERN.stepflow_hooks(self)

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
        with ExitStack() as stack:
            attached = self.runner.attach_stepflow(self)
            _ACTIVE[self.model] = self
            stack.callback(_ACTIVE.pop, self.model, None)
            stack.enter_context(attached)
            yield self

    def __repr__(self) -> str:
        return f"StepFlow({self.config}, engine={self.engine!r})"


#: The StepFlow active on each model (blocks do not nest).
_ACTIVE: weakref.WeakKeyDictionary[Any, StepFlow] = weakref.WeakKeyDictionary()


def active_stepflow(model: Model) -> StepFlow | None:
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


@contextmanager
def stepflow(model: Model, config: StepFlowConfig | None = None, *,
             engine: str | Engine = "auto",
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
        :func:`~stepsal_lens.lens.generation.generate` chooses ``"fused"``. An
        :class:`~stepsal_lens.lens.engines.Engine` already chosen
        (:func:`~stepsal_lens.lens.engines.choose`) runs as it is.

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
    sf = StepFlow(model, config, choose(model, engine, needs_hooks=True, purpose="stepflow"))
    with sf.active():
        yield sf
