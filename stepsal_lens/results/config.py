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
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from stepsal_lens._checks import check_layer_list, check_whole
from stepsal_lens.errors import StepSalError
from stepsal_lens.segments.splitters import list_splitters

__all__ = ["SMI_VARIANTS", "SMIVariant", "StepFlowConfig", "default_layer_split",
           "list_smi_variants", "register_smi_variant"]


@dataclass(frozen=True)
class SMIVariant:
    """One way of doing Step Momentum Injection: where the update is added and what the
    window holds. Registered by name (:func:`register_smi_variant`); both StepFlow engines
    read these fields, never the name.

    Parameters
    ----------
    name
        The ``smi_variant`` value that selects it.
    description
        One line on what it adds where (docs/stepflow.md has the table).
    site
        ``"resid_post"``: the window's mean ``hook_resid_post`` is added to
        ``hook_resid_post``; ``"z"``: the window's mean attention values (``hook_v``, GQA
        heads expanded) are added to each head's ``hook_z``.
    skip_spaces
        The window holds the previous step's last non-space tokens (False: its last
        tokens, spaces included).
    first_layer_only
        Only the first SMI layer is used (the paper's ``min_layer``).
    """

    name: str
    description: str
    site: str
    skip_spaces: bool
    first_layer_only: bool

    def __post_init__(self) -> None:
        if self.site not in ("resid_post", "z"):
            raise StepSalError(f"an SMI variant's site is 'resid_post' or 'z' (the two the "
                               f"engines hook); got {self.site!r}")


#: The registered SMI variants by name (the one registry; :func:`register_smi_variant`).
SMI_VARIANTS: dict[str, SMIVariant] = {}


def register_smi_variant(variant: SMIVariant, *, overwrite: bool = False) -> SMIVariant:
    """Add an SMI variant; ``StepFlowConfig(smi_variant=variant.name)`` then selects it and
    the CLI's ``--smi-variant`` offers it."""
    if variant.name in SMI_VARIANTS and not overwrite:
        raise StepSalError(f"SMI variant {variant.name!r} is already registered; pass "
                           f"overwrite=True")
    SMI_VARIANTS[variant.name] = variant
    return variant


def list_smi_variants() -> list[str]:
    """Names of the registered SMI variants."""
    return sorted(SMI_VARIANTS)


register_smi_variant(SMIVariant(
    "resid_post", "alpha * mean(hook_resid_post over the last `window` non-space tokens of "
                  "the previous step) added to hook_resid_post, in every SMI layer (the "
                  "definition in docs/concepts.md)",
    site="resid_post", skip_spaces=True, first_layer_only=False))
register_smi_variant(SMIVariant(
    "paper_code", "alpha * mean(hook_v over the last `window` tokens of the previous step, "
                  "per head) added to hook_z, in the first SMI layer only (the paper's code)",
    site="z", skip_spaces=False, first_layer_only=True))


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

    # Each field's metadata is what the command line shows (apps/cli_common.py builds the
    # flags from these fields): "help", and "choices" (a function listing a registry).
    tau_max: float = field(default=0.15, metadata={"help": "OEB bridge cap"})
    alpha: float = field(default=0.06, metadata={"help": "SMI strength"})
    # Any sequence is accepted and stored as a sorted tuple.
    oeb_layers: Sequence[int] | None = field(
        default=None, metadata={"help": "e.g. 0,1,2 (default: bottom quarter)"})
    smi_layers: Sequence[int] | None = field(
        default=None, metadata={"help": "e.g. 25,26,27 (default: top quarter)"})
    window: int = field(default=4, metadata={"help": "SMI window in tokens"})
    smi_variant: str = field(default="resid_post", metadata={
        "help": "resid_post: mean resid_post added in every SMI layer; paper_code: mean "
                "values added to hook_z in the first SMI layer",
        "choices": lambda: list_smi_variants()})
    splitter: str = field(default="paper", metadata={
        "help": "the registered step splitter that decides where steps start",
        "choices": lambda: list_splitters()})

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
        (the defaults filled in, ranges checked; a variant with ``first_layer_only``, like
        ``paper_code``, keeps its first SMI layer).

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
        if SMI_VARIANTS[self.smi_variant].first_layer_only:  # the paper's min_layer
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
