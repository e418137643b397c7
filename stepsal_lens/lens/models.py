"""Load reasoning models into TransformerLens 4 (``TransformerBridge``, compatibility mode).

:func:`load_lrm` takes a hub name from the registry (:func:`list_models`) or a local
checkpoint folder (``config.json``, weights, tokenizer). The model's reasoning format
and registry entry are associated with it (:func:`info_of`, :func:`format_of`); the
model itself stays a plain ``TransformerBridge``.

Examples
--------
>>> import tempfile
>>> from stepsal_lens import info_of, load_lrm
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> model = load_lrm(make_random_checkpoint("llama", tempfile.mkdtemp()), format="deepseek-r1")
>>> info_of(model).format.name, model.cfg.n_layers
('deepseek-r1', 2)
>>> "blocks.0.attn.hook_pattern" in model.hook_dict
True
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stepsal_lens._registry import Registry
from stepsal_lens.errors import StepSalError
from stepsal_lens.results.config import default_layer_split
from stepsal_lens.fingerprint import file_fingerprint
from stepsal_lens.segments.association import attach
from stepsal_lens.segments.formats import ReasoningFormat, get_format, list_formats
from stepsal_lens._checks import check_type

__all__ = [
    "ModelSpec",
    "SUPPORTED_ARCHITECTURES",
    "check_device",
    "detect_format",
    "list_models",
    "load_lrm",
    "model_fingerprint",
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


_R1 = "deepseek-ai/DeepSeek-R1-Distill-"
#: Models shipped inside the package: name -> folder (the zoo registers ``tiny-lrm``).
BUNDLED: dict[str, Path] = {}
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


def require_hooks(model: Any, names: list[str]) -> None:
    """Refuse hook names the model does not have (TransformerLens ignores them silently)."""
    missing = sorted({n for n in names if n not in model.hook_dict})
    if missing:
        raise StepSalError(f"the model has no hook point(s) {missing[:5]}; hook names are "
                           f"checked against model.hook_dict (e.g. 'blocks.0.attn.hook_pattern')")


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


#: config.json keys every supported architecture needs (positive integers).
_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, or a StepSalError naming the file and what is wrong."""
    cfg_file = path / "config.json"
    fix = "re-save the checkpoint with model.save_pretrained(path) or download it again"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise StepSalError(f"{str(cfg_file)!r} is not valid JSON ({err}); {fix}") from None
    if not isinstance(cfg, dict):
        raise StepSalError(f"{str(cfg_file)!r} holds a JSON {type(cfg).__name__}, not an "
                           f"object of settings; {fix}")
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        raise StepSalError(f"{str(cfg_file)!r} lacks {missing} (every model config has "
                           f"{list(_CONFIG_KEYS)}); {fix}")
    bad = {k: cfg[k] for k in _CONFIG_KEYS
           if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1}
    if bad:
        raise StepSalError(f"{str(cfg_file)!r} has {bad}; these must be positive integers; {fix}")
    return cfg


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The header of a safetensors file, checked against the file's size."""
    import struct

    fix = "the file is damaged or incomplete: download or save the checkpoint again"
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StepSalError(f"{str(file)!r} is {size} bytes, too short for a safetensors "
                               f"file; {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise StepSalError(f"{str(file)!r} claims a {n}-byte header but holds {size} "
                               f"bytes; {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise StepSalError(f"{str(file)!r} has an unreadable header ({err}); {fix}") from None
    if not isinstance(header, dict):
        raise StepSalError(f"{str(file)!r} has a header that is not a JSON object; {fix}")
    data = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in t["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise StepSalError(f"{str(file)!r}: tensor {name!r} has no valid data_offsets; "
                               f"{fix}") from None
        if not 0 <= a <= b <= data:
            raise StepSalError(f"{str(file)!r}: tensor {name!r} lies at bytes {a}-{b} but the "
                               f"file holds {data} bytes of data (truncated?); {fix}")
    ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    if max(ends, default=0) != data:
        raise StepSalError(f"{str(file)!r} holds {data} bytes of data but its tensors cover "
                           f"{max(ends, default=0)}; {fix}")
    return header


def _check_weights(path: Path, cfg: dict[str, Any]) -> None:
    """Safetensors files readable, and the embedding's shape the one config.json says."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt"),
                                          *path.glob("*.pth"), *path.glob("*.ckpt")))
        if pickles:
            raise StepSalError(
                f"{str(path)!r} holds only pickle weights ({', '.join(pickles[:3])}), which "
                f"are never loaded here (unpickling runs code from the file); convert them "
                f"to safetensors where you trust the file: AutoModelForCausalLM."
                f"from_pretrained(path).save_pretrained(path, safe_serialization=True)")
        raise StepSalError(f"no weights in {str(path)!r} (no *.safetensors); save them "
                           f"with model.save_pretrained(path)")
    expect = (cfg["vocab_size"], cfg["hidden_size"])
    for file in files:
        for name, t in _safetensors_header(file).items():
            if name.endswith(("embed_tokens.weight", "lm_head.weight")) \
                    and tuple(t.get("shape", ())) != expect:
                raise StepSalError(
                    f"{str(file)!r}: {name} has shape {tuple(t.get('shape', ()))} but "
                    f"config.json says vocab_size x hidden_size = {expect}; the weights "
                    f"belong to another config - put the checkpoint's own config.json beside them")


def _shape_mismatches(path: Path) -> list[str]:
    """Tensors whose saved shape differs from the shape config.json implies (what
    Hugging Face refuses without naming them), as ``name (saved) vs (config)``."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # shapes only: no memory, no init
        ref = transformers.AutoModelForCausalLM.from_config(cfg)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    out = []
    for file in sorted(path.glob("*.safetensors")):
        for key, t in _safetensors_header(file).items():
            shape = tuple(t.get("shape", ())) if isinstance(t, dict) else ()
            if key in expected and shape != expected[key]:
                out.append(f"{key} saved {shape}, config.json implies {expected[key]}")
    return out


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
    cfg = _read_config(path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise StepSalError(f"architecture {arch!r} of {str(path)!r} is not supported; "
                           f"supported: {list(SUPPORTED_ARCHITECTURES)}")
    _check_weights(path, cfg)
    return arch


def check_device(device: str | None) -> str | None:
    """Refuse a device name torch does not know or this machine cannot use.

    >>> check_device("cpu")
    'cpu'
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise StepSalError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
                           ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise StepSalError(f"device {device!r} is not available: {why} (torch "
                               f"{torch.__version__}); use --device cpu, or install a CUDA "
                               f"build of PyTorch on a machine with a GPU")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise StepSalError(f"device {device!r} does not exist: this machine has {n} CUDA "
                               f"device(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise StepSalError(f"device {device!r} is not available on this machine (no Apple "
                               f"MPS backend); use --device cpu")
    elif dev.type != "cpu":
        raise StepSalError(f"device {device!r} is not supported; use 'cpu', 'cuda', 'cuda:N' "
                           f"or 'mps'")
    return device


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


def _keep_own_tokenizer(model: Any, source: str) -> None:
    """Give the bridge the checkpoint's own tokenizer, as the model's users know it.

    At boot TransformerLens normalises the tokenizer (gpt-oss gains ``add_bos_token``,
    Qwen's missing BOS becomes ``<|im_end|>``) and takes ``to_tokens``'s BOS rule from
    the architecture. Here the checkpoint's tokenizer replaces it, and ``to_tokens``
    prepends BOS exactly where the tokenizer itself does (R1's: yes; Qwen's, QwQ's and
    gpt-oss's: no). The bridge's ``tokenizer`` setter would re-apply the normalisation
    and re-derive ``d_vocab`` from the tokenizer, so the attribute is set directly.
    """
    from transformers import AutoTokenizer

    if not Path(source).is_dir():
        return
    booted = model.tokenizer
    own = AutoTokenizer.from_pretrained(source)
    if own.pad_token is None:
        own.pad_token = booted.pad_token
    own.padding_side = booted.padding_side
    probe = own("a")["input_ids"]
    prepends = own.bos_token_id is not None and probe[:1] == [own.bos_token_id]
    appends = own.eos_token_id is not None and probe[-1:] == [own.eos_token_id]
    model._tokenizer = own
    model.cfg.tokenizer_prepends_bos, model.cfg.tokenizer_appends_eos = prepends, appends
    model.cfg.default_prepend_bos = prepends


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
        In the model's own parameterisation (``enable_compatibility_mode(no_processing=True)``:
        patterns, gradients, activations and logits equal Hugging Face's), with
        its format and registry entry associated (:func:`info_of`).
    """
    check_type(name_or_path, (str, os.PathLike), "name_or_path",
               "a checkpoint folder or a model name (a str or a path)",
               "e.g. load_lrm('tiny-lrm') or load_lrm('path/to/checkpoint')")
    from transformer_lens.model_bridge import TransformerBridge

    name = os.fspath(name_or_path)
    check_device(device)
    torch_dtype = _dtype(dtype)
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
        model = TransformerBridge.boot_transformers(source, device=device, dtype=torch_dtype,
                                                    **boot_kwargs)
    except StepSalError:
        raise
    except OSError as err:
        if Path(source).is_dir():
            raise StepSalError(f"could not load {name!r} from {str(source)!r}: {err}; check "
                               f"its files or save the checkpoint again") from err
        raise StepSalError(f"could not load {name!r}: {err}. Without network, pass a local "
                           f"checkpoint folder") from err
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as err:  # HF's mismatched shapes, bad configs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "mismatch" in str(err):
            found = _shape_mismatches(Path(source)) if Path(source).is_dir() else []
            detail = "; ".join(found[:3]) + (f"; ... ({len(found)} in all)" if len(found) > 3
                                             else "") if found else first
            raise StepSalError(f"could not load {name!r}: its config.json and weights do not "
                               f"match ({detail}); put the checkpoint's own config.json beside "
                               f"its weights") from err
        raise StepSalError(f"could not load {name!r} from {str(source)!r}: {first}; check its "
                           f"config.json and weights (the chained error has the details)"
                           ) from err
    _keep_own_tokenizer(model, source)
    if fmt is None:
        detected = detect_format(model.tokenizer, arch)
        if detected is None:
            raise StepSalError(
                f"cannot tell the reasoning format of {name!r} from its tokenizer (no "
                f"<think> or harmony markers); pass format=... (one of {list_formats()})"
            )
        fmt = get_format(detected)
    # no_processing: the model's own parameterisation. The default folds value biases
    # (changing V, hence dL/dA), LayerNorm and centres the unembedding; patterns,
    # gradients, z, resid_post and logits then differ from Hugging Face's.
    model.enable_compatibility_mode(no_processing=True)
    model.eval()
    attach(model, fmt, spec=spec, source=str(source),
           fingerprint=file_fingerprint(source) if Path(source).is_dir() else None)
    return model


def model_fingerprint(name_or_path: str | os.PathLike) -> str | None:
    """The fingerprint of the files :func:`load_lrm` would load for ``name_or_path``,
    without loading them (None: not a local folder or a cached hub model, e.g.
    ``random:ARCH``; known only once loaded).

    Examples
    --------
    >>> from stepsal_lens import info_of
    >>> model_fingerprint("tiny-lrm") == info_of(load_lrm("tiny-lrm")).fingerprint
    True
    """
    name = os.fspath(name_or_path)
    local = BUNDLED.get(name, Path(name).expanduser())
    if local.is_dir():
        return file_fingerprint(local)
    if name in _MODELS or (name.count("/") == 1 and not name.startswith((".", "/", "~"))):
        from huggingface_hub import snapshot_download

        try:
            return file_fingerprint(snapshot_download(name, local_files_only=True))
        except Exception:  # not cached (the hub library raises several types here)
            return None
    return None
