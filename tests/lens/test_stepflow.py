"""StepFlow: OEB against the paper's logit-shift form, SMI exactness, the streaming
tracker against offline segmentation, and generation invariants on real bridges."""

from __future__ import annotations

import shutil

from stepsal_lens.segments.association import info_of
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from stepsal_lens import (StepFlowConfig, StepSalError, Trace, get_format, load_lrm,
                          step_saliency, stepflow)
from stepsal_lens.lens.generation import generate, prompt_ids
from stepsal_lens.segments.tracker import SEGMENT_CODES, SegmentTracker

# A thinking prefix the random models continue, so StepFlow acts in the prompt too.
QUESTION = "Start with 7. Add 5, then multiply by 2. What is the result?"
THINKING = ("We start with the number seven. Adding five to seven gives twelve. "
            "Twelve times two makes twenty four.")
SUMMARY = "The result is twenty four.\n\nSo the answer is 24."


# ---- the pure OEB core ------------------------------------------------------------------


# ---- the streaming tracker ---------------------------------------------------------------

FORMATS = ["deepseek-r1", "qwq", "qwen3", "gpt-oss", "think-tags"]


def _feed_one_by_one(tokenizer, fmt, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(fmt.prompt(QUESTION), add_special_tokens=False)["input_ids"])
    tracker = SegmentTracker(tokenizer, fmt)
    tracker.reset(torch.tensor([ids[:n_prompt]]))
    for t in ids[n_prompt:]:
        tracker.extend(torch.tensor([[t]]))
    return tracker, ids


@pytest.mark.parametrize("name", FORMATS)
def test_tracker_matches_offline_trace(tokenizer, name):
    fmt = get_format(name)
    text = fmt.render(QUESTION, THINKING, SUMMARY)
    tracker, ids = _feed_one_by_one(tokenizer, fmt, text)
    trace = Trace.from_text(text, tokenizer, format=fmt)
    assert tracker.token_ids() == trace.token_ids.tolist() == ids
    assert tracker.text() == text
    assert tracker.step[0].tolist() == trace.step_of_token.tolist()
    assert torch.nonzero(tracker.step_start[0]).flatten().tolist() == [
        s.token_span[0] for s in trace.steps]
    for s in trace.steps:
        a, b = s.token_span
        assert set(tracker.segment[0, a:b].tolist()) == {SEGMENT_CODES[s.segment]}
    # labelling the whole text at once gives the same labels (prefix-stable)
    whole = SegmentTracker(tokenizer, fmt)
    whole.reset(torch.tensor([ids]))
    for key in ("segment", "step", "step_start", "anchored"):
        assert torch.equal(getattr(whole, key), getattr(tracker, key)), key
    assert tracker.trace().step_of_token.tolist() == trace.step_of_token.tolist()


@pytest.mark.parametrize("name", FORMATS)
def test_tracker_segment_of_the_newest_token_is_final(tokenizer, name):
    """The segment a token gets when it is the newest is its segment for good, so a
    generated token is edited as teacher forcing edits it - also the first bytes of a
    multi-byte character, which decode to nothing until the character completes."""
    fmt = get_format(name)
    text = fmt.render(QUESTION, "Half of 12 is 6 漢字 🎉 so ∫ holds. Then 🦜 we add 2.", SUMMARY)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = SegmentTracker(tokenizer, fmt)
    whole.reset(torch.tensor([ids]))
    prompt = tokenizer(fmt.prompt(QUESTION), add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt)] == prompt
    tracker = SegmentTracker(tokenizer, fmt)
    tracker.reset(torch.tensor([prompt]))  # the question is read from a whole prompt
    for t in range(len(prompt), len(ids)):
        tracker.extend(torch.tensor([[ids[t]]]))
        assert tracker.segment[0, t] == whole.segment[0, t], (t, tokenizer.decode(ids[t]))


def test_tracker_short_piece_joins_the_next_step_online_too(tokenizer):
    fmt = get_format("think-tags")
    thinking = "We start with the number seven. So 12. Twelve times two makes twenty four."
    text = fmt.render(QUESTION, thinking, "The result is 24.")
    tracker, _ = _feed_one_by_one(tokenizer, fmt, text)
    trace = Trace.from_text(text, tokenizer, format=fmt)
    online = torch.nonzero(tracker.step_start[0]).flatten().tolist()
    assert online == [s.token_span[0] for s in trace.steps]
    # "So 12." is too short to be a step: it opens the step that follows it
    assert [trace.steps[i].text for i in trace.steps_in("thinking")] == [
        "We start with the number seven.", "So 12. Twelve times two makes twenty four."]


def test_tracker_padding_and_errors(tokenizer):
    tracker = SegmentTracker(tokenizer, "think-tags")
    ids = tokenizer(get_format("think-tags").prompt(QUESTION), add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id or 0
    tracker.reset(torch.tensor([[pad, pad] + ids[2:], ids]),
                  torch.tensor([[0, 0] + [1] * (len(ids) - 2), [1] * len(ids)]))
    assert tracker.valid[0, :2].tolist() == [False, False] and bool(tracker.valid[1].all())
    assert tracker.segment[0, :2].tolist() == [-1, -1]
    with pytest.raises(StepSalError, match="rows"):
        tracker.extend(torch.tensor([[1]]))
    with pytest.raises(StepSalError, match="reset"):
        SegmentTracker(tokenizer, "think-tags").extend(torch.tensor([[1]]))


# ---- hooks on real bridges ---------------------------------------------------------------

def _hook_prompt(fmt, question):
    """The format's prompt; gpt-oss's without its system message, which holds most of a
    random model's attention: OEB leaves rows whose other mass exceeds 1 - tau_B alone,
    so it would never act there."""
    prompt = fmt.prompt(question)
    return prompt[prompt.index(fmt.user_open):] if fmt.name == "gpt-oss" else prompt


def _prompt_tokens(model, thinking=THINKING):
    fmt = info_of(model).format
    text = (_hook_prompt(fmt, QUESTION) + ("" if fmt.prompt_opens_thinking else fmt.think_open)
            + thinking)
    return torch.tensor([prompt_ids(model, text)])


def _greedy(model, tokens, cached, n=12):
    return model.generate(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False,
                          verbose=False, use_past_kv_cache=cached)


def test_cached_equals_uncached_with_stepflow(models, arch):
    model = models[arch]
    tokens = _prompt_tokens(model)
    plain = _greedy(model, tokens, True)
    # both layers: GPT-OSS layer 0 has an 8-token sliding window, so there the question
    # is out of sight of every thinking query and OEB has no bridge to lift
    cfg = {"tau_max": 0.5, "alpha": 2.0, "oeb_layers": [0, 1]}
    with stepflow(model, **cfg) as sf:
        cached = _greedy(model, tokens, True)
    stats = sf.stats.per_row()[0]
    assert stats["oeb"]["triggers"] > 0 and stats["smi"]["injections"] > 0
    with stepflow(model, **cfg):
        uncached = _greedy(model, tokens, False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)  # strong settings change what a random model says


def test_zero_strength_is_plain_generation(models, arch):
    model = models[arch]
    tokens = _prompt_tokens(model)
    with stepflow(model, tau_max=0.0, alpha=0.0) as sf:
        out = _greedy(model, tokens, True)
        logits = model(tokens)
    assert torch.equal(out, _greedy(model, tokens, True))
    assert torch.equal(logits, model(tokens))
    assert sf.stats.to_dict()["oeb"]["triggers"] == 0


def test_tiny_lrm_stepflow_in_generation(tiny_lrm):
    """Steps the model writes itself: SMI fires during cached generation; cached equals
    uncached; a batch equals one-by-one."""
    qs = ["Start with 3. Add 4, then multiply by 2, then subtract 5. What is the result?",
          "Start with 12. Subtract 5, then add 9, then multiply by 2, then subtract 3, "
          "then add 1. What is the result?",
          "Start with 8. Add 2, then add 3. What is the result?"]
    cfg = {"tau_max": 0.3, "alpha": 0.5}
    batched = generate(tiny_lrm, qs, stepflow=StepFlowConfig(**cfg), batch_size=3, max_new_tokens=96,
                       progress=False)
    single = [generate(tiny_lrm, [q], stepflow=StepFlowConfig(**cfg), max_new_tokens=96, progress=False)[0]
              for q in qs]
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids
        assert b.stats["smi"] == s.stats["smi"]
        assert b.stats["oeb"]["triggers"] == s.stats["oeb"]["triggers"]
        n_thinking = len(s.trace(tiny_lrm).steps_in("thinking"))
        prompt_steps = 0  # the prompt ends with <think>: every injection is generated
        assert s.stats["smi"]["injections"] == n_thinking - 1 - prompt_steps
    fmt = info_of(tiny_lrm).format
    ids = torch.tensor([prompt_ids(tiny_lrm, fmt.prompt(qs[1]))])
    with stepflow(tiny_lrm, **cfg):
        cached = _greedy(tiny_lrm, ids, True, n=60)
        uncached = _greedy(tiny_lrm, ids, False, n=60)
    assert torch.equal(cached, uncached)


def _smi_edits(trace, variant, window):
    """(first token of a new thinking step, window positions) for each step after the
    first, from the offline Trace and token texts, independently of the tracker:
    ``resid_post`` takes the previous step's last ``window`` tokens with a non-space
    character; ``paper_code`` the ``window`` tokens up to and including the token with the
    period that closed the previous step (the paper code's window)."""
    text_of = trace.str_tokens()
    thinking = trace.steps_in("thinking")
    edits = []
    for prev, cur in zip(thinking, thinking[1:]):
        a, b = trace.steps[prev].token_span
        start = trace.steps[cur].token_span[0]
        if variant == "resid_post":
            win = [t for t in range(a, b) if text_of[t].strip()][-window:]
        else:
            period = max(t for t in range(a, start) if "." in text_of[t])
            win = list(range(max(a, period - window + 1), period + 1))
        edits.append((start, win))
    return edits


@pytest.mark.parametrize("variant", ["resid_post", "paper_code"])
def test_smi_adds_exactly_alpha_window_mean(models, variant):
    """The edited activation equals before + alpha * mean(window source) at exactly the
    step starts: hook_resid_post's own values, or hook_v's (GQA-expanded) into hook_z."""
    model = models["qwen2"]
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, model)
    layer, alpha, window = 1, 0.25, 3
    name = (f"blocks.{layer}.hook_resid_post" if variant == "resid_post"
            else f"blocks.{layer}.attn.hook_z")
    seen: dict[str, torch.Tensor] = {}

    def record(key):
        def hook(act, hook):
            seen[key] = act.detach().clone()
        return hook

    tokens = trace.token_ids[None]
    outer = [(name, record("before")), (f"blocks.{layer}.attn.hook_v", record("v"))]
    with model.hooks(fwd_hooks=outer):
        with stepflow(model, tau_max=0.0, alpha=alpha, smi_layers=[layer], window=window,
                      smi_variant=variant) as sf:
            with model.hooks(fwd_hooks=[(name, record("after"))]):
                model(tokens)
    before, after = seen["before"][0], seen["after"][0]
    if variant == "resid_post":
        source = before
    else:  # [pos, kv_head, d] -> [pos, head, d], kv head h // (n_heads / n_kv) per head
        source = seen["v"][0].repeat_interleave(before.shape[1] // seen["v"].shape[2], dim=1)
    expected = before.clone()
    edits = _smi_edits(trace, variant, window)
    for start, win in edits:
        expected[start] = before[start] + alpha * source[win].mean(0)
    assert len(edits) >= 2
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)
    changed = (after != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [start for start, _ in edits]
    assert sf.stats.to_dict()["smi"]["injections_per_layer"] == {str(layer): len(edits)}


# ---- SMI variants against an independent Hugging Face implementation ------------------------

@pytest.fixture(scope="module")
def biased(checkpoints, tmp_path_factory):
    """The qwen2 and gpt-oss fixtures with non-zero attention biases (q/k/v, and o where the
    architecture has one) and gpt-oss sinks of order one: value biases are exactly where
    hook_v and folded values differ."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for arch in ("qwen2", "gpt-oss"):
        folder = tmp_path_factory.mktemp(f"biased-{arch}")
        shutil.copytree(checkpoints[arch], folder, dirs_exist_ok=True)
        tensors = load_file(folder / "model.safetensors")
        edited = [k for k in tensors if ".self_attn." in k and k.endswith(("bias", "sinks"))]
        for k in edited:
            tensors[k] = torch.randn(tensors[k].shape, generator=gen)
        assert any(k.endswith("v_proj.bias") for k in edited)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        out[arch] = folder
    return out


def _hf_log_probs(path, tokens, edits, variant, layers, alpha, value_bias=True):
    """Hugging Face eager forward with SMI applied by raw module hooks: the decoder layer's
    output (``resid_post``, every layer in ``layers``) or the input of ``o_proj`` (the
    per-head attention output) plus ``alpha`` times the mean ``v_proj`` output over the
    window, kv heads repeated as ``repeat_kv`` does (``paper_code``, first layer only)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")

    def add(x, source):  # [pos, d]
        x = x.clone()
        for start, win in edits:
            x[start] = x[start] + alpha * source[win].mean(0)
        return x

    handles = []
    try:
        if variant == "resid_post":
            def post(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                new = add(hidden[0], hidden[0])[None]
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles += [hf.model.layers[l].register_forward_hook(post) for l in layers]
        else:
            attn, kept = hf.model.layers[layers[0]].self_attn, {}
            n_heads, n_kv = hf.config.num_attention_heads, hf.config.num_key_value_heads

            def keep_v(module, args, output):
                kept["v"] = output if value_bias else output - module.bias

            def pre_o(module, args):
                v = kept["v"][0].view(tokens.shape[1], n_kv, -1)
                v = v.repeat_interleave(n_heads // n_kv, dim=1).flatten(1)  # [pos, head * d]
                return (add(args[0][0], v)[None], *args[1:])

            handles += [attn.v_proj.register_forward_hook(keep_v),
                        attn.o_proj.register_forward_pre_hook(pre_o)]
        with torch.no_grad():
            return hf(tokens).logits.log_softmax(-1)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("variant", ["resid_post", "paper_code"])
@pytest.mark.parametrize("arch", ["qwen2", "gpt-oss"])
def test_smi_variant_equals_hugging_face_hooks(biased, arch, variant):
    """Teacher-forced trace, StepFlow's SMI on the bridge vs the same edit made with raw
    PyTorch hooks on the Hugging Face model; biases and sinks non-zero."""
    model = load_lrm(biased[arch], device="cpu",
                     format={"qwen2": "deepseek-r1", "gpt-oss": "gpt-oss"}[arch])
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, model)
    tokens = trace.token_ids[None]
    alpha = 0.5
    edits = _smi_edits(trace, variant, 4)
    layers = [0, 1] if variant == "resid_post" else [0]  # paper_code: first SMI layer only
    with stepflow(model, tau_max=0.0, alpha=alpha, smi_layers=[0, 1],
                  smi_variant=variant) as sf:
        with torch.no_grad():
            ours = model(tokens).log_softmax(-1)
    ref = _hf_log_probs(biased[arch], tokens, edits, variant, layers, alpha)
    plain = _hf_log_probs(biased[arch], tokens, [], variant, layers, alpha)
    err, effect = (ours - ref).abs().max().item(), (ref - plain).abs().max().item()
    assert err < 1e-5, f"{arch}/{variant}: max |bridge - HF| = {err:.2e} (edit moves {effect:.2e})"
    assert effect > 1e-2, f"the edit moves the log-probs by only {effect:.2e}"
    assert sf.stats.to_dict()["smi"]["injections_per_layer"] == {str(l): len(edits)
                                                                 for l in layers}
    if variant == "paper_code":  # the value bias is part of what is added
        no_bias = _hf_log_probs(biased[arch], tokens, edits, variant, layers, alpha,
                                value_bias=False)
        assert (ours - no_bias).abs().max().item() > 100 * 1e-5


@pytest.mark.parametrize("variant", ["resid_post", "paper_code"])
def test_smi_variants_cached_uncached_batched(models, variant):
    """KV-cached equals uncached and a left-padded batch equals one-by-one, per variant."""
    model = models["gpt-oss"]
    fmt = info_of(model).format
    opener = "" if fmt.prompt_opens_thinking else fmt.think_open
    prompts = [fmt.prompt(QUESTION) + opener + THINKING,
               fmt.prompt("Start with 2. Add 1.") + opener + "We begin with the number two. "]
    cfg = {"tau_max": 0.0, "alpha": 4.0, "smi_layers": [0, 1], "smi_variant": variant}
    batched = generate(model, prompts=prompts, stepflow=StepFlowConfig(**cfg), max_new_tokens=10, batch_size=2,
                       progress=False)
    for prompt, b in zip(prompts, batched):
        [s] = generate(model, prompts=[prompt], stepflow=StepFlowConfig(**cfg), max_new_tokens=10, progress=False)
        assert b.token_ids == s.token_ids and b.stats["smi"] == s.stats["smi"]
    assert batched[0].stats["smi"]["injections"] > 0
    tokens = _prompt_tokens(model)
    with stepflow(model, **cfg) as sf:
        cached = _greedy(model, tokens, True)
    assert sf.stats.to_dict()["smi"]["injections"] > 0
    with stepflow(model, **cfg):
        uncached = _greedy(model, tokens, False)
    assert torch.equal(cached, uncached)


def test_oeb_hook_touches_only_thinking_and_summary_queries(models):
    model = models["llama"]
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, model)
    seen = {}

    def record(pattern, hook):
        seen["p"] = pattern.detach().clone()

    name = "blocks.0.attn.hook_pattern"
    with model.hooks(fwd_hooks=[(name, record)]):
        model(trace.token_ids[None])
    plain = seen["p"]
    with stepflow(model, tau_max=0.5, alpha=0.0) as sf:
        with model.hooks(fwd_hooks=[(name, record)]):
            model(trace.token_ids[None])
    edited = seen["p"]
    moved = (edited != plain).any(-1).any(1)[0]  # [query]
    t0, _ = trace.segment_token_span("thinking")
    assert not bool(moved[:t0].any())  # question and template queries untouched
    assert bool(moved[t0:].any())
    torch.testing.assert_close(edited.sum(-1), plain.sum(-1))
    assert sf.stats.to_dict()["oeb"]["triggers"] > 0


@pytest.mark.parametrize("variant", ["resid_post", "paper_code"])
def test_saliency_with_stepflow_on(models, variant):
    model = models["qwen2"]
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, model)
    off = step_saliency(model, trace)
    with stepflow(model, tau_max=0.5, alpha=1.0, smi_variant=variant):
        on = step_saliency(model, trace)
        on_low = step_saliency(model, trace, low_memory=True)
    assert not torch.allclose(on.maps, off.maps)
    torch.testing.assert_close(on.maps, on_low.maps, atol=1e-6, rtol=1e-4)


def test_hooks_removed_after_an_error(models):
    model = models["qwen2"]
    tokens = _prompt_tokens(model)
    clean = model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with stepflow(model, tau_max=0.5, alpha=1.0):
            model(tokens)
            raise RuntimeError("boom")
    assert torch.equal(model(tokens), clean)
    assert not model._forward_pre_hooks


def test_bad_settings_are_named(models):
    model = models["qwen2"]
    for kwargs, match in (({"tau_max": 1.5}, "tau_max"), ({"oeb_layers": [7]}, "out of range"),
                          ({"window": 0}, "window"), ({"smi_variant": "z"}, "smi_variant"),
                          ({"smi_site": "z"}, "removed; pass smi_variant='paper_code'")):
        with pytest.raises(StepSalError, match=match):
            with stepflow(model, **kwargs):
                pass
    with pytest.raises(StepSalError, match="token ids"):
        with stepflow(model):
            model(torch.randn(1, 3, 4))


def test_batched_equals_one_by_one_with_stepflow(models, arch):
    """Prompts of different lengths, left-padded in one batch, StepFlow on."""
    model = models[arch]
    fmt = info_of(model).format
    opener = "" if fmt.prompt_opens_thinking else fmt.think_open
    prompts = [_hook_prompt(fmt, QUESTION) + opener + THINKING,
               _hook_prompt(fmt, "Start with 2. Add 1.") + opener
               + "We begin with the number two. "]
    cfg = {"tau_max": 0.5, "alpha": 2.0, "oeb_layers": [0, 1]}
    batched = generate(model, prompts=prompts, stepflow=StepFlowConfig(**cfg), max_new_tokens=8,
                       batch_size=2, progress=False)
    for prompt, b in zip(prompts, batched):
        [s] = generate(model, prompts=[prompt], stepflow=StepFlowConfig(**cfg), max_new_tokens=8,
                       progress=False)
        assert b.token_ids == s.token_ids
        assert b.stats["smi"] == s.stats["smi"]
        assert b.stats["oeb"]["triggers_per_layer"] == s.stats["oeb"]["triggers_per_layer"]
    assert batched[0].stats["oeb"]["triggers"] > 0


def test_stats_sum_over_passes(models):
    model = models["qwen2"]
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, model)
    with stepflow(model, tau_max=0.5, alpha=1.0) as sf:
        model(trace.token_ids[None])
        once = sf.stats.to_dict()
        model(trace.token_ids[None])
    twice = sf.stats.to_dict()
    assert once["smi"]["injections"] == len(trace.steps_in("thinking")) - 1
    assert twice["smi"]["injections"] == 2 * once["smi"]["injections"]
    assert twice["oeb"]["triggers"] == 2 * once["oeb"]["triggers"] > 0
    assert twice["oeb"]["mean_bridge_mass_after"] == pytest.approx(
        once["oeb"]["mean_bridge_mass_after"])
    assert len(sf.stats.per_row()) == 1  # the last batch only
