"""Load reasoning models into TransformerLens 4 (``TransformerBridge``, compatibility mode).

:func:`load_lrm` takes a hub name from the registry (:func:`list_models`) or a local
checkpoint folder (``config.json``, weights, tokenizer). The model's reasoning format
travels with it as ``model.stepsal_format`` (see :func:`format_of`).

Examples
--------
>>> import tempfile
>>> from stepsal_lens import load_lrm
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("llama", tempfile.mkdtemp()), format="deepseek-r1")
>>> model.stepsal_format.name, model.cfg.n_layers
('deepseek-r1', 2)
>>> "blocks.0.attn.hook_pattern" in model.hook_dict
True
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stepsal_lens._registry import Registry
from stepsal_lens.errors import StepSalError
from stepsal_lens.formats import ReasoningFormat, get_format, list_formats

__all__ = [
    "ModelSpec",
    "SUPPORTED_ARCHITECTURES",
    "default_layer_split",
    "detect_format",
    "format_of",
    "list_models",
    "load_lrm",
    "register_model",
]

#: Hugging Face architecture classes whose TransformerLens adapters we verified.
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM",
                           "GptOssForCausalLM")


@dataclass(frozen=True)
class ModelSpec:
    """A known reasoning model: hub name, family, format and size."""

    name: str
    family: str
    format: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    params: str

    @property
    def layer_split(self) -> dict[str, list[int]]:
        return default_layer_split(self.n_layers)


def default_layer_split(n_layers: int) -> dict[str, list[int]]:
    """The paper's layer split: OEB on the bottom quarter, SMI on the top quarter.

    >>> default_layer_split(28)
    {'oeb': [0, 1, 2, 3, 4, 5, 6], 'smi': [21, 22, 23, 24, 25, 26, 27]}
    """
    q = math.ceil(n_layers / 4)
    return {"oeb": list(range(q)), "smi": list(range(n_layers - q, n_layers))}


_R1 = "deepseek-ai/DeepSeek-R1-Distill-"
#: Models shipped inside the package: name -> folder.
BUNDLED: dict[str, Path] = {"tiny-lrm": Path(__file__).parent / "zoo" / "tiny_lrm"}
_MODELS: Registry[ModelSpec] = Registry("model", "pass a local checkpoint folder")


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
    """Add a model to the registry (``overwrite=True`` to replace one)."""
    get_format(spec.format)
    return _MODELS.register(spec.name, spec, overwrite=overwrite)


for _spec in (
    ModelSpec(_R1 + "Qwen-1.5B", "deepseek-r1", "deepseek-r1", "Qwen2ForCausalLM", 28, 12, 2, "1.5B"),
    ModelSpec(_R1 + "Qwen-7B", "deepseek-r1", "deepseek-r1", "Qwen2ForCausalLM", 28, 28, 4, "7B"),
    ModelSpec(_R1 + "Qwen-14B", "deepseek-r1", "deepseek-r1", "Qwen2ForCausalLM", 48, 40, 8, "14B"),
    ModelSpec(_R1 + "Qwen-32B", "deepseek-r1", "deepseek-r1", "Qwen2ForCausalLM", 64, 40, 8, "32B"),
    ModelSpec(_R1 + "Llama-8B", "deepseek-r1", "deepseek-r1", "LlamaForCausalLM", 32, 32, 8, "8B"),
    ModelSpec("Qwen/QwQ-32B", "qwq", "qwq", "Qwen2ForCausalLM", 64, 40, 8, "32B"),
    ModelSpec("Qwen/Qwen3-0.6B", "qwen3", "qwen3", "Qwen3ForCausalLM", 28, 16, 8, "0.6B"),
    ModelSpec("Qwen/Qwen3-1.7B", "qwen3", "qwen3", "Qwen3ForCausalLM", 28, 16, 8, "1.7B"),
    ModelSpec("Qwen/Qwen3-4B", "qwen3", "qwen3", "Qwen3ForCausalLM", 36, 32, 8, "4B"),
    ModelSpec("Qwen/Qwen3-8B", "qwen3", "qwen3", "Qwen3ForCausalLM", 36, 32, 8, "8B"),
    ModelSpec("Qwen/Qwen3-14B", "qwen3", "qwen3", "Qwen3ForCausalLM", 40, 40, 8, "14B"),
    ModelSpec("Qwen/Qwen3-32B", "qwen3", "qwen3", "Qwen3ForCausalLM", 64, 64, 8, "32B"),
    ModelSpec("tiny-lrm", "tiny", "think-tags", "Qwen2ForCausalLM", 4, 4, 2, "1.0M (bundled)"),
    ModelSpec("openai/gpt-oss-20b", "gpt-oss", "gpt-oss", "GptOssForCausalLM", 24, 64, 8, "21B (3.6B active)"),
):
    register_model(_spec)


def list_models():
    """The registry as a DataFrame: name, family, format, architecture, size, layer split.

    >>> df = list_models()
    >>> df.loc[df.name == "Qwen/QwQ-32B", "format"].item()
    'qwq'
    """
    import pandas as pd

    rows = []
    for spec in _MODELS.values():
        split = spec.layer_split
        rows.append({**asdict(spec), "oeb_layers": f"0-{split['oeb'][-1]}",
                     "smi_layers": f"{split['smi'][0]}-{split['smi'][-1]}"})
    return pd.DataFrame(rows)


def format_of(model: Any) -> ReasoningFormat | None:
    """The reasoning format attached to a model by :func:`load_lrm` (None otherwise)."""
    return getattr(model, "stepsal_format", None)


def detect_format(tokenizer: Any, architecture: str | None = None) -> str | None:
    """Guess the reasoning format from the tokenizer's special tokens.

    Returns None when no known marker set is present.
    """
    vocab = set(tokenizer.get_vocab())
    if {"<|channel|>", "<|message|>", "<|start|>"} <= vocab:
        return "gpt-oss"
    if "<｜Assistant｜>" in vocab and "<think>" in vocab:
        return "deepseek-r1"
    if "<|im_start|>" in vocab and "<think>" in vocab:
        return "qwen3" if architecture == "Qwen3ForCausalLM" else "qwq"
    if "<think>" in vocab:
        return "think-tags"
    return None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise StepSalError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _check_local(path: Path) -> str:
    """Validate a checkpoint folder and return its architecture."""
    if not path.is_dir():
        raise StepSalError(f"{str(path)!r} is not a folder; pass a checkpoint folder or a hub name")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise StepSalError(f"no config.json in {str(path)!r}; a checkpoint folder needs "
                           f"config.json, weights and tokenizer files (save_pretrained writes them)")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise StepSalError(f"no tokenizer in {str(path)!r} (tokenizer.json or "
                           f"tokenizer_config.json); save the tokenizer with "
                           f"tokenizer.save_pretrained(path)")
    archs = json.loads(cfg_file.read_text()).get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise StepSalError(f"architecture {arch!r} of {str(path)!r} is not supported; "
                           f"supported: {list(SUPPORTED_ARCHITECTURES)}")
    return arch


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "ON")


def _resolve_hub(name: str) -> str:
    """A cached local folder for a hub name, or the name itself when it may download."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached (the hub library raises several types here)
        if _hub_offline():
            raise StepSalError(
                f"{name!r} is not in the local Hugging Face cache and the hub is offline "
                f"(HF_HUB_OFFLINE is set); download it on a machine with network, or pass "
                f"a local checkpoint folder to load_lrm"
            ) from None
        return name


def load_lrm(name_or_path: str | os.PathLike, *, device: str | None = None,
             dtype: str | torch.dtype | None = None,
             format: str | ReasoningFormat | None = None, **boot_kwargs: Any):
    """Load a reasoning model as a TransformerLens ``TransformerBridge`` (compat mode).

    Parameters
    ----------
    name_or_path
        A local checkpoint folder, ``"tiny-lrm"`` (bundled), a registered hub name
        (:func:`list_models`), or any hub name of a supported architecture.
    device
        ``"cpu"``, ``"cuda"``, ...; defaults to CUDA when available.
    dtype
        ``torch.float32`` (default), ``"bfloat16"``, ``"float16"``.
    format
        Reasoning format name; by default the registry's, else detected from the
        tokenizer's special tokens.
    **boot_kwargs
        Passed to ``TransformerBridge.boot_transformers`` (e.g. ``device_map="auto"``).

    Returns
    -------
    transformer_lens.model_bridge.TransformerBridge
        With ``enable_compatibility_mode()`` applied and ``stepsal_format`` /
        ``stepsal_spec`` attributes.
    """
    from transformer_lens.model_bridge import TransformerBridge

    name = os.fspath(name_or_path)
    spec = _MODELS.get(name) if name in _MODELS else None
    local = BUNDLED.get(name, Path(name).expanduser())
    if name in BUNDLED and not (local / "config.json").exists():
        raise StepSalError(f"the bundled {name!r} weights are missing from {str(local)!r}; "
                           f"reinstall stepsal-lens or train them with "
                           f"`python -m stepsal_lens.zoo.train --out {local}`")
    if local.exists():
        arch = _check_local(local)
        source = str(local)
    elif spec is not None or (name.count("/") == 1 and not name.startswith((".", "/", "~"))):
        source = _resolve_hub(name)
        arch = spec.architecture if spec else None
        if Path(source).is_dir():
            arch = _check_local(Path(source))
    else:
        raise StepSalError(
            f"{name!r} is neither a local folder nor a hub name; pass a checkpoint folder "
            f"or one of the registered models: {_MODELS.names()}"
        )
    fmt = get_format(format) if format is not None else (get_format(spec.format) if spec else None)
    if device is None and "device_map" not in boot_kwargs:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = TransformerBridge.boot_transformers(source, device=device, dtype=_dtype(dtype),
                                                    **boot_kwargs)
    except OSError as err:
        raise StepSalError(f"could not load {name!r}: {err}. Without network, pass a local "
                           f"checkpoint folder") from err
    if fmt is None:
        detected = detect_format(model.tokenizer, arch)
        if detected is None:
            raise StepSalError(
                f"cannot tell the reasoning format of {name!r} from its tokenizer (no "
                f"<think> or harmony markers); pass format=... (one of {list_formats()})"
            )
        fmt = get_format(detected)
    model.enable_compatibility_mode(no_processing=True)
    model.eval()
    model.stepsal_format = fmt
    model.stepsal_spec = spec
    return model
