"""Content fingerprints: what a run was made from, by content rather than by path.

A run folder records the fingerprint of its data file and of its model (weights, config
and tokenizer files); a resume or a comparison whose inputs have another fingerprint is
refused, naming what changed. A path alone proves nothing: the same path can hold an
edited data file or another checkpoint.

Files up to :data:`FULL_HASH_BYTES` are hashed whole. Larger files (weight shards of many
GB) are hashed by their size, their first and last MiB (a safetensors header names every
tensor, its dtype, shape and offsets) and 64 blocks of 4 KiB spread evenly over the
rest: another checkpoint of the same shapes differs in every block, and a 30 GB model is
fingerprinted in milliseconds. Bit-flips in a single unread block are not detected; that
is not what the fingerprint is for (the loaders check files' integrity).

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> f = Path(tempfile.mkdtemp()) / "data.jsonl"
>>> _ = f.write_text('{"question": "1+1", "answer": "2"}\\n')
>>> a = fingerprint(f)
>>> _ = f.write_text('{"question": "1+1", "answer": "3"}\\n')
>>> a == fingerprint(f), a[:7]
(False, 'sha256:')
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from stepsal_lens.errors import StepSalError

__all__ = ["FULL_HASH_BYTES", "fingerprint"]

#: Files up to this size are hashed whole.
FULL_HASH_BYTES = 64 << 20
_EDGE, _BLOCK, _N_BLOCKS = 1 << 20, 4096, 64


def _update_with_file(h: "hashlib._Hash", path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{size}\n".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return
        h.update(f.read(_EDGE))
        inner = size - 2 * _EDGE
        for k in range(_N_BLOCKS):
            f.seek(_EDGE + inner * k // _N_BLOCKS)
            h.update(f.read(_BLOCK))
        f.seek(size - _EDGE)
        h.update(f.read(_EDGE))


def fingerprint(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's content, or of a folder's files (names and content,
    hidden files and ``__pycache__`` left out), symlinks followed.

    Parameters
    ----------
    path
        A data file or a checkpoint folder.

    Returns
    -------
    str
        Equal for equal content wherever it lies; different when any file's content
        (see the module's note on large files), name or size differs.
    """
    path = Path(path)
    h = hashlib.sha256()
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") or part == "__pycache__"
                for part in p.relative_to(path).parts))
            for p in files:
                h.update(p.relative_to(path).as_posix().encode() + b"\0")
                _update_with_file(h, p)
        else:
            _update_with_file(h, path)
    except OSError as err:
        raise StepSalError(f"cannot read {str(path)!r} to fingerprint it: "
                           f"{err.strerror or err}") from None
    return "sha256:" + h.hexdigest()
