"""Loading: parity with Hugging Face, cached generation, registry, bad input."""

from __future__ import annotations

import json
import shutil

from stepsal_lens.segments.association import info_of
import pytest
import torch
import transformers

from stepsal_lens import StepSalError, default_layer_split, detect_format, list_models, load_lrm
from stepsal_lens.zoo.tiny_random import train_tokenizer


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def test_logprobs_match_hugging_face(arch, checkpoints, models):
    model, hf = models[arch], hf_model(checkpoints[arch])
    ids = model.tokenizer("Start with 7. Add 5 ≥ ½, then 中文 😀.", add_special_tokens=False,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(ids).log_softmax(-1)
        ref = hf(ids).logits.log_softmax(-1)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, f"{arch}: max |log p - log p_HF| = {diff:.2e}"


def test_cached_greedy_generation_equals_uncached_and_hf(arch, checkpoints, models):
    """Guards the transformers pin: with 5.24 the cached bridge ignores the cache."""
    model, hf = models[arch], hf_model(checkpoints[arch])
    prompt = model.tokenizer("Start with 3. Add 4", add_special_tokens=False,
                             return_tensors="pt").input_ids
    kw = dict(max_new_tokens=12, do_sample=False, stop_at_eos=False, verbose=False,
              return_type="tokens")
    cached = model.generate(prompt, use_past_kv_cache=True, **kw)
    uncached = model.generate(prompt, use_past_kv_cache=False, **kw)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                      min_new_tokens=12, do_sample=False)
    assert cached.tolist() == uncached.tolist(), f"{arch}: cached != uncached"
    assert cached.tolist() == ref.tolist(), f"{arch}: bridge {cached.tolist()} != HF {ref.tolist()}"


def test_loaded_model_carries_format_and_hooks(models):
    model = models["qwen2"]
    assert info_of(model).format.name == "deepseek-r1"
    assert {"blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"} <= set(model.hook_dict)


def test_bfloat16_load(checkpoints):
    model = load_lrm(checkpoints["qwen2"], device="cpu", dtype="bfloat16", format="qwq")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_format_is_detected_from_tokenizer(tmp_path):
    base = ("<|endoftext|>",)
    cases = {
        "gpt-oss": ("<|start|>", "<|channel|>", "<|message|>", "<|end|>"),
        "deepseek-r1": ("<｜Assistant｜>", "<｜User｜>", "<think>", "</think>"),
        "qwq": ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        "think-tags": ("<think>", "</think>"),
    }
    for expected, markers in cases.items():
        tok = train_tokenizer(300, markers=base + markers)
        assert detect_format(tok, "Qwen2ForCausalLM") == expected
    chatml = train_tokenizer(300, markers=base + cases["qwq"])
    assert detect_format(chatml, "Qwen3ForCausalLM") == "qwen3"
    assert detect_format(train_tokenizer(300, markers=base)) is None


def test_registry_lists_the_papers_models():
    df = list_models()
    assert {"deepseek-r1", "qwq", "qwen3", "gpt-oss"} <= set(df.family)
    row = df.set_index("name").loc["deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"]
    assert (row.architecture, row.n_layers, row.oeb_layers, row.smi_layers) == (
        "Qwen2ForCausalLM", 28, "0-6", "21-27")


@pytest.mark.parametrize("n,oeb,smi", [(1, [0], [0]), (2, [0], [1]), (8, [0, 1], [6, 7]),
                                       (9, [0, 1, 2], [6, 7, 8])])
def test_default_layer_split_is_ceil_quarter(n, oeb, smi):
    assert default_layer_split(n) == {"oeb": oeb, "smi": smi}


# ---- bad input ----------------------------------------------------------------------------

def test_folder_without_config(tmp_path):
    with pytest.raises(StepSalError, match="no config.json"):
        load_lrm(tmp_path)


def test_folder_without_tokenizer(tmp_path, checkpoints):
    shutil.copy(checkpoints["qwen2"] / "config.json", tmp_path / "config.json")
    with pytest.raises(StepSalError, match="no tokenizer"):
        load_lrm(tmp_path)


def test_unsupported_architecture(tmp_path, checkpoints):
    shutil.copytree(checkpoints["qwen2"], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StepSalError, match="GPT2LMHeadModel.*not supported"):
        load_lrm(tmp_path / "m")


def test_hub_name_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StepSalError, match="offline.*local checkpoint folder"):
        load_lrm("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")


def test_unknown_name():
    with pytest.raises(StepSalError, match="neither a local folder nor a hub name"):
        load_lrm("not-a-model")


def test_unknown_format_and_dtype(checkpoints):
    with pytest.raises(StepSalError, match="unknown reasoning format 'r2'"):
        load_lrm(checkpoints["qwen2"], format="r2")
    with pytest.raises(StepSalError, match="unknown dtype 'float8'"):
        load_lrm(checkpoints["qwen2"], dtype="float8")
