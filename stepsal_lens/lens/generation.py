"""KV-cached generation of reasoning traces, batched, with or without StepFlow.

Prompts are the model's chat template (:meth:`ReasoningFormat.chat_prompt`), tokenised
the way :class:`~stepsal_lens.Trace` tokenises them (BOS only where the template writes
one), left-padded
with an explicit attention mask, and generated KV-cached: by default on the Hugging Face
model inside the bridge, StepFlow through its fused engine
(:mod:`stepsal_lens.lens.fused_stepflow`), or with the bridge's ``generate`` and hooks
(``engine="hook_pattern"``); both give the same tokens. Each completion is cut after the
format's end-of-sequence marker.

Examples
--------
>>> from stepsal_lens import StepFlowConfig, load_lrm
>>> from stepsal_lens.lens.generation import generate
>>> model = load_lrm("tiny-lrm")
>>> [g] = generate(model, ["Start with 3. Add 4, then multiply by 2. What is the result?"],
...                progress=False)
>>> g.segments()["summary"]
'The result is \\\\boxed{14}.'
>>> [g] = generate(model, ["Start with 3. Add 4. What is the result?"],
...                stepflow=StepFlowConfig(), progress=False)
>>> g.stats["smi"]["injections"] >= 1
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from stepsal_lens._checks import describe_value, check_count, check_seed, check_temperature
from stepsal_lens.errors import StepSalError
from stepsal_lens.lens.stepflow import stepflow as stepflow_on
from stepsal_lens.results.config import StepFlowConfig
from stepsal_lens.results.generation import Generation
from stepsal_lens.segments.association import info_of
from stepsal_lens.segments.trace import check_fits

__all__ = ["generate", "prompt_ids", "stop_ids"]


def prompt_ids(model: Any, prompt: str) -> list[int]:
    """Token ids of a prompt exactly as :class:`~stepsal_lens.Trace` would cut them: the
    text as is, plus the template's BOS where the text lacks it."""
    from stepsal_lens.segments.trace import template_bos

    tok = model.tokenizer
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    bos = template_bos(tok, info_of(model).format)
    if bos is not None and not prompt.startswith(bos):
        ids = [tok.bos_token_id, *ids]
    return ids


def stop_ids(model: Any) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and the format's
    :attr:`~stepsal_lens.segments.formats.ReasoningFormat.stop_markers` (its first end marker;
    gpt-oss: ``<|return|>`` and ``<|call|>`` - its ``<|end|>`` closes an analysis
    message and more follow, so it is not one)."""
    tok = model.tokenizer
    out = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for name in info_of(model).format.stop_markers:
        marker = tok.convert_tokens_to_ids(name)
        if isinstance(marker, int) and marker != tok.unk_token_id and marker not in out:
            out.append(marker)
    if not out:
        raise StepSalError("the tokenizer has no EOS token and the format no end marker; "
                           "generation would never stop early")
    return out


def generate(model: Any, questions: Sequence[str] | None = None, *,
             prompts: Sequence[str] | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, seed: int | None = None, batch_size: int = 8,
             stepflow: StepFlowConfig | None = None, engine: str = "auto",
             system: str | None = None, reasoning_effort: str | None = None,
             progress: bool = True) -> list[Generation]:
    """Generate one trace per question (or raw prompt), KV-cached and batched.

    Parameters
    ----------
    model
        A model from :func:`~stepsal_lens.load_lrm`.
    questions
        Questions; each is wrapped in the model's chat prompt
        (:meth:`~stepsal_lens.segments.formats.ReasoningFormat.chat_prompt`).
    prompts
        Raw prompt texts instead of questions.
    max_new_tokens
        Token budget of each completion.
    temperature
        0 for greedy decoding (the default); > 0 samples.
    seed
        Seed for sampling (batch ``i`` uses ``seed + i``; the process's RNG state is
        restored afterwards).
    batch_size
        Prompts per batch; rows are left-padded, which does not change any row's result.
    stepflow
        A :class:`~stepsal_lens.StepFlowConfig` to generate with StepFlow on
        (``StepFlowConfig()``: the paper's defaults); None for plain generation.
    engine
        ``"fused"``: a KV-cached loop on the Hugging Face model inside the bridge (sdpa;
        StepFlow's OEB as an attention function, SMI as module hooks), at about Hugging
        Face's speed. ``"hook_pattern"``: the bridge's ``generate`` (StepFlow as hooks on
        its hook points; hooks attached to the bridge take effect). ``"auto"`` (default):
        ``"fused"``, unless hooks are attached to the bridge or the model has attention
        sinks in low precision (:func:`~stepsal_lens.lens.fused_stepflow.choose_engine`). The
        tokens are the same either way; ``Generation.engine`` records which ran.
    system
        A system message before each question (gpt-oss: its developer message).
    reasoning_effort
        gpt-oss only: ``"low"``, ``"medium"`` or ``"high"`` (default: the format's).
    progress
        Show a progress bar.

    Returns
    -------
    list[Generation]
        In input order.
    """
    from tqdm.auto import tqdm

    if (questions is None) == (prompts is None):
        raise StepSalError("pass either questions=[...] or prompts=[...] (exactly one)")
    given, texts = ("questions", questions) if prompts is None else ("prompts", prompts)
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) \
            or not all(isinstance(t, str) for t in texts):
        raise StepSalError(f"{given} must be a list of strings; got {describe_value(texts)} "
                           f"(wrap a single one in [...])")
    check_count(max_new_tokens, "max_new_tokens")
    check_count(batch_size, "batch_size")
    check_temperature(temperature)
    if seed is not None:
        check_seed(seed, batches=math.ceil(len(texts) / batch_size))
    fmt = info_of(model).format
    options = {k: v for k, v in (("system", system), ("reasoning_effort", reasoning_effort))
               if v is not None}
    if prompts is None:
        prompts = [fmt.chat_prompt(q, model.tokenizer, **options) for q in questions]
    elif options:
        raise StepSalError(f"{sorted(options)} shape the prompt built from questions=; "
                           f"raw prompts= are used as they are - pass questions instead")
    if stepflow is not None and not isinstance(stepflow, StepFlowConfig):
        raise StepSalError(f"stepflow must be a StepFlowConfig or None; got {stepflow!r} "
                           f"(e.g. stepflow=StepFlowConfig(tau_max=0.15, alpha=0.06))")
    n_ctx = model.cfg.n_ctx
    for p in prompts:  # before tokenising a prompt far longer than the context
        check_fits(p, model.tokenizer, n_ctx, "a prompt", fix="shorten it")
    from stepsal_lens.lens.fused_stepflow import choose_engine, generate_tokens

    used, _ = choose_engine(model, engine)
    stops = stop_ids(model)
    # what the bridge's generate writes into finished rows
    done_pad = model.tokenizer.eos_token_id
    done_pad = stops[0] if done_pad is None else done_pad
    pad = model.tokenizer.pad_token_id
    pad = stops[0] if pad is None else pad
    out: list[Generation] = []
    batches = range(0, len(prompts), batch_size)
    for i, start in enumerate(tqdm(batches, desc="generating", unit="batch",
                                   disable=not progress or len(batches) < 2)):
        batch = list(prompts[start:start + batch_size])
        ids = [prompt_ids(model, p) for p in batch]
        width = max(len(x) for x in ids)
        if width >= n_ctx:
            raise StepSalError(f"a prompt of {width} tokens does not fit the model's context "
                               f"of {n_ctx} (with room to generate); shorten the prompt")
        if width + max_new_tokens > n_ctx:
            raise StepSalError(f"a prompt of {width} tokens plus max_new_tokens={max_new_tokens} "
                               f"exceeds the model's context of {n_ctx}; lower max_new_tokens "
                               f"to at most {n_ctx - width}")
        tokens = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        ctx = (stepflow_on(model, stepflow, engine=used) if stepflow is not None
               else nullcontext())
        # model.generate samples from the global RNG: seed it inside a fork, so the
        # caller's random stream is the same afterwards
        with torch.random.fork_rng(devices=[]), ctx as sf:
            if temperature > 0 and seed is not None:
                torch.manual_seed(seed + i)
            if used == "fused":
                gen = generate_tokens(
                    model, tokens.to(model.cfg.device), mask.to(model.cfg.device),
                    max_new_tokens=max_new_tokens, temperature=temperature,
                    stop_tokens=stops, pad_token=done_pad)
            else:
                gen = model.generate(
                    tokens.to(model.cfg.device), attention_mask=mask.to(model.cfg.device),
                    max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else 1.0, stop_at_eos=True,
                    eos_token_id=stops, verbose=False, return_type="tokens")
        rows_stats = sf.stats.per_row() if sf is not None else [_empty_stats()] * len(batch)
        for prompt, p_ids, row, st in zip(batch, ids, gen[:, width:].tolist(), rows_stats):
            cut = next((j for j, t in enumerate(row) if t in stops), None)
            completion = row if cut is None else row[:cut + 1]
            all_ids = p_ids + completion
            text = model.tokenizer.decode(all_ids, skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)
            out.append(Generation(prompt, text, all_ids, len(p_ids), cut is not None,
                                  fmt.name, st, sf.config.to_dict() if sf else None, used))
    return out


def _empty_stats() -> dict[str, Any]:
    return {"oeb": {"triggers": 0, "triggers_per_layer": {}, "eligible_rows": 0,
                    "eligible_rows_per_layer": {}, "mean_bridge_mass_before": None,
                    "mean_bridge_mass_after": None},
            "smi": {"injections": 0, "injections_per_layer": {}}}
