"""Fingerprints: what a result was made from, by content rather than by name or path.

* :func:`tokenizer_fingerprint`: which tokenizer a trace's token ids belong to. A
  :class:`~stepsal_lens.Trace` records the fingerprint of the tokenizer that cut it, and
  the functions that run a model on a trace refuse a model whose tokenizer has another
  fingerprint (the same ids would mean other text to it). It is a sha256 of the fast
  tokenizer's serialised vocabulary, merges, added/special tokens, normaliser,
  pre-tokeniser, post-processor and decoder (``backend_tokenizer.to_str()`` without its
  truncation and padding settings, which calls change); computed once per tokenizer
  object (again only when tokens are added).
* :func:`file_fingerprint`: a data file or a checkpoint folder. A run folder records the
  fingerprint of its data file and of its model (weights, config and tokenizer files); a
  resume or a comparison whose inputs have another fingerprint is refused, naming what
  changed. A path alone proves nothing: the same path can hold an edited data file or
  another checkpoint. Files up to :data:`FULL_HASH_BYTES` are hashed whole; larger files
  (weight shards of many GB) by their size, their first and last MiB (a safetensors
  header names every tensor, its dtype, shape and offsets) and 64 blocks of 4 KiB spread
  evenly over the rest: another checkpoint of the same shapes differs in every block,
  and a 30 GB model is fingerprinted in milliseconds. A bit-flip in a single unread
  block is not detected; that is not what it is for (the loaders check integrity).

Examples
--------
>>> from stepsal_lens.zoo.tiny_random import train_tokenizer
>>> tok = train_tokenizer()
>>> fp = tokenizer_fingerprint(tok)
>>> fp.startswith("sha256:"), len(fp), fp == tokenizer_fingerprint(train_tokenizer())
(True, 23, True)
>>> fp == tokenizer_fingerprint(train_tokenizer(vocab_size=500))
False
>>> import tempfile
>>> from pathlib import Path
>>> f = Path(tempfile.mkdtemp()) / "data.jsonl"
>>> _ = f.write_text('{"question": "1+1", "answer": "2"}\\n')
>>> a = file_fingerprint(f)
>>> _ = f.write_text('{"question": "1+1", "answer": "3"}\\n')
>>> a == file_fingerprint(f), a[:7]
(False, 'sha256:')
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Any

from stepsal_lens.errors import StepSalError

__all__ = ["FULL_HASH_BYTES", "file_fingerprint", "tokenizer_fingerprint"]

# tokenizer -> (its length when hashed, fingerprint); entries go with their tokenizer
_CACHE: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()


def _serialised(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
        # `tokenizers` writes version, truncation, padding, then added_tokens onwards: drop
        # the settings part without parsing megabytes of vocabulary
        cut = text.find(',"added_tokens":')
        if text.startswith('{"version":') and cut > 0:
            return text[cut:]
        doc = json.loads(text)
        doc.pop("truncation", None)
        doc.pop("padding", None)
        return json.dumps(doc, sort_keys=True, ensure_ascii=False)
    if hasattr(tokenizer, "get_vocab"):
        return json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    raise StepSalError(f"cannot fingerprint {type(tokenizer).__name__}: it is not a Hugging "
                       f"Face tokenizer (no backend_tokenizer or get_vocab); pass a model "
                       f"from load_lrm or a fast tokenizer")


def tokenizer_fingerprint(model_or_tokenizer: Any) -> str:
    """``"sha256:"`` and 16 hex digits identifying a tokenizer's mapping between text and
    ids (see the module docstring for what it covers).

    Parameters
    ----------
    model_or_tokenizer
        A model from :func:`~stepsal_lens.load_lrm` (its ``tokenizer`` is used) or a
        Hugging Face tokenizer.

    Returns
    -------
    str
        Equal for tokenizers that map text to the same ids; cached per tokenizer object.
    """
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    tok = model_or_tokenizer if tok is None else tok
    size = len(tok) if hasattr(tok, "__len__") else -1
    try:
        cached = _CACHE.get(tok)
    except TypeError:  # not weak-referenceable or unhashable: no cache
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    digest = "sha256:" + hashlib.sha256(_serialised(tok).encode("utf-8")).hexdigest()[:16]
    try:
        _CACHE[tok] = (size, digest)
    except TypeError:
        pass
    return digest


# ---- files ----------------------------------------------------------------------------------

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


def file_fingerprint(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's content, or of the files directly in a folder
    (names and content; hidden files left out), symlinks followed.

    A checkpoint is the files at its top level (what ``from_pretrained`` reads), so a run
    folder someone keeps inside the checkpoint folder does not change its fingerprint.

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
            for p in sorted(p for p in path.iterdir()
                            if p.is_file() and not p.name.startswith(".")):
                h.update(p.name.encode() + b"\0")
                _update_with_file(h, p)
        else:
            _update_with_file(h, path)
    except OSError as err:
        raise StepSalError(f"cannot read {str(path)!r} to fingerprint it: "
                           f"{err.strerror or err}") from None
    return "sha256:" + h.hexdigest()
