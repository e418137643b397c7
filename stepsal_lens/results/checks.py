"""Checks of result files: everything read from a folder is untrusted.

The loaders (:meth:`StepSaliency.load <stepsal_lens.StepSaliency.load>`,
:meth:`StepEffects.load <stepsal_lens.StepEffects.load>`,
:meth:`ReceiverHeads.load <stepsal_lens.results.effects.ReceiverHeads.load>`) check every
field before anything is built, through the :class:`FileCheck` of the file it came from:
a failure is one :class:`~stepsal_lens.StepSalError` naming the file, the field, the bad
value and the fix. A tampered or foreign folder fails at load, never later as a wrong
number or as markup in a notebook.

Examples
--------
>>> from pathlib import Path
>>> check = FileCheck(Path("run/steps.json"), FIX_ANALYZE)
>>> check.integer("steps[1].token_end", 7, low=0, high=6)
Traceback (most recent call last):
...
stepsal_lens.errors.StepSalError: 'run/steps.json': steps[1].token_end is 7, must be in [0, 6]; this folder was not written by stepsal or was edited: re-run `stepsal analyze`
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from stepsal_lens.errors import StepSalError
from stepsal_lens.segments.trace import SEGMENTS, Step

__all__ = ["FIX_ANALYZE", "FIX_EFFECTS", "FIX_RECEIVERS", "FileCheck", "read_json",
           "read_safetensors"]

_FOREIGN = "this folder was not written by stepsal or was edited"
#: The fix each loader names.
FIX_ANALYZE = f"{_FOREIGN}: re-run `stepsal analyze`"
FIX_EFFECTS = f"{_FOREIGN}: re-run `stepsal effects`"
FIX_RECEIVERS = f"{_FOREIGN}: compute it again with receiver_heads(...) and ReceiverHeads.save"


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class FileCheck:
    """Field checks of one file; each failure raises naming the file, the field, the
    value and ``fix``.

    Parameters
    ----------
    path
        The file the fields come from.
    fix
        What to do about a bad file (e.g. :data:`FIX_ANALYZE`).
    """

    def __init__(self, path: Path, fix: str):
        self.path, self.fix = Path(path), fix

    def fail(self, message: str) -> NoReturn:
        """Raise ``'FILE': message; fix``."""
        raise StepSalError(f"{str(self.path)!r}: {message}; {self.fix}")

    def says(self, message: str) -> NoReturn:
        """Raise ``'FILE' message; fix`` (a sentence with the file as its subject)."""
        raise StepSalError(f"{str(self.path)!r} {message}; {self.fix}")

    def bad(self, field: str, value: Any, rule: str) -> NoReturn:
        """Raise ``'FILE': FIELD is VALUE, RULE; fix``."""
        self.fail(f"{field} is {_show(value)}, {rule}")

    # ---- JSON fields ----------------------------------------------------------------------
    def key(self, doc: dict[str, Any], key: str, where: str = "") -> Any:
        """``doc[key]``, refused when missing."""
        if key not in doc:
            self.fail(f"{where or 'the document'} has no {key!r}")
        return doc[key]

    def integer(self, field: str, value: Any, *, low: int | None = None,
                high: int | None = None) -> int:
        """An ``int`` (never a bool, float or string) in ``[low, high]``."""
        if not isinstance(value, int) or isinstance(value, bool):
            self.bad(field, value, f"must be an integer (got {type(value).__name__})")
        if low is not None and low == high and value != low:
            self.bad(field, value, f"must be {low}")
        if (low is not None and value < low) or (high is not None and value > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            self.bad(field, value, f"must be in [{lo}, {hi}]")
        return value

    def string(self, field: str, value: Any, *, optional: bool = False) -> str | None:
        """A ``str`` (or None where ``optional``)."""
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.bad(field, value, f"must be a string (got {type(value).__name__})")
        return value

    def obj(self, field: str, value: Any, *, optional: bool = False) -> dict[str, Any]:
        """A JSON object (None -> ``{}`` where ``optional``)."""
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            self.bad(field, value, f"must be a JSON object (got {type(value).__name__})")
        return value

    def layer_list(self, field: str, value: Any, *, count: int,
                   n_layers: int | None) -> list[int]:
        """``count`` distinct increasing layer indices, inside ``[0, n_layers)`` when the
        model's layer count is known."""
        if not isinstance(value, list) or len(value) != count:
            self.fail(f"{field!r} must list {count} layer indices (one per map); got "
                      f"{_show(value)}")
        high = None if n_layers is None else n_layers - 1
        for i, layer in enumerate(value):
            self.integer(f"{field}[{i}]", layer, low=0, high=high)
        if any(b <= a for a, b in zip(value, value[1:])):
            self.bad(field, value, "must be increasing, each layer once")
        return list(value)

    def steps(self, docs: Any, n_tokens: int, field: str = "steps") -> list[Step]:
        """The steps of a trace: each a JSON object with an ``index`` equal to its
        position, a known ``segment`` (segments in the order question, thinking,
        summary), a ``text`` string and a non-empty token span inside the ``n_tokens``
        saved ids, after the previous step's span (ordered, non-overlapping)."""
        if not isinstance(docs, list):
            self.bad(field, docs, "must be a list of steps")
        keys = ("index", "segment", "text", "token_start", "token_end")
        steps, last_end, last_rank = [], 0, 0
        for i, st in enumerate(docs):
            where = f"{field}[{i}]"
            if not isinstance(st, dict) or any(k not in st for k in keys):
                self.fail(f"step {i} needs the keys {list(keys)}; got "
                          f"{_show(sorted(st) if isinstance(st, dict) else st)}")
            self.integer(f"{where}.index", st["index"], low=i, high=i)
            segment = st["segment"]
            if segment not in SEGMENTS:
                self.bad(f"{where}.segment", segment, f"must be one of {list(SEGMENTS)}")
            rank = SEGMENTS.index(segment)
            if rank < last_rank:
                self.bad(f"{where}.segment", segment,
                         f"but step {i - 1} is {SEGMENTS[last_rank]!r}: steps run question, "
                         f"thinking, summary")
            self.string(f"{where}.text", st["text"])
            a, b = st["token_start"], st["token_end"]
            self.integer(f"{where}.token_start", a)
            self.integer(f"{where}.token_end", b)
            if b < a:
                self.fail(f"step {i} spans tokens {a}-{b}: the end comes before the start")
            if not 0 <= a <= b <= n_tokens:
                self.fail(f"step {i} spans tokens {a}-{b}, outside the {n_tokens} saved "
                          f"token ids")
            if a == b:
                self.fail(f"step {i} spans tokens {a}-{b}: no token (every step has at "
                          f"least one)")
            if a < last_end:
                self.fail(f"step {i} spans tokens {a}-{b}, overlapping or before step "
                          f"{i - 1} (ending at {last_end}); steps are ordered and disjoint")
            cs, ce = st.get("char_start", -1), st.get("char_end", -1)
            self.integer(f"{where}.char_start", cs, low=-1)
            self.integer(f"{where}.char_end", ce, low=-1)
            if (cs == -1) != (ce == -1) or ce < cs:
                self.fail(f"step {i} has characters {cs}-{ce}; a character span is "
                          f"start <= end (or -1, -1 where unknown)")
            steps.append(Step(i, segment, st["text"], (cs, ce), (a, b)))
            last_end, last_rank = b, rank
        return steps

    # ---- tensors ----------------------------------------------------------------------------
    def float_tensor(self, name: str, t: Tensor, dims: Sequence[str], *,
                     allow_nan: bool = False) -> Tensor:
        """A float tensor of ``len(dims)`` dimensions, finite (NaN too where
        ``allow_nan``) and non-negative."""
        if t.dim() != len(dims) or not t.dtype.is_floating_point:
            self.fail(f"{name} must be a {len(dims)}-d float tensor [{', '.join(dims)}]; got "
                      f"{t.dtype} of shape {tuple(t.shape)}")
        bad = torch.isinf(t) if allow_nan else ~torch.isfinite(t)
        if bool(bad.any()):
            what = "infinite" if allow_nan else "NaN or infinite"
            self.fail(f"{int(bad.sum())} values of {name} are {what}; stepsal never saves "
                      f"them non-finite, so the file was altered")
        negative = t < 0
        if bool(negative.any()):
            self.fail(f"{int(negative.sum())} values of {name} are negative (e.g. "
                      f"{float(t[negative][0]):.4g}); saliency, attention and effects are never "
                      f"below 0")
        return t.float()

    def token_ids(self, ids: Tensor, vocab: int | None = None) -> Tensor:
        """A non-empty 1-d integer tensor of ids in ``[0, vocab)``."""
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool \
                or ids.dtype.is_complex:
            self.fail(f"token_ids must be a 1-d integer tensor; got {ids.dtype} of shape "
                      f"{tuple(ids.shape)}")
        if len(ids) == 0:
            self.fail("token_ids is empty; a trace has at least one token")
        low, high = int(ids.min()), int(ids.max())
        if low < 0:
            self.fail(f"token_ids holds the negative id {low}; ids are >= 0")
        if vocab is not None and high >= vocab:
            self.fail(f"token_ids holds the id {high}, outside the model's vocabulary of "
                      f"{vocab}")
        return ids.long()


def read_safetensors(path: Path, fix: str, required: Sequence[str]) -> dict[str, Tensor]:
    """Tensors of a safetensors file, refused when unreadable or lacking ``required``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise StepSalError(f"{str(path)!r} is not a readable safetensors file ({err}); {fix}"
                           ) from None
    missing = sorted(set(required) - set(tensors))
    if missing:
        raise StepSalError(f"{str(path)!r} lacks the tensor(s) {missing}; {fix}")
    return tensors


def read_json(path: Path, fix: str) -> Any:
    """The JSON document in ``path``, refused when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise StepSalError(f"{str(path)!r} is not valid JSON ({err}); {fix}") from None
