"""Tokenizer fingerprints: which tokenizer a trace's token ids belong to.

A :class:`~stepsal_lens.Trace` records the fingerprint of the tokenizer that cut it, and
the functions that run a model on a trace refuse a model whose tokenizer has another
fingerprint (the same ids would mean other text to it). The fingerprint is a sha256 of
the fast tokenizer's serialised vocabulary, merges, added/special tokens, normaliser,
pre-tokeniser, post-processor and decoder (``backend_tokenizer.to_str()`` without its
truncation and padding settings, which calls change); it is computed once per tokenizer
object (again only when tokens are added).

Examples
--------
>>> from stepsal_lens.zoo.tiny_random import train_tokenizer
>>> tok = train_tokenizer()
>>> fp = tokenizer_fingerprint(tok)
>>> fp.startswith("sha256:"), len(fp), fp == tokenizer_fingerprint(train_tokenizer())
(True, 23, True)
>>> fp == tokenizer_fingerprint(train_tokenizer(vocab_size=500))
False
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

from stepsal_lens.errors import StepSalError

__all__ = ["tokenizer_fingerprint"]

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
