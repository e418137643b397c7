"""Session fixtures: tiny random checkpoints of every supported architecture.

Each checkpoint is a real Hugging Face folder (config.json, safetensors, tokenizer.json
from a tokenizer trained with `tokenizers`), loaded through the real `load_lrm`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402

from stepsal_lens.zoo.tiny_random import make_random_checkpoint, train_tokenizer  # noqa: E402

#: architecture -> the reasoning format its real models use
ARCH_FORMATS = {"qwen2": "deepseek-r1", "llama": "deepseek-r1", "qwen3": "qwen3", "gpt-oss": "gpt-oss"}


@pytest.fixture(scope="session")
def arch_formats():
    """architecture -> format (modules import no conftest: tests/realistic has its own)."""
    return dict(ARCH_FORMATS)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer):
    """architecture -> folder of a 2-layer, d_model 64, 4-head (2 kv heads) model."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: make_random_checkpoint(arch, root / arch, tokenizer=tokenizer, seed=i)
            for i, arch in enumerate(ARCH_FORMATS)}


@pytest.fixture(scope="session")
def models(checkpoints):
    """architecture -> loaded bridge (compatibility mode), loaded once per session."""
    from stepsal_lens import get_format, load_lrm

    # gpt-oss's system message carries today's date: fix it so the tests see the same
    # tokens every day.
    fmts = {arch: get_format(name) for arch, name in ARCH_FORMATS.items()}
    fmts["gpt-oss"] = fmts["gpt-oss"].with_options(current_date="2025-08-05")
    return {arch: load_lrm(path, device="cpu", format=fmts[arch])
            for arch, path in checkpoints.items()}


@pytest.fixture(params=list(ARCH_FORMATS))
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_lrm():
    """The bundled trained model (it writes real thinking steps)."""
    from stepsal_lens import load_lrm

    return load_lrm("tiny-lrm", device="cpu")
