"""The one exception type of stepsal_lens."""

from __future__ import annotations

__all__ = ["StepSalError"]


class StepSalError(ValueError):
    """Bad input or an unsupported situation.

    Messages repeat what the caller passed and name the fix or the valid options.
    Subclasses ``ValueError`` so generic handlers still catch it.
    """
