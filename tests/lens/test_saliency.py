"""Step-Saliency against an independent computation: Hugging Face eager attention with
retained gradients, pooled with plain Python loops."""

from __future__ import annotations

from stepsal_lens.segments.association import info_of
import pytest
import torch
import transformers

from stepsal_lens import StepSalError, StepSaliency, Trace, step_saliency
from stepsal_lens.lens.targets import get_target, list_targets

Q = "Start with 7. Add 5, then halve it. What is the result?"
T = ("We start with 7 and add 5 which gives 12 here. Then half of 12 is 6 so we get 6. "
     "So the final number is 6 and we check it again.")
S = "The result is 6.\n\nSo the answer is \\boxed{6}."


@pytest.fixture(scope="module")
def traces(models):
    return {arch: Trace.from_segments(Q, T, S, m) for arch, m in models.items()}


def hf_reference(path, trace, target, **kw):
    """|A * dL/dA| from HF eager attentions, pooled step pair by step pair."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    out = hf(trace.token_ids[None], output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    get_target(target)(out.logits.float(), trace, **kw).backward()
    n = trace.n_steps
    ref = torch.zeros(len(out.attentions), out.attentions[0].shape[1], n, n)
    for layer, a in enumerate(out.attentions):
        sal = (a * a.grad).abs()[0]
        for i, si in enumerate(trace.steps):
            for j, sj in enumerate(trace.steps):
                ref[layer, :, i, j] = sal[:, slice(*si.token_span), slice(*sj.token_span)].mean((1, 2))
    return ref


@pytest.mark.parametrize("target", ["lm", "summary", "answer"])
def test_maps_equal_hugging_face_eager(arch, target, checkpoints, models, traces):
    ours = step_saliency(models[arch], traces[arch], target=target).maps
    ref = hf_reference(checkpoints[arch], traces[arch], target)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"{arch}/{target}: max |ours - HF| / max |HF| = {rel:.2e}"


@pytest.mark.parametrize("engine", ["fused", "hook_pattern"])
def test_logit_target_is_the_models_own_logit(engine, arch, checkpoints, models, traces):
    """The model's own parameterisation: the ``logit`` target is Hugging Face's raw logit
    (the default compatibility mode would centre it over the vocabulary)."""
    trace = traces[arch]
    # a position after the thinking: before it gpt-oss has only its system message
    pos = trace.steps[trace.steps_in("thinking")[-1]].token_span[1] + 2
    ours = step_saliency(models[arch], trace, target="logit", position=pos, token=7,
                         engine=engine).maps
    ref = hf_reference(checkpoints[arch], trace, "logit", position=pos, token=7)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"{arch}: max rel diff {rel:.2e}"


def test_low_memory_equals_default(arch, models, traces):
    a = step_saliency(models[arch], traces[arch]).maps
    b = step_saliency(models[arch], traces[arch], low_memory=True).maps
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel < 1e-5, f"{arch}: low_memory differs by {rel:.2e}"


def test_low_memory_recomputes_each_layer(models, traces):
    """Checkpointing shows as a second forward of every layer during backward."""
    model, calls = models["qwen2"], []

    def count(pattern, hook):
        calls.append(hook.name)

    for low, expected in ((False, 1), (True, 2)):
        calls.clear()
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", count)]):
            step_saliency(model, traces["qwen2"], low_memory=low)
        assert len(calls) == expected


def test_layer_subset(models, traces):
    full = step_saliency(models["llama"], traces["llama"]).maps
    for low in (False, True):
        part = step_saliency(models["llama"], traces["llama"], layers=[1], low_memory=low)
        assert part.layers == [1]
        torch.testing.assert_close(part.maps[0], full[1], rtol=1e-5, atol=1e-9)


def test_bfloat16_model_accumulates_in_float32(checkpoints, traces):
    from stepsal_lens import load_lrm

    model = load_lrm(checkpoints["qwen2"], device="cpu", dtype="bfloat16", format="deepseek-r1")
    ours = step_saliency(model, traces["qwen2"])
    ref = hf_reference(checkpoints["qwen2"], traces["qwen2"], "lm")
    assert ours.maps.dtype == torch.float32
    rel = ((ours.maps - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.1, f"bfloat16 maps are off by {rel:.2e} of the largest value"


def test_hooks_are_removed_after_success_and_error(models, traces):
    model = models["qwen3"]
    step_saliency(model, traces["qwen3"], low_memory=True)
    step_saliency(model, traces["qwen3"])
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
    assert all(p.requires_grad for p in model.parameters())

    def broken(logits, trace):
        raise RuntimeError("target failed")

    for low in (False, True):
        with pytest.raises(RuntimeError, match="target failed"):
            step_saliency(model, traces["qwen3"], target=broken, low_memory=low)
        assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
        assert all(p.requires_grad for p in model.parameters())
        assert not model.training and not model.original_model.is_activation_checkpointing


def test_save_load_round_trip(tmp_path, models, traces):
    sal = step_saliency(models["gpt-oss"], traces["gpt-oss"], layers=[0, 1])
    sal.save(tmp_path)
    back = StepSaliency.load(tmp_path)
    assert torch.equal(back.maps, sal.maps) and torch.equal(back.token_ids, sal.token_ids)
    assert back.steps == sal.steps and back.layers == sal.layers
    assert back.meta["target"] == "lm" and back.meta["format"] == "gpt-oss"
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_views(models, traces):
    sal = step_saliency(models["qwen2"], traces["qwen2"])
    norm = sal.row_normalized()
    torch.testing.assert_close(norm.sum(-1), torch.ones(norm.shape[:2]))
    df = sal.to_dataframe()
    n_l, n_h, n_s, _ = sal.maps.shape
    assert len(df) == n_l * n_h * n_s * n_s
    row = df[(df.layer == 1) & (df["head"] == 2) & (df.query_step == 3) & (df.key_step == 1)]
    assert row.value.item() == pytest.approx(sal.maps[1, 2, 3, 1].item())
    assert row.query_segment.item() == "thinking" and row.key_segment.item() == "thinking"


def test_bad_input(models, traces):
    model = models["qwen2"]
    with pytest.raises(StepSalError, match="unknown saliency target 'loss'"):
        step_saliency(model, traces["qwen2"], target="loss")
    with pytest.raises(StepSalError, match=r"layers \[5\] are not valid"):
        step_saliency(model, traces["qwen2"], layers=[5])
    truncated = Trace.from_text(info_of(model).format.prompt(Q) + T, model)
    with pytest.raises(StepSalError, match="needs a summary"):
        step_saliency(model, truncated, target="summary")
    with pytest.raises(StepSalError, match="not found in the summary"):
        step_saliency(model, traces["qwen2"], target="answer", answer="42")
    assert {"lm", "summary", "answer", "logit"} <= set(list_targets())


def test_results_record_their_provenance_and_replay_it(models, traces):
    """A result says how it was made (target and its arguments, engine, StepFlow config,
    version) and replays it: the token drill-down pools exactly to the map shown."""
    from stepsal_lens import StepFlowConfig, __version__, stepflow, token_saliency
    from stepsal_lens.lens.saliency import replay
    from stepsal_lens.core.pooling import pool_saliency

    model, trace = models["qwen2"], traces["qwen2"]
    pos = trace.steps[trace.steps_in("summary")[0]].token_span[1] - 1  # inside a step
    plain = step_saliency(model, trace, target="logit", position=pos, token=7)
    assert plain.meta["stepflow"] is None and plain.meta["stepsal_lens"] == __version__
    cfg = StepFlowConfig(tau_max=0.5, alpha=1.0, oeb_layers=[0, 1])
    with stepflow(model, cfg):
        flow = step_saliency(model, trace, target="logit", position=pos, token=7)
    assert flow.meta["stepflow"] == cfg.resolve(model.cfg.n_layers).to_dict()
    assert flow.meta["engine"] == "hook_pattern"  # StepFlow's hooks: the reference engine
    assert not torch.allclose(flow.maps, plain.maps)
    for result in (plain, flow):
        for layer in (0, 1):
            tok, _ = replay(result, model, token_saliency, trace, layer)
            pooled = pool_saliency(tok[None], torch.ones_like(tok[None]), trace.step_of_token,
                                   trace.n_steps)
            ref = result.maps[layer]
            assert ref.abs().max() > 0
            rel = float((pooled - ref).abs().max() / ref.abs().max())
            assert rel < 1e-5, (layer, rel)
