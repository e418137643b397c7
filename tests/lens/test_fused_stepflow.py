"""The fused StepFlow engine against the hook_pattern engine on the four random realistic
checkpoints (non-zero biases, GPT-OSS sinks and sliding windows, Qwen3 QK-norm, Llama 3.1
and YaRN RoPE scaling): teacher-forced logits, statistics, KV-cached batched greedy
generation with left padding, both SMI variants; restoring everything after errors."""

from __future__ import annotations

import copy

import pytest
import torch

from stepsal_lens import StepFlowConfig, StepSalError, get_format, load_lrm, step_saliency, stepflow
from stepsal_lens.lens import bridge_mode, fused, fused_stepflow
from stepsal_lens.lens.engines import choose
from stepsal_lens.lens.fused_stepflow import generate_tokens
from stepsal_lens.lens.generation import generate, prompt_ids
from stepsal_lens.segments.association import info_of
from stepsal_lens.zoo.tiny_random import make_random_checkpoint

Q = "Start with 7. Add 5, then multiply by 2. What is the result?"
T = ("We start with the number seven. Adding five to seven gives twelve. "
     "Twelve times two makes twenty four.")
S = "The result is twenty four.\n\nSo the answer is 24."
# strong settings on 3 layers: OEB on layers 0 (GPT-OSS: a sliding-window layer) and 1,
# SMI on 1 and 2 (paper_code: 1 only); layer 2's attention runs plain sdpa
CFG = {"tau_max": 0.5, "alpha": 2.0, "oeb_layers": [0, 1], "smi_layers": [1, 2]}
TOL = 1e-5


def choose_engine(model, engine="auto", *, block=False):
    """(name, reason) of the StepFlow engine choice, as the former chooser returned it."""
    chosen = choose(model, engine, needs_hooks=block, purpose="stepflow")
    return chosen.name, chosen.reason


@pytest.fixture(scope="module")
def bridges(tmp_path_factory, tokenizer, arch_formats):
    """architecture -> 3-layer bridge (d_model 64, 4 heads, 2 key/value heads)."""
    root = tmp_path_factory.mktemp("fused-stepflow")
    out = {}
    for i, (arch, name) in enumerate(arch_formats.items()):
        path = make_random_checkpoint(arch, root / arch, tokenizer=tokenizer, seed=10 + i,
                                      n_layers=3)
        fmt = get_format(name)
        if arch == "gpt-oss":
            fmt = fmt.with_options(current_date="2025-08-05")
        out[arch] = load_lrm(path, device="cpu", format=fmt)
    return out


def _without_system(fmt, text):
    """gpt-oss's system message holds most of a random model's attention, so OEB (which
    leaves rows whose other keys hold more than 1 - tau_B alone) would never act."""
    return text[text.index(fmt.user_open):] if fmt.name == "gpt-oss" else text


def _trace_tokens(model):
    fmt = info_of(model).format
    return torch.tensor([prompt_ids(model, _without_system(fmt, fmt.render(Q, T, S)))])


def _prompts(model):
    fmt = info_of(model).format
    opener = "" if fmt.prompt_opens_thinking else fmt.think_open
    return [_without_system(fmt, fmt.prompt(Q)) + opener + T,
            _without_system(fmt, fmt.prompt("Start with 2. Add 1.")) + opener
            + "We begin with the number two. Then we add one. "]


def _run(model, tokens, engine, **cfg):
    with stepflow(model, engine=engine, **cfg) as sf, torch.no_grad():
        logits = model(tokens)
    return logits, sf


def _counts(stats):
    """Everything but the float means (those agree to float rounding)."""
    return {part: {k: v for k, v in d.items() if not k.startswith("mean_")}
            for part, d in stats.items()}


def _assert_same_stats(a, b):
    assert _counts(a) == _counts(b)
    for key in ("mean_bridge_mass_before", "mean_bridge_mass_after"):
        assert a["oeb"][key] == pytest.approx(b["oeb"][key], abs=1e-6), key


@pytest.mark.parametrize("variant", ["resid_post", "paper_code"])
def test_teacher_forced_logits_and_stats_equal_hook_pattern(arch, variant, bridges):
    model = bridges[arch]
    tokens = _trace_tokens(model)
    with torch.no_grad():
        plain = model(tokens)
    ours, sf = _run(model, tokens, "fused", smi_variant=variant, **CFG)
    ref, sf_ref = _run(model, tokens, "hook_pattern", smi_variant=variant, **CFG)
    assert sf.engine == "fused" and sf_ref.engine == "hook_pattern"
    err, effect = (ours - ref).abs().max().item(), (ref - plain).abs().max().item()
    assert err < TOL, f"{arch}/{variant}: max |fused - hook_pattern| logits = {err:.2e}"
    assert effect > 1e-1, f"{arch}/{variant}: StepFlow moves the logits by only {effect:.2e}"
    stats = sf.stats.to_dict()
    assert stats["oeb"]["triggers"] > 0 and stats["smi"]["injections"] > 0, stats
    _assert_same_stats(stats, sf_ref.stats.to_dict())


def test_explicit_rows_in_blocks(bridges, monkeypatch):
    """Tiny blocks of query rows (one row each) give the same logits and counts."""
    model = bridges["gpt-oss"]
    tokens = _trace_tokens(model)
    ref, sf_ref = _run(model, tokens, "fused", **CFG)
    monkeypatch.setattr(fused_stepflow, "_BLOCK_BUDGET", 1)
    ours, sf = _run(model, tokens, "fused", **CFG)
    assert (ours - ref).abs().max().item() < TOL
    _assert_same_stats(sf.stats.to_dict(), sf_ref.stats.to_dict())


@pytest.mark.parametrize("variant", ["resid_post", "paper_code"])
def test_batched_cached_greedy_generation_equals_hook_pattern(arch, variant, bridges):
    """Two prompts of different lengths, left-padded in one batch, KV-cached."""
    model = bridges[arch]
    cfg = StepFlowConfig(smi_variant=variant, **CFG)
    runs = {engine: generate(model, prompts=_prompts(model), stepflow=cfg, engine=engine,
                             max_new_tokens=8, batch_size=2, progress=False)
            for engine in ("fused", "hook_pattern")}
    for ours, ref in zip(runs["fused"], runs["hook_pattern"]):
        assert ours.engine == "fused" and ref.engine == "hook_pattern"
        assert ours.token_ids == ref.token_ids
        _assert_same_stats(ours.stats, ref.stats)
    first = runs["fused"][0].stats
    assert first["oeb"]["triggers"] > 0 and first["smi"]["injections"] > 0, first
    plain = generate(model, prompts=_prompts(model), max_new_tokens=8, batch_size=2,
                     progress=False)
    assert [g.token_ids for g in plain] != [g.token_ids for g in runs["fused"]]


def test_plain_generation_is_the_same_on_both_engines(arch, bridges):
    model = bridges[arch]
    runs = [generate(model, prompts=_prompts(model), engine=engine, max_new_tokens=8,
                     batch_size=2, progress=False) for engine in ("fused", "hook_pattern")]
    assert [g.token_ids for g in runs[0]] == [g.token_ids for g in runs[1]]
    assert runs[0][0].engine == "fused" and runs[0][0].stepflow is None


def test_sampling_is_the_same_on_both_engines(bridges):
    model = bridges["qwen2"]
    runs = [generate(model, prompts=_prompts(model), stepflow=StepFlowConfig(**CFG),
                     engine=engine, temperature=1.0, seed=3, max_new_tokens=8, batch_size=2,
                     progress=False) for engine in ("fused", "hook_pattern")]
    assert [g.token_ids for g in runs[0]] == [g.token_ids for g in runs[1]]


@pytest.mark.parametrize("arch_", ["llama", "gpt-oss"])
def test_other_generation_loops_inside_a_fused_block(arch_, bridges):
    """Hugging Face's generate (it passes an empty cache to the prefill) and the bridge's
    generate, inside a fused block, equal the engine's own loop."""
    model = bridges[arch_]
    tokens = torch.tensor([prompt_ids(model, _prompts(model)[0])])
    mask = torch.ones_like(tokens)
    with stepflow(model, engine="fused", **CFG) as sf:
        ours = generate_tokens(model, tokens, mask, max_new_tokens=6)
        stats = sf.stats.to_dict()
        config = copy.deepcopy(model.original_model.generation_config)
        config.eos_token_id, config.pad_token_id = -1, 0  # never stops early
        config.max_new_tokens, config.do_sample = 6, False
        with torch.no_grad():
            hf = model.original_model.generate(tokens, attention_mask=mask,
                                               generation_config=config)
        bridge = model.generate(tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False,
                                verbose=False)
    assert stats["oeb"]["triggers"] > 0
    assert torch.equal(ours, hf) and torch.equal(ours, bridge)
    assert sf.stats.to_dict()["smi"]["injections"] == 3 * stats["smi"]["injections"]


def _state(model):
    hf = model.original_model
    return ([(name, id(m)) for name, m in hf.named_modules()],
            hf.config._attn_implementation, hf.config.output_attentions,
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules()),
            dict(model._forward_pre_hooks))


def test_everything_restored_after_an_error(bridges):
    model = bridges["gpt-oss"]
    tokens = _trace_tokens(model)
    logits = model(tokens)
    before = _state(model)  # after a first pass (transformers adds its hooks then)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    for variant in ("resid_post", "paper_code"):
        with pytest.raises(RuntimeError, match="boom"):
            with stepflow(model, engine="fused", smi_variant=variant, **CFG):
                model(tokens)
                assert model.original_model.config._attn_implementation == \
                    fused_stepflow.ATTN_IMPLEMENTATION
                raise RuntimeError("boom")
        assert _state(model) == before
        assert not fused_stepflow._OWNERS and not list(bridge_mode._RUNNING)
    # the bridge and users' hooks work as before
    torch.testing.assert_close(model(tokens), logits, rtol=0, atol=0)
    _, again = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    torch.testing.assert_close(again["blocks.1.attn.hook_pattern"],
                               cache["blocks.1.attn.hook_pattern"], rtol=0, atol=0)
    seen = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: seen.append(1))]):
        model(tokens)
    assert seen == [1]
    # an error inside a hook (the tracker refuses float input) restores everything too
    with pytest.raises(StepSalError):
        with stepflow(model, engine="fused", **CFG):
            model.original_model(inputs_embeds=torch.randn(1, 3, model.cfg.d_model))
    assert _state(model) == before


def test_bridge_hooks_need_the_hook_pattern_engine(bridges):
    model = bridges["qwen2"]
    tokens = _trace_tokens(model)
    with stepflow(model, engine="fused", **CFG):
        with pytest.raises(StepSalError, match="engine='hook_pattern'"):
            model.run_with_cache(tokens)
    with stepflow(model, engine="fused", **CFG):
        with pytest.raises(StepSalError, match="engine='hook_pattern'"):
            step_saliency(model, _trace(model))
    assert not fused.attention_hooks_in_use(model)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x)]):
        assert choose_engine(model)[0] == "hook_pattern"
        with pytest.raises(StepSalError, match="blocks.0.hook_resid_post"):
            choose_engine(model, "fused")
        [g] = generate(model, prompts=_prompts(model)[:1], max_new_tokens=2, progress=False)
        assert g.engine == "hook_pattern"
    assert choose_engine(model) == ("fused", "default")
    assert choose_engine(model, block=True)[0] == "hook_pattern"
    with pytest.raises(StepSalError, match="unknown StepFlow engine 'fast'"):
        choose_engine(model, "fast")
    with pytest.raises(StepSalError, match="unknown StepFlow engine"):
        with stepflow(model, engine="fast"):
            pass


def _trace(model):
    from stepsal_lens import Trace

    return Trace.from_token_ids(_trace_tokens(model)[0].tolist(), model)


def test_low_precision_sinks_fall_back(checkpoints, arch_formats):
    """The same choice as step_saliency's engine: bfloat16 with sinks runs hook_pattern."""
    model = load_lrm(checkpoints["gpt-oss"], device="cpu", dtype="bfloat16",
                     format=arch_formats["gpt-oss"])
    assert choose_engine(model) == ("hook_pattern", "attention sinks in a low-precision model")
    assert choose_engine(model, "fused") == ("fused", "requested")


class _Attention(torch.nn.Module):
    """What the attention function reads off a Hugging Face attention module."""

    def __init__(self, layer: int, groups: int):
        super().__init__()
        self.layer_idx, self.num_key_value_groups, self.is_causal = layer, groups, True


@pytest.mark.parametrize("first, padded, sinks", [(1, False, False), (4, False, False),
                                                   (4, True, False), (0, True, True),
                                                   (3, False, True)])
def test_attention_function_against_eager_reference(first, padded, sinks, bridges,
                                                    monkeypatch):
    """Rows in front of the first thinking query through sdpa, the rest explicitly in
    blocks (here of 3 rows), against eager attention + odds_equal_bridge on every row."""
    from stepsal_lens.lens.stepflow import StepFlow
    from stepsal_lens.core.interventions import odds_equal_bridge

    torch.manual_seed(0)
    n, heads, kv, d, layer = 11, 4, 2, 8, 0
    sf = StepFlow(bridges["qwen2"], StepFlowConfig(tau_max=0.5, alpha=0.0, oeb_layers=[layer]),
                  engine="fused")
    sf._oeb_set, sf._pass = {layer}, 1
    sf.stats.start_batch(2)
    segment = torch.tensor([[0] * first + [1] * (n - first - 3) + [2] * 3] * 2)
    valid = torch.ones(2, n, dtype=torch.bool)
    if padded:
        valid[1, :2] = False
        segment[1, :2] = -1
    sf._labels = {"segment": segment, "valid": valid}
    q, k = torch.randn(2, heads, n, d) * 2, torch.randn(2, kv, n, d) * 2
    v = torch.randn(2, kv, n, d)
    s_aux = torch.randn(heads) if sinks else None
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    full = causal[None, None] & valid[:, None, None, :]
    mask = full if padded else None  # what sdpa's mask builder passes
    module = _Attention(layer, heads // kv)
    monkeypatch.setitem(fused_stepflow._OWNERS, module, sf)
    monkeypatch.setattr(fused_stepflow, "_BLOCK_BUDGET", 3 * 3 * 4 * 2 * heads * n)
    ours, _ = fused_stepflow.stepflow_attention(module, q, k, v, mask, scaling=0.3, s_aux=s_aux)

    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kr.transpose(2, 3) * 0.3).masked_fill(~full, torch.finfo(q.dtype).min)
    if sinks:
        cat = torch.cat([scores, s_aux.reshape(1, -1, 1, 1).expand(2, -1, n, 1)], -1)
        pattern = cat.softmax(-1)[..., :-1]
    else:
        pattern = scores.softmax(-1)
    # the groups from the definition: thinking queries see thinking (same) and question
    # (bridge) keys, summary queries summary and thinking keys
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    think, summ = q_seg == 1, q_seg == 2
    same = full[:, 0] & ((think & (k_seg == 1)) | (summ & (k_seg == 2)))
    bridge = full[:, 0] & ((think & (k_seg == 0)) | (summ & (k_seg == 1)))
    ref = (odds_equal_bridge(pattern, same[:, None], bridge[:, None], tau_max=0.5) @ vr)
    ref = ref.transpose(1, 2)
    real = valid[:, :, None, None].expand_as(ref)  # padded query rows are never read
    err = (ours - ref)[real].abs().max().item()
    assert err < 1e-5, f"max |ours - eager + OEB| = {err:.2e}"
    assert sf.stats.to_dict()["oeb"]["triggers"] > 0
