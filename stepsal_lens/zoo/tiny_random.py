"""Tiny random checkpoints of every supported architecture, built offline.

Tests, benchmarks and the command line use these to exercise the real loading path
(a local Hugging Face folder with ``config.json``, safetensors weights and
``tokenizer.json``) without a model hub. The tokenizer is a byte-level BPE trained
with ``tokenizers`` on a small built-in corpus; every reasoning-format marker is a
single special token.

Examples
--------
>>> import tempfile
>>> from stepsal_lens.zoo.tiny_random import make_random_checkpoint
>>> path = make_random_checkpoint("qwen2", tempfile.mkdtemp())
>>> sorted(p.name for p in path.iterdir())[:2]
['config.json', 'generation_config.json']
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from stepsal_lens.errors import StepSalError

__all__ = ["ARCHITECTURES", "MARKER_TOKENS", "REAL_FEATURES", "make_random_checkpoint",
           "train_tokenizer"]

#: Every marker string of every reasoning format; each becomes one special token.
MARKER_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<think>",
    "</think>",
    "<|im_start|>",
    "<|im_end|>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|return|>",
)

#: Short architecture names -> Hugging Face architecture class names.
ARCHITECTURES: dict[str, str] = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt-oss": "GptOssForCausalLM",
}

_WORDS = (
    "start with add subtract multiply divide by then the result is so we get next step "
    "answer total number value first second third check again wait let me compute sum "
    "product difference question therefore because and of to a is are we have now final "
    "table row column half quarter greater less than equal apples cost each"
).split()
_EXTRA = "≥ ≤ ½ ¼ × ÷ − → ✓ 😀 🙂 中文 数学 答案 é ü ß π √ ∑ | --- | :-: | $ \\boxed{ } ( ) , : ; ? !"


def _corpus(n_lines: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        for i in range(len(words)):
            r = rng.random()
            if r < 0.25:
                words[i] = str(rng.randint(0, 999))
            elif r < 0.3:
                words[i] = f"{rng.randint(0, 99)}.{rng.randint(0, 99)}"
            elif r < 0.35:
                words[i] = rng.choice(_EXTRA.split())
        sep = rng.choice([". ", ".\n", ".\n\n", ", ", " = ", "? "])
        lines.append(" ".join(words).capitalize() + sep)
    lines.append(_EXTRA)
    return lines


def train_tokenizer(vocab_size: int = 600, *, seed: int = 0,
                    markers: tuple[str, ...] = MARKER_TOKENS):
    """Train a small byte-level BPE fast tokenizer with every marker as a special token.

    Parameters
    ----------
    vocab_size
        Target vocabulary size (markers and the 256 byte tokens included).
    seed
        Seed of the built-in training corpus.
    markers
        Special tokens to add; the first is BOS, EOS and pad.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        ``<|endoftext|>`` is its BOS, EOS and pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(markers),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed=seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=markers[0],
        eos_token=markers[0],
        pad_token=markers[0],
        additional_special_tokens=list(markers[1:]),
    )


def _config(arch: str, *, vocab_size: int, n_layers: int, d_model: int, n_heads: int,
            n_kv_heads: int, n_ctx: int, bos: int, eos: int, pad: int):
    """A config with the real family's features (see :data:`REAL_FEATURES`)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=n_ctx,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=arch == "qwen3",
    )
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "llama":
        # Llama 3.1's RoPE scaling, as in R1-Distill-Llama-8B (with a short original context
        # so that the scaling acts on the short test sequences).
        return transformers.LlamaConfig(rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, **common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=d_model // n_heads, **common)
    if arch == "gpt-oss":
        return transformers.GptOssConfig(
            head_dim=d_model // n_heads,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            attention_bias=True,
            # gpt-oss-20b's YaRN (factor 32), over a short original context so it acts here.
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": max(n_ctx // 32, 1)},
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                         for i in range(n_layers)],
            **common,
        )
    raise StepSalError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")


#: What the random checkpoints share with the real models of each family.
REAL_FEATURES: dict[str, str] = {
    "qwen2": "q/k/v biases (R1-Distill-Qwen, QwQ), untied embeddings",
    "llama": "no biases, Llama 3.1 RoPE scaling, untied embeddings (R1-Distill-Llama)",
    "qwen3": "QK-norm, tied embeddings (Qwen3 up to 4B)",
    "gpt-oss": "q/k/v/o biases, attention sinks, alternating sliding-window layers, MoE "
               "with router bias, YaRN RoPE",
}


def _realistic_(model, seed: int) -> None:
    """Give every parameter a non-trivial random value, in place.

    ``from_config`` leaves biases at 0 and norm weights at 1, exactly where the real
    models differ (value biases, sinks, QK-norm) and where a wrong reparameterisation
    would hide. Larger weights give the peaked attention real models have.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                mean, std = 0.0, 1.0
            elif "norm" in name:
                mean, std = 1.0, 0.2
            elif p.dim() == 1:
                mean, std = 0.0, 0.3
            else:
                mean, std = 0.0, 0.02 if "embed" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std + mean)


def make_random_checkpoint(
    arch: str,
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    n_ctx: int = 512,
    vocab_size: int = 600,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Write a randomly initialised checkpoint folder of architecture ``arch``.

    Parameters
    ----------
    arch
        One of ``"qwen2"``, ``"llama"``, ``"qwen3"``, ``"gpt-oss"``.
    path
        Folder to write (created if missing).
    n_layers, d_model, n_heads, n_kv_heads, n_ctx
        Model size; ``n_kv_heads < n_heads`` exercises grouped-query attention.
    vocab_size
        Vocabulary size of the trained tokenizer.
    seed
        Seed of the weights.
    tokenizer
        A fast tokenizer to save instead of training one, or a tokenizer folder to
        copy (e.g. a real one from :mod:`stepsal_lens.zoo.real_tokenizers`).

    Returns
    -------
    pathlib.Path
        The folder, loadable with :func:`stepsal_lens.load_lrm`.
    """
    import transformers

    if arch not in ARCHITECTURES:
        raise StepSalError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else train_tokenizer(vocab_size)
    if isinstance(tok, (str, Path)):
        tok = _copy_tokenizer_files(Path(tok), path)
    else:
        tok.save_pretrained(path)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    cfg = _config(arch, vocab_size=len(tok), n_layers=n_layers, d_model=d_model,
                  n_heads=n_heads, n_kv_heads=n_kv_heads, n_ctx=n_ctx,
                  bos=tok.bos_token_id if tok.bos_token_id is not None else pad, eos=eos, pad=pad)
    # from_config draws from the global RNG: fork it so the caller's stream is untouched;
    # the weights themselves come from a seeded local generator.
    with torch.random.fork_rng():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _realistic_(model, seed)
    model.generation_config.pad_token_id = pad
    model.save_pretrained(path)
    return path


def _copy_tokenizer_files(source: Path, dest: Path):
    """Copy a tokenizer folder's files (the chat template too) and load the copy."""
    import shutil

    from transformers import AutoTokenizer

    files = [f for f in source.iterdir() if f.name.startswith(("tokenizer", "chat_template",
                                                              "special_tokens"))]
    if not any(f.name == "tokenizer.json" for f in files):
        raise StepSalError(f"no tokenizer.json in {str(source)!r}; pass a tokenizer folder")
    for f in files:
        shutil.copy(f, dest / f.name)
    return AutoTokenizer.from_pretrained(dest)
