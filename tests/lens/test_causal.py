"""Step knockout, the causal effect matrix, receiver heads, step patching, saliency vs
causality: each against an independent computation (Hugging Face eager with the cut as
an attention mask; scipy on hand-built maps; closed forms)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from scipy import stats

from causal_reference import reference_effects
from stepsal_lens import (StepEffects, StepSalError, Suppression, Trace, correlation_summary,
                          patch_step, receiver_heads, saliency_effect_correlation,
                          step_effects, step_knockout, step_saliency, stepflow)
from stepsal_lens.lens.knockout import Knockout

QUESTION = "Start with 7. Add 5, then multiply by 2. What is the result?"
THINKING = ("We start with the number 7. Adding 5 to 7 gives 12 in total. "
            "Then 12 times 2 gives 24 as the product. So the final value is 24 here.")
SUMMARY = "The result is 24.\n\nSo the answer is \\boxed{24}."
TOL = 1e-5


@pytest.fixture(scope="module")
def traces(models):
    return {a: Trace.from_segments(QUESTION, THINKING, SUMMARY, m) for a, m in models.items()}


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {a: transformers.AutoModelForCausalLM.from_pretrained(p, attn_implementation="eager")
            for a, p in checkpoints.items()}


def _hooks_left(model) -> int:
    return (sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values())
            + len(model._forward_pre_hooks))


# ---- the renormalisation ------------------------------------------------------------------


# ---- the hook -----------------------------------------------------------------------------

def test_knockout_with_no_steps_is_a_plain_forward(arch, models, traces):
    model, ids = models[arch], traces[arch].token_ids[None]
    with torch.no_grad():
        plain = model(ids)
        with step_knockout(model, traces[arch], keys=[]):
            same = model(ids)
    assert torch.equal(plain, same)
    assert _hooks_left(model) == 0


def test_knockout_leaves_earlier_positions_and_changes_later(arch, models, traces):
    model, trace = models[arch], traces[arch]
    ids = trace.token_ids[None]
    end = trace.steps[1].token_span[1]
    with torch.no_grad():
        plain = model(ids)
        with step_knockout(model, trace, keys=[1]):
            cut = model(ids)
    assert torch.equal(plain[0, :end], cut[0, :end])
    assert float((plain[0, end:] - cut[0, end:]).abs().max()) > 1e-3


def test_knockout_hooks_are_removed_on_errors(models, traces):
    model, trace = models["qwen2"], traces["qwen2"]
    with pytest.raises(RuntimeError, match="boom"):
        with step_knockout(model, trace, keys=[0, 1]):
            raise RuntimeError("boom")
    assert _hooks_left(model) == 0
    ko = Knockout(model, rows=[[Suppression((0, 2))], [Suppression((1, 3))]])
    with pytest.raises(StepSalError, match="batch of 1"):  # raised inside a hook
        with ko.active():
            model(trace.token_ids[None])
    assert _hooks_left(model) == 0


def test_knockout_refuses_bad_input(models, traces):
    model, trace = models["qwen2"], traces["qwen2"]
    with pytest.raises(StepSalError, match="not a step of the trace"):
        with step_knockout(model, trace, keys=[99]):
            pass
    with pytest.raises(StepSalError, match="layers \\[7\\] out of range"):
        with step_knockout(model, trace, keys=[0], layers=[7]):
            pass
    with pytest.raises(StepSalError, match="needs trace"):
        with step_knockout(model, keys=[1]):
            pass
    with pytest.raises(StepSalError, match="non-empty token span"):
        Suppression((3, 3))


def test_knockout_composes_with_stepflow(models, traces):
    model, trace = models["qwen2"], traces["qwen2"]
    ids = trace.token_ids[None]
    with torch.no_grad():
        plain = model(ids)
        with step_knockout(model, trace, keys=[1]):
            ko_only = model(ids)
        with stepflow(model, tau_max=0.5, alpha=1.0):
            sf_only = model(ids)
        with stepflow(model, tau_max=0.5, alpha=1.0), step_knockout(model, trace, keys=[1]):
            both = model(ids)
        after = model(ids)
    assert torch.equal(after, plain) and _hooks_left(model) == 0
    assert float((both - ko_only).abs().max()) > 1e-3 and float((both - sf_only).abs().max()) > 1e-3


def test_knockout_in_generation_cached_uncached_batched(arch, models):
    model = models[arch]
    prompts = ["Start with 7. Add 5, then multiply by 2. What is the result?",
               "Start with 3. Add 4. What is it?"]
    kw = dict(max_new_tokens=10, do_sample=False, verbose=False, stop_at_eos=False,
              return_type="tokens")
    keys = [(1, 6)]  # each row's own tokens 1..5, padding excluded
    outs = {}
    with step_knockout(model, keys=keys) as ko:
        outs["cached"] = [model.generate(p, use_past_kv_cache=True, **kw)[0].tolist()
                          for p in prompts]
        outs["uncached"] = [model.generate(p, use_past_kv_cache=False, **kw)[0].tolist()
                            for p in prompts]
        batched = model.generate(prompts, use_past_kv_cache=True, **kw)
    pad = model.tokenizer.pad_token_id
    outs["batched"] = []
    for row, single in zip(batched.tolist(), outs["cached"]):
        outs["batched"].append(row[len(row) - len(single):])  # strip the left padding
        assert all(t == pad for t in row[:len(row) - len(single)])
    assert outs["cached"] == outs["uncached"] == outs["batched"], outs
    assert ko.rows_left_alone == 0 and _hooks_left(model) == 0
    # the cut does something during generation: the cached logits move
    ids = model.to_tokens(prompts[0])
    with torch.no_grad():
        plain = model(ids)
        with step_knockout(model, keys=keys):
            cut = model(ids)
    assert float((plain[0, -1] - cut[0, -1]).abs().max()) > 1e-4


# ---- the effect matrix ------------------------------------------------------------------------

def test_effects_equal_hugging_face_with_a_mask(arch, models, traces, hf_models):
    model, trace, hf = models[arch], traces[arch], hf_models[arch]
    ours = step_effects(model, trace, per_layer=True, batch_size=3)
    ref = reference_effects(hf, trace)
    assert float(ref.max()) > 1e-3
    err = float((ours.effects.double() - ref).abs().max())
    assert err < TOL * max(1.0, float(ref.max())), f"{arch}: max |ours - HF| = {err:.2e}"
    if arch != "gpt-oss":  # a 4D mask replaces sliding windows, so only without them
        via_mask = reference_effects(hf, trace, via="mask")
        err_mask = float((ours.effects.double() - via_mask).abs().max())
        assert err_mask < TOL * max(1.0, float(ref.max())), f"{arch} (4D mask): {err_mask:.2e}"
    for r, layer in enumerate(ours.layers):
        ref_l = reference_effects(hf, trace, layers=[layer])
        err_l = float((ours.per_layer[r].double() - ref_l).abs().max())
        assert err_l < TOL * max(1.0, float(ref_l.max())), f"{arch} layer {layer}: {err_l:.2e}"
    assert torch.equal(ours.effects, ours.effects.tril(-1))


def test_effects_batching_and_heads(models, traces):
    model, trace = models["llama"], traces["llama"]
    one = step_effects(model, trace, batch_size=1)
    many = step_effects(model, trace, batch_size=16)
    assert float((one.effects - many.effects).abs().max()) < 1e-6
    some = step_effects(model, trace, layers=[1], heads=[0])
    assert some.layers == [1] and some.heads == [0]
    assert float(some.effects.sum()) < float(one.effects.sum())
    with pytest.raises(StepSalError, match="heads \\[9\\]"):
        step_effects(model, trace, heads=[9])


def test_effects_save_load(tmp_path, models, traces):
    eff = step_effects(models["qwen3"], traces["qwen3"], per_layer=True)
    eff.save(tmp_path)
    t = load_file(tmp_path / "step_effects.safetensors")
    assert t["effects"].dtype == torch.float32 and t["token_ids"].dtype == torch.int64
    back = StepEffects.load(tmp_path)
    assert torch.equal(back.effects, eff.effects) and torch.equal(back.per_layer, eff.per_layer)
    assert back.steps == eff.steps and back.layers == eff.layers
    assert eff.top(3).effect.is_monotonic_decreasing
    df = eff.to_dataframe()
    n = eff.n_steps
    assert len(df) == (1 + len(eff.layers)) * n * (n - 1) // 2
    with pytest.raises(StepSalError, match="StepEffects.save"):
        StepEffects.load(tmp_path / "nothing")


# ---- receiver heads -----------------------------------------------------------------------


def test_receiver_heads_dataframe_and_figure(models, traces):
    model = models["qwen2"]
    rh = receiver_heads(model, [traces["qwen2"]] * 2, k=1)
    df = rh.to_dataframe()
    assert len(df) == model.cfg.n_layers * model.cfg.n_heads
    assert {"kurtosis_attention", "kurtosis_saliency", "rank_saliency"} <= set(df.columns)
    assert df.rank_attention.tolist() == sorted(df.rank_attention.tolist())
    assert len(rh.plot().axes) == 4  # two panels + colour bars


# ---- step patching ------------------------------------------------------------------------

def test_patching_identical_traces_changes_nothing(models, traces):
    model, trace = models["qwen2"], traces["qwen2"]
    for site in ("resid_pre", "resid_post", "z"):
        df = patch_step(model, trace, trace, step=2, site=site, batch_size=3)
        assert float(df.delta.abs().max()) < 1e-5, site
    assert len(df) == model.cfg.n_layers * model.cfg.n_heads


def test_patching_the_embedding_equals_swapping_the_tokens(models, traces):
    model, trace = models["llama"], traces["llama"]
    step = 2
    for number in ("13", "10", "11", "14", "15", "16", "17", "18", "19", "20"):
        other = Trace.from_segments(QUESTION, THINKING.replace("gives 12", f"gives {number}"),
                                    SUMMARY, model)
        if other.steps[step].token_span == trace.steps[step].token_span:
            break
    a, b = trace.steps[step].token_span
    assert other.steps[step].token_span == (a, b) and other.steps[step].text != trace.steps[step].text
    df = patch_step(model, other, trace, step=step, layers=[0])
    swapped = trace.token_ids.clone()
    swapped[a:b] = other.token_ids[a:b]
    from stepsal_lens.lens.targets import answer_token_positions

    pos = answer_token_positions(trace)
    with torch.no_grad():
        lp = model(swapped[None])[0].float().log_softmax(-1)
    ref = float(lp[pos - 1].gather(-1, trace.token_ids[pos, None]).sum())
    assert abs(float(df.logp_patched[0]) - ref) < 1e-4
    assert abs(float(df.delta[0])) > 1e-4


def test_patching_refuses_different_prefixes(models, traces):
    model, trace = models["qwen2"], traces["qwen2"]
    other = Trace.from_segments("Start with 8. Add 5, then multiply by 2. What is the result?",
                                THINKING, SUMMARY, model)
    with pytest.raises(StepSalError, match="tokens before step 2 .* differ"):
        patch_step(model, other, trace, step=2)
    longer = Trace.from_segments(QUESTION, THINKING.replace("We start", "Well, we start"),
                                 SUMMARY, model)
    with pytest.raises(StepSalError, match="covers tokens"):
        patch_step(model, longer, trace, step=1)
    with pytest.raises(StepSalError, match="site must be one of"):
        patch_step(model, trace, trace, step=1, site="mlp")


# ---- saliency vs causality ----------------------------------------------------------------

def test_spearman_per_layer_against_scipy(models, traces):
    model, trace = models["qwen3"], traces["qwen3"]
    sal = step_saliency(model, trace)
    eff = step_effects(model, trace, per_layer=True)
    df = saliency_effect_correlation(sal, eff)
    i, j = np.tril_indices(trace.n_steps, -1)
    for layer in sal.layers:
        x = sal.maps[layer].mean(0).numpy()[i, j]
        ref = stats.spearmanr(x, eff.effects.numpy()[i, j])
        ref_same = stats.spearmanr(x, eff.per_layer[layer].numpy()[i, j])
        row = df[df.layer == layer].iloc[0]
        assert abs(row.rho - ref.statistic) < 1e-12 and abs(row.p - ref.pvalue) < 1e-12
        assert abs(row.rho_same_layer - ref_same.statistic) < 1e-12
    summary = correlation_summary(saliency_effect_correlation([sal] * 3, [eff] * 3))
    assert summary.n.tolist() == [3] * len(sal.layers)
    other = Trace.from_segments(QUESTION, THINKING, SUMMARY + " Done.", model)
    with pytest.raises(StepSalError, match="different token ids"):
        saliency_effect_correlation(step_saliency(model, other), eff)


def test_explorer_toggles_between_saliency_and_effects(models, traces):
    from stepsal_lens.apps.circuits import effect_map
    from stepsal_lens.apps.widgets import explore, step_map

    model, trace = models["qwen2"], traces["qwen2"]
    sal = step_saliency(model, trace)
    eff = step_effects(model, trace, per_layer=True)
    ex = explore(sal, effects=eff)
    close = dict(rtol=1e-5, atol=1e-6)  # the view stores 6 significant digits
    np.testing.assert_allclose(np.array(ex.heatmap.z, float), step_map(sal, 0), **close)
    ex.source.value = "causal effect"
    np.testing.assert_allclose(np.array(ex.heatmap.z, float), effect_map(eff, 0), **close)
    assert ex.heatmap.title == "causal effect (cut in layer 0), row-normalised"
    ex.layer.value = 1
    np.testing.assert_allclose(np.array(ex.heatmap.z, float), effect_map(eff, 1), **close)
    ex.source.value = "saliency"
    np.testing.assert_allclose(np.array(ex.heatmap.z, float), step_map(sal, 1), **close)
    assert ex.static_png()[:4] == b"\x89PNG"


def test_cli_effects_writes_the_contract(tmp_path, checkpoints, models):
    from stepsal_lens.apps.cli import main

    doc = {"question": QUESTION, "thinking": THINKING, "summary": SUMMARY}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert main(["effects", "--model", str(checkpoints["llama"]), "--trace",
                 str(tmp_path / "t.json"), "--out", str(out), "--format", "deepseek-r1",
                 "--layers"]) == 0
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, models["llama"])
    t = load_file(out / "step_effects.safetensors")
    assert t["effects"].shape == (trace.n_steps, trace.n_steps)
    assert t["effects"].dtype == torch.float32 and t["token_ids"].tolist() == trace.token_ids.tolist()
    steps = json.loads((out / "steps.json").read_text())
    assert [(s["token_start"], s["token_end"]) for s in steps["steps"]] == [
        s.token_span for s in trace.steps]
    corr = json.loads((out / "effects.json").read_text())
    assert [r["layer"] for r in corr["spearman"]] == [0, 1]
    assert "rho_same_layer" in corr["spearman"][0]
    assert (out / "effects.png").read_bytes()[:4] == b"\x89PNG"
