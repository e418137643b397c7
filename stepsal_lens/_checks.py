"""The one home of argument checks: types at the public boundary and numeric ranges.

Every public entry point and every command-line flag checks its arguments with these
functions, so a bad value gives the same :class:`~stepsal_lens.StepSalError` wherever it
enters: the message names the argument, repeats what it got and says what it wants.
Nothing is coerced: ``True`` is not a whole number, ``"12"`` is not a list of layers,
``1.5`` is not a layer index.

Examples
--------
>>> from stepsal_lens._checks import check_layer_list, check_temperature
>>> check_layer_list([3, 1, 1], "layers")
(1, 3)
>>> check_layer_list("12", "oeb_layers")
Traceback (most recent call last):
...
stepsal_lens.errors.StepSalError: oeb_layers must be a list of whole-number layer indices like [0, 1, 2]; got the str '12'
>>> check_temperature(1e-45)
Traceback (most recent call last):
...
stepsal_lens.errors.StepSalError: temperature must be 0 (greedy) or between 0.0001 and 100; got 1e-45 (below 0.0001 the logits divided by it overflow to inf)
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stepsal_lens.errors import StepSalError

__all__ = [
    "MAX_GRADING_TIMEOUT",
    "MAX_ID_CHARS",
    "MAX_SEED",
    "MIN_TEMPERATURE",
    "check_count",
    "check_id",
    "check_layer_list",
    "check_number",
    "check_seed",
    "check_temperature",
    "check_timeout",
    "check_type",
    "check_whole",
    "describe_value",
    "read_utf8",
]

#: Smallest sampling temperature above 0: logits / 1e-4 stay finite in float32 for any
#: logit below 3e34, while a subnormal temperature (1e-45) turns them into inf and NaN.
MIN_TEMPERATURE = 1e-4
#: Largest temperature: beyond it sampling is uniform noise.
MAX_TEMPERATURE = 100.0
#: Seeds are 63-bit: torch's generator takes up to 2**64 - 1, and ``seed + batch`` must fit.
MAX_SEED = 2**63 - 1
#: Longest grading time limit (one day): ``select`` and ``SIGALRM`` refuse larger ones.
MAX_GRADING_TIMEOUT = 86_400.0
#: Longest problem / trace id: ids name files and folders (255 bytes on most file systems).
MAX_ID_CHARS = 200


def describe_value(value: Any) -> str:
    """``the str 'abc'``: a value's type and (shortened) repr, for messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"the {type(value).__name__} {text}"


def check_type(value: Any, types: type | tuple[type, ...], name: str, want: str,
               fix: str = "") -> Any:
    """``value`` if it is an instance of ``types`` (``bool`` never counts as a number).

    ``want`` says what is expected in words (``"a Trace"``), ``fix`` how to get one.
    """
    ok = isinstance(value, types)
    if ok and isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                       else (types,)):
        ok = False
    if not ok:
        tail = f"; {fix}" if fix else ""
        raise StepSalError(f"{name} must be {want}; got {describe_value(value)}{tail}")
    return value


def check_whole(value: Any, name: str, *, low: int | None = None,
                high: int | None = None, fix: str = "") -> int:
    """A whole number (not a bool, not a float) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StepSalError(f"{name} must be a whole number; got {describe_value(value)}"
                           + (f"; {fix}" if fix else ""))
    if (low is not None and value < low) or (high is not None and value > high):
        span = (f">= {low}" if high is None else f"<= {high}" if low is None
                else f"between {low} and {high}")
        raise StepSalError(f"{name} must be a whole number {span}; got {value}"
                           + (f"; {fix}" if fix else ""))
    return int(value)


def check_count(value: Any, name: str) -> int:
    """A whole number >= 1 (tokens, problems, samples, batch size)."""
    return check_whole(value, name, low=1)


def check_number(value: Any, name: str, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, fix: str = "") -> float:
    """A finite real number (int or float, not a bool) in ``[low, high]`` (``(low, high]``
    with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StepSalError(f"{name} must be a number; got {describe_value(value)}"
                           + (f"; {fix}" if fix else ""))
    value = float(value)
    bad = not math.isfinite(value) or (low is not None and (value <= low if low_open
                                                             else value < low)) \
        or (high is not None and value > high)
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        span = " and ".join(s for s in (lo, hi) if s)
        raise StepSalError(f"{name} must be a finite number{' ' + span if span else ''}; "
                           f"got {value!r}" + (f"; {fix}" if fix else ""))
    return value


def check_temperature(value: Any, name: str = "temperature") -> float:
    """0 (greedy) or a temperature in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``."""
    value = check_number(value, name, low=0.0)
    if value != 0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        why = (f" (below {MIN_TEMPERATURE:g} the logits divided by it overflow to inf)"
               if value < MIN_TEMPERATURE else "")
        raise StepSalError(f"{name} must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                           f"{MAX_TEMPERATURE:g}; got {value!r}{why}")
    return value


def check_seed(value: Any, name: str = "seed", *, batches: int = 1) -> int:
    """A seed in ``[0, MAX_SEED]`` that still fits after ``+ batches - 1``."""
    return check_whole(value, name, low=0, high=MAX_SEED - max(batches - 1, 0),
                       fix="seeds are 63-bit whole numbers (torch's generator takes no more)")


def check_timeout(value: Any, name: str = "timeout") -> float:
    """A time limit in seconds: finite, > 0, at most :data:`MAX_GRADING_TIMEOUT`."""
    return check_number(value, name, low=0.0, low_open=True, high=MAX_GRADING_TIMEOUT,
                        fix="pass seconds, e.g. 10")


def check_id(value: Any, name: str = "id") -> str:
    """An id that can name a file: a non-empty string of at most :data:`MAX_ID_CHARS`."""
    if not isinstance(value, str) or not value.strip():
        raise StepSalError(f"{name} must be a non-empty string; got {describe_value(value)}")
    if len(value) > MAX_ID_CHARS:
        raise StepSalError(f"{name} has {len(value)} characters (at most {MAX_ID_CHARS}: ids "
                           f"name files and folders); got {value[:40]!r}...; shorten it")
    return value


def check_layer_list(value: Any, name: str, n_layers: int | None = None, *,
                     allow_empty: bool = False) -> tuple[int, ...]:
    """A sorted tuple of distinct layer indices (the one layer validator of the package).

    ``value`` must be a list, tuple, range or set of whole numbers (not a string, not
    floats, not bools), each in ``[0, n_layers)`` when ``n_layers`` is given, and
    non-empty unless ``allow_empty``.
    """
    fix = "a list of whole-number layer indices like [0, 1, 2]"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) \
            or isinstance(value, dict):
        raise StepSalError(f"{name} must be {fix}; got {describe_value(value)}")
    items = list(value)
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise StepSalError(f"{name} must be {fix}; got {items!r} "
                           f"({describe_value(bad[0])} is not a layer index)")
    if not items and not allow_empty:
        raise StepSalError(f"{name} is empty; pass {fix}, or None for the default")
    layers = tuple(sorted({int(v) for v in items}))
    top = "" if n_layers is None else f" below {n_layers}"
    out = [v for v in layers if v < 0 or (n_layers is not None and v >= n_layers)]
    if out:
        where = "" if n_layers is None else f" for a model with {n_layers} layers"
        raise StepSalError(f"{name} {out} are not valid layer indices{where}; pass "
                           f"non-negative indices{top}")
    return layers


def read_utf8(path: str | Path, what: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped), or one error that
    names the file and the encoding it seems to be in (UTF-16, UTF-32, Latin-1).

    ``what`` names the file in messages (``"trace file"``, ``"prompt file"``).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StepSalError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise StepSalError(f"{what} {str(path)!r} is a folder; pass a file") from None
    except OSError as err:
        raise StepSalError(f"cannot read {what} {str(path)!r}: {err.strerror or err}") from None
    fix = (f"save it as UTF-8 (e.g. iconv -f ENCODING -t UTF-8 {path.name} > new-file, or "
           f"in Python open(..., encoding='utf-8'))")
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if data.startswith(bom):
            raise StepSalError(f"{what} {str(path)!r} is {name} text (it starts with a "
                               f"{name} byte-order mark), not UTF-8; {fix}")
    if data[:2000].count(0) > len(data[:2000]) // 4:
        raise StepSalError(f"{what} {str(path)!r} is not UTF-8 text (a quarter of its bytes "
                           f"are zero: UTF-16 or UTF-32 without a byte-order mark?); {fix}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise StepSalError(f"{what} {str(path)!r} is not UTF-8 text: byte "
                           f"0x{data[err.start]:02x} at line {line} is not UTF-8 (Latin-1 or "
                           f"Windows-1252?); {fix}") from None
