"""StepFlow's settings as one frozen, validated, serialisable object.

:func:`~stepsal_lens.lens.stepflow`, :func:`~stepsal_lens.lens.generation.generate`,
:func:`~stepsal_lens.eval.runs.evaluate`, the command line and the demo all take a
:class:`StepFlowConfig` and record :meth:`StepFlowConfig.to_dict` of its resolved form
(explicit layers), so every result says exactly what StepFlow did.

Examples
--------
>>> from stepsal_lens import StepFlowConfig
>>> cfg = StepFlowConfig(alpha=0.1)
>>> cfg.resolve(n_layers=8).to_dict()["smi_layers"]
[6, 7]
>>> StepFlowConfig.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from stepsal_lens._checks import check_layer_list, check_whole
from stepsal_lens.errors import StepSalError

__all__ = ["SMI_VARIANTS", "StepFlowConfig", "default_layer_split"]

#: SMI variant -> one line on what it adds where (docs/stepflow.md has the table).
SMI_VARIANTS = {
    "resid_post": "alpha * mean(hook_resid_post over the last `window` non-space tokens of "
                  "the previous step) added to hook_resid_post, in every SMI layer (the "
                  "definition in docs/concepts.md)",
    "paper_code": "alpha * mean(hook_v over the last `window` tokens of the previous step, "
                  "per head) added to hook_z, in the first SMI layer only (the paper's code)",
}


def default_layer_split(n_layers: int) -> dict[str, list[int]]:
    """The paper's layer split: OEB on the bottom quarter, SMI on the top quarter.

    >>> default_layer_split(28)
    {'oeb': [0, 1, 2, 3, 4, 5, 6], 'smi': [21, 22, 23, 24, 25, 26, 27]}
    """
    q = math.ceil(n_layers / 4)
    return {"oeb": list(range(q)), "smi": list(range(n_layers - q, n_layers))}


def _layers(value: Any, what: str) -> tuple[int, ...] | None:
    return None if value is None else check_layer_list(value, what, allow_empty=True)


@dataclass(frozen=True)
class StepFlowConfig:
    """StepFlow's settings (the paper's defaults), validated once at construction.

    Parameters
    ----------
    tau_max
        OEB cap on the bridge target, in [0, 1] (paper: 0.15); 0 turns OEB off.
    alpha
        SMI strength, finite (paper: 0.06); 0 turns SMI off.
    oeb_layers, smi_layers
        Layers to hook; None = :func:`default_layer_split` (bottom / top quarter),
        resolved against the model by :meth:`resolve`.
    window
        SMI averages the last ``window`` tokens of the previous step (paper: 4).
    smi_variant
        ``"resid_post"`` (the default, as docs/concepts.md defines SMI) or ``"paper_code"`` (the paper's
        code); see :data:`SMI_VARIANTS`.
    splitter
        The registered step splitter that decides where steps start (the one step rule
        :class:`~stepsal_lens.Trace` uses too; default the paper's).
    """

    tau_max: float = 0.15
    alpha: float = 0.06
    # Any sequence is accepted and stored as a sorted tuple.
    oeb_layers: Sequence[int] | None = None
    smi_layers: Sequence[int] | None = None
    window: int = 4
    smi_variant: str = "resid_post"
    splitter: str = "paper"

    def __post_init__(self) -> None:
        for name in ("tau_max", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise StepSalError(f"{name} must be a finite number; got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0 <= self.tau_max <= 1:
            raise StepSalError(f"tau_max must be in [0, 1]; got {self.tau_max}")
        check_whole(self.window, "window", low=1, fix="the SMI window is a number of tokens "
                    "(paper: 4)")
        if not isinstance(self.smi_variant, str) or not isinstance(self.splitter, str):
            raise StepSalError(f"smi_variant and splitter must be names (strings); got "
                               f"{self.smi_variant!r} and {self.splitter!r}")
        if self.smi_variant not in SMI_VARIANTS:
            raise StepSalError(f"smi_variant must be one of {sorted(SMI_VARIANTS)}; got "
                               f"{self.smi_variant!r}")
        from stepsal_lens.segments.splitters import list_splitters

        if self.splitter not in list_splitters():
            raise StepSalError(f"splitter must be a registered step splitter, one of "
                               f"{list_splitters()}; got {self.splitter!r} (register yours "
                               f"with register_splitter(name, fn))")
        object.__setattr__(self, "oeb_layers", _layers(self.oeb_layers, "oeb_layers"))
        object.__setattr__(self, "smi_layers", _layers(self.smi_layers, "smi_layers"))

    @property
    def is_off(self) -> bool:
        """Both parts off (``tau_max == 0`` and ``alpha == 0``): plain generation."""
        return self.tau_max == 0 and self.alpha == 0

    def resolve(self, n_layers: int, n_ctx: int | None = None) -> StepFlowConfig:
        """The same settings with explicit layers for a model of ``n_layers`` layers
        (the defaults filled in, ranges checked; ``paper_code`` keeps its first SMI layer).

        With the model's context ``n_ctx``, a ``window`` longer than it is refused before
        any buffer is allocated."""
        if n_ctx is not None and self.window > n_ctx:
            raise StepSalError(f"window={self.window} is longer than the model's context of "
                               f"{n_ctx} tokens (SMI would allocate a buffer of window x d_model "
                               f"per row and layer); pass a window of a few tokens (paper: 4)")
        split = default_layer_split(n_layers)
        oeb = self.oeb_layers if self.oeb_layers is not None else tuple(split["oeb"])
        smi = self.smi_layers if self.smi_layers is not None else tuple(split["smi"])
        for what, layers in (("oeb_layers", oeb), ("smi_layers", smi)):
            bad = [l for l in layers if l >= n_layers]
            if bad:
                raise StepSalError(f"{what} {bad} out of range: the model has layers "
                                   f"0..{n_layers - 1}")
        if self.smi_variant == "paper_code":  # the paper's min_layer: one layer only
            smi = smi[:1]
        return replace(self, oeb_layers=oeb, smi_layers=smi)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (layers as lists, None when unresolved)."""
        out = asdict(self)
        for key in ("oeb_layers", "smi_layers"):
            out[key] = None if out[key] is None else list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepFlowConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StepSalError(f"unknown StepFlow settings {unknown}; known: {sorted(known)}")
        return cls(**data)
