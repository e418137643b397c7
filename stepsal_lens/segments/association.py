"""Which reasoning format a model speaks, associated with the model object explicitly.

:func:`~stepsal_lens.lens.models.load_lrm` attaches the format (and the registry entry)
to the bridge it returns; a bridge built by hand gets one with :func:`attach`. Nothing is
set on the model: the association is a weak mapping dropped with the model, and every
function that needs the format (``Trace.from_text(text, model)``, StepFlow, generation)
reads it back with :func:`info_of`.

Examples
--------
>>> import tempfile
>>> from stepsal_lens import attach, info_of, load_lrm
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("qwen2", tempfile.mkdtemp()), format="think-tags")
>>> info_of(model).format.name
'think-tags'
>>> attach(model, "qwq").format.name  # re-associate (e.g. a bridge built by hand)
'qwq'
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

from stepsal_lens.errors import StepSalError
from stepsal_lens.segments.formats import ReasoningFormat, get_format, list_formats

__all__ = ["ModelInfo", "attach", "format_of", "info_of", "model_name"]


@dataclass(frozen=True)
class ModelInfo:
    """What stepsal_lens knows about a loaded model: its reasoning format, its registry
    entry (None for a local checkpoint that is not registered), where it came from and the
    fingerprint of its files (:func:`~stepsal_lens.fingerprint.file_fingerprint`; None
    when it was not loaded from a folder)."""

    format: ReasoningFormat
    spec: Any = None  # a lens.models.ModelSpec (None for an unregistered checkpoint)
    source: str = ""
    fingerprint: str | None = None

    @property
    def name(self) -> str:
        """The registry name, else the source folder or hub name."""
        return self.spec.name if self.spec is not None else self.source


# Keyed by the model object itself and dropped with it: nothing is set on the bridge.
_ATTACHED: weakref.WeakKeyDictionary[Any, ModelInfo] = weakref.WeakKeyDictionary()


def attach(model: Any, format: str | ReasoningFormat, *, spec: Any = None,
           source: str = "", fingerprint: str | None = None) -> ModelInfo:
    """Associate a reasoning format (and registry entry) with a bridge you built yourself.

    :func:`load_lrm` does this for you; every function that needs the format
    (``Trace.from_text(text, model)``, :func:`~stepsal_lens.lens.stepflow`, generation) reads
    it back with :func:`info_of`.
    """
    fmt = get_format(format)
    fmt.check_tokenizer(model.tokenizer)
    info = ModelInfo(fmt, spec, source, fingerprint)
    _ATTACHED[model] = info
    return info


def info_of(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` of a model loaded with :func:`load_lrm` (or :func:`attach`)."""
    try:
        return _ATTACHED[model]
    except (KeyError, TypeError):
        raise StepSalError(
            f"{type(model).__name__} has no reasoning format attached; load it with "
            f"stepsal_lens.load_lrm(...), or call stepsal_lens.attach(model, format=...) "
            f"(one of {list_formats()})") from None


def model_name(model: Any) -> str:
    """A model's registry name or source (what result files record)."""
    info = _ATTACHED.get(model) if not isinstance(model, (str, os.PathLike)) else None
    if info is not None and info.name:
        return info.name
    return str(getattr(getattr(model, "cfg", None), "model_name", "") or model)


def format_of(model: Any) -> ReasoningFormat | None:
    """The reasoning format attached to a model (None if it has none)."""
    try:
        return _ATTACHED[model].format
    except (KeyError, TypeError):
        return None
