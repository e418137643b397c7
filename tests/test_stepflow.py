"""StepFlow: OEB against the paper's logit-shift form, SMI exactness, the streaming
tracker against offline segmentation, and generation invariants on real bridges."""

from __future__ import annotations

import pytest
import torch

from stepsal_lens import StepSalError, Trace, get_format, step_saliency, stepflow
from stepsal_lens.generation import generate, prompt_ids
from stepsal_lens.stepflow import SEGMENT_CODES, SegmentTracker, odds_equal_bridge, step_momentum

# A thinking prefix the random models continue, so StepFlow acts in the prompt too.
QUESTION = "Start with 7. Add 5, then multiply by 2. What is the result?"
THINKING = ("We start with the number seven. Adding five to seven gives twelve. "
            "Twelve times two makes twenty four.")
SUMMARY = "The result is twenty four.\n\nSo the answer is 24."


# ---- the pure OEB core ------------------------------------------------------------------

def _logit_shift_reference(z, sink, same, bridge, tau_max):
    """The paper's form: z_k + log(tau_g / p_g) on the logits, then softmax (float64)."""
    z, sink = z.double(), None if sink is None else sink.double()
    full = z if sink is None else torch.cat([z, sink], -1)
    keys_lse = torch.logsumexp(z, -1)

    def mass(mask):
        return torch.exp(torch.logsumexp(z.masked_fill(~mask, -torch.inf), -1) - keys_lse)

    p_s, p_b = mass(same), mass(bridge)
    n_s, n_b = same.sum(-1).double(), bridge.sum(-1).double()
    tau_b = torch.minimum(torch.sqrt(n_b / (n_b + n_s)), torch.tensor(tau_max, dtype=torch.float64))
    tau_s = p_s + p_b - tau_b
    act = (n_b > 0) & (n_s > 0) & (p_b < tau_b) & (tau_s > 0)
    shift = torch.zeros_like(z)
    shift = torch.where(act[..., None] & bridge, torch.log(tau_b / p_b)[..., None], shift)
    shift = torch.where(act[..., None] & same, torch.log(tau_s / p_s)[..., None], shift)
    shifted = z + shift
    out = torch.softmax(shifted if sink is None else torch.cat([shifted, sink], -1), -1)
    return out[..., :z.shape[-1]], act


@pytest.mark.parametrize("with_sink", [False, True])
def test_oeb_equals_logit_shift_form(with_sink):
    gen = torch.Generator().manual_seed(0)
    batch, heads, n_q, n_k = 3, 4, 6, 12
    z = torch.randn(batch, heads, n_q, n_k, generator=gen) * 2.5
    q_pos = torch.arange(n_k - n_q, n_k)
    visible = torch.arange(n_k)[None, :] <= q_pos[:, None]  # causal, [query, key]
    z = z.masked_fill(~visible, -torch.inf)
    sink = torch.randn(batch, heads, n_q, 1, generator=gen) * 2 if with_sink else None
    question = torch.arange(n_k) < 4
    thinking = torch.arange(n_k) >= 5  # key 4 is a template token ("other")
    same = (visible & thinking)[None, None].expand(batch, 1, n_q, n_k)
    bridge = (visible & question)[None, None].expand(batch, 1, n_q, n_k)

    probs = torch.softmax(z if sink is None else torch.cat([z, sink], -1), -1)[..., :n_k]
    ref, act = _logit_shift_reference(z, sink, same, bridge, 0.15)
    out = odds_equal_bridge(probs, same, bridge, tau_max=0.15)
    assert 0 < int(act.sum()) < act.numel()  # some rows move, some do not
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    # the sink mass is unchanged
    torch.testing.assert_close(out.sum(-1), probs.sum(-1), atol=1e-6, rtol=0)


def test_oeb_leaves_rows_alone():
    a = torch.tensor([[[[0.30, 0.10, 0.20, 0.40],    # p_B = 0.4 >= tau_B: untouched
                        [0.01, 0.01, 0.08, 0.90]]]])  # p_B = 0.02 < tau_B: moves
    bridge = torch.tensor([True, True, False, False])
    out = odds_equal_bridge(a, ~bridge, bridge, tau_max=0.15)
    assert torch.equal(out[..., 0, :], a[..., 0, :])
    assert out[..., 1, :2].sum().item() == pytest.approx(0.15)
    # odds inside each group are kept
    assert out[0, 0, 1, 3] / out[0, 0, 1, 2] == pytest.approx(0.90 / 0.08)
    assert torch.equal(odds_equal_bridge(a, ~bridge, bridge, tau_max=0.0), a)
    # empty groups (e.g. a query in the question) leave the row alone
    none = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(odds_equal_bridge(a, none, bridge), a)
    with pytest.raises(StepSalError, match="overlap"):
        odds_equal_bridge(a, bridge, bridge)


def test_step_momentum():
    x, window = torch.randn(5), torch.randn(3, 5)
    torch.testing.assert_close(step_momentum(x, window, 0.1), x + 0.1 * window.mean(0))


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


def test_tracker_short_piece_is_a_step_online_only(tokenizer):
    fmt = get_format("think-tags")
    thinking = "We start with the number seven. So 12. Twelve times two makes twenty four."
    text = fmt.render(QUESTION, thinking, "The result is 24.")
    tracker, _ = _feed_one_by_one(tokenizer, fmt, text)
    trace = Trace.from_text(text, tokenizer, format=fmt)
    online = set(torch.nonzero(tracker.step_start[0]).flatten().tolist())
    offline = {s.token_span[0] for s in trace.steps}
    # "So 12." is too short to be a step offline; online it starts one
    assert offline < online and len(online - offline) == 1
    assert tracker.trace().step_of_token.tolist() == trace.step_of_token.tolist()


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
    fmt = model.stepsal_format
    text = _hook_prompt(fmt, QUESTION) + ("" if fmt.prompt_opens_thinking else fmt.think_open) + thinking
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
    batched = generate(tiny_lrm, qs, stepflow=cfg, batch_size=3, max_new_tokens=96,
                       progress=False)
    single = [generate(tiny_lrm, [q], stepflow=cfg, max_new_tokens=96, progress=False)[0]
              for q in qs]
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids
        assert b.stats["smi"] == s.stats["smi"]
        assert b.stats["oeb"]["triggers"] == s.stats["oeb"]["triggers"]
        n_thinking = len(s.trace(tiny_lrm).steps_in("thinking"))
        prompt_steps = 0  # the prompt ends with <think>: every injection is generated
        assert s.stats["smi"]["injections"] == n_thinking - 1 - prompt_steps
    fmt = tiny_lrm.stepsal_format
    ids = torch.tensor([prompt_ids(tiny_lrm, fmt.prompt(qs[1]))])
    with stepflow(tiny_lrm, **cfg):
        cached = _greedy(tiny_lrm, ids, True, n=60)
        uncached = _greedy(tiny_lrm, ids, False, n=60)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("site", ["resid_post", "z"])
def test_smi_adds_exactly_alpha_window_mean(models, site):
    model = models["qwen2"]
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, model)
    layer, alpha, window = 1, 0.25, 3
    name = f"blocks.{layer}.hook_resid_post" if site == "resid_post" else f"blocks.{layer}.attn.hook_z"
    seen: dict[str, torch.Tensor] = {}

    def record(key):
        def hook(act, hook):
            seen[key] = act.detach().clone()
        return hook

    tokens = trace.token_ids[None]
    with model.hooks(fwd_hooks=[(name, record("before"))]):
        with stepflow(model, tau_max=0.0, alpha=alpha, smi_layers=[layer], window=window,
                      smi_site=site) as sf:
            with model.hooks(fwd_hooks=[(name, record("after"))]):
                model(tokens)
    before, after = seen["before"][0], seen["after"][0]
    expected = before.clone()
    thinking = trace.steps_in("thinking")
    text_of = trace.str_tokens()
    for prev, cur in zip(thinking, thinking[1:]):
        a, b = trace.steps[prev].token_span
        win = [t for t in range(a, b) if text_of[t].strip()][-window:]
        start = trace.steps[cur].token_span[0]
        expected[start] = before[start] + alpha * before[win].mean(0)
    assert len(thinking) >= 3
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)
    changed = (after != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [trace.steps[i].token_span[0] for i in thinking[1:]]
    assert sf.stats.to_dict()["smi"]["injections"] == len(thinking) - 1


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


def test_saliency_with_stepflow_on(models):
    model = models["qwen2"]
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, model)
    off = step_saliency(model, trace)
    with stepflow(model, tau_max=0.5, alpha=1.0):
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
                          ({"window": 0}, "window"), ({"smi_site": "mlp"}, "smi_site")):
        with pytest.raises(StepSalError, match=match):
            with stepflow(model, **kwargs):
                pass
    with pytest.raises(StepSalError, match="token ids"):
        with stepflow(model):
            model(torch.randn(1, 3, 4))


def test_batched_equals_one_by_one_with_stepflow(models, arch):
    """Prompts of different lengths, left-padded in one batch, StepFlow on."""
    model = models[arch]
    fmt = model.stepsal_format
    opener = "" if fmt.prompt_opens_thinking else fmt.think_open
    prompts = [_hook_prompt(fmt, QUESTION) + opener + THINKING,
               _hook_prompt(fmt, "Start with 2. Add 1.") + opener + "We begin with the number two. "]
    cfg = {"tau_max": 0.5, "alpha": 2.0, "oeb_layers": [0, 1]}
    batched = generate(model, prompts=prompts, stepflow=cfg, max_new_tokens=8, batch_size=2,
                       progress=False)
    for prompt, b in zip(prompts, batched):
        [s] = generate(model, prompts=[prompt], stepflow=cfg, max_new_tokens=8, progress=False)
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
