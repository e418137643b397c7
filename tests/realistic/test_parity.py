"""Parity with the raw Hugging Face model on checkpoints with the real models' features.

Every quantity stepsal_lens reads or edits is recomputed here on the Hugging Face model
with eager attention and hooks written in this file: logits, ``hook_pattern``,
``hook_z``, ``hook_resid_post``, Step-Saliency maps for every target, token-level
saliency, the OEB and SMI edits of StepFlow, and greedy generation. The checkpoints
have non-zero q/k/v(/o) biases, attention sinks, sliding windows, QK-norm, RoPE scaling
and the real tokenizers, so a reparameterisation or an off-by-one BOS would show.
"""

from __future__ import annotations

import math

from stepsal_lens.segments.association import info_of
import pytest
import torch
import transformers
from transformers import AttentionInterface

from stepsal_lens import Trace, step_saliency, stepflow, token_saliency
from stepsal_lens.lens.targets import get_target

Q = "A rectangle has a perimeter of 30 cm and its length is twice its width. What is its area?"
T = ("Okay, so I need to find the area of a rectangle with a perimeter of 30 cm. "
     "Let me call the width w, which makes the length equal to 2w here. "
     "The perimeter is 2(w + 2w) = 6w, and that has to equal 30. "
     "So w = 5 and the length is 10, which gives an area of 5 times 10. "
     "Wait, let me double-check that the perimeter really is 2(5 + 10) = 30. "
     "Yes, it checks out, so the area is 50 square centimetres.")
S = ("The width is $w = 5$ cm and the length is $10$ cm.\n\n"
     "**Final Answer**\n\\[\\boxed{50}\\]")
TAU, ALPHA = 0.5, 2.0  # strong settings, so that the edits matter


@pytest.fixture(scope="module")
def traces(real_models):
    return {n: Trace.from_segments(Q, T, S, m) for n, m in real_models.items()}


@pytest.fixture(scope="module")
def hf_models(real_checkpoints):
    return {n: transformers.AutoModelForCausalLM.from_pretrained(p, attn_implementation="eager")
            for n, p in real_checkpoints.items()}


def _max_rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _decoder_layers(hf):
    return hf.model.layers


# ---- forward quantities -------------------------------------------------------------------

def test_forward_activations_equal_hugging_face(name, real_models, hf_models, traces,
                                                record_error):
    model, hf, ids = real_models[name], hf_models[name], traces[name].token_ids[None]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    ref: dict[str, torch.Tensor] = {}
    handles = []
    for l, layer in enumerate(_decoder_layers(hf)):
        def out_hook(mod, args, out, l=l):
            ref[f"resid_post{l}"] = (out[0] if isinstance(out, tuple) else out).detach()

        def z_hook(mod, args, l=l):
            x = args[0]
            ref[f"z{l}"] = x.reshape(*x.shape[:2], n_heads, -1).detach()

        handles += [layer.register_forward_hook(out_hook),
                    layer.self_attn.o_proj.register_forward_pre_hook(z_hook)]
    try:
        with torch.no_grad():
            out = hf(ids, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    names = ([f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)]
             + [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
             + [f"blocks.{l}.hook_resid_post" for l in range(n_layers)])
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=names)
    errors = {"log-probs": float((logits.log_softmax(-1) - out.logits.log_softmax(-1)).abs().max()),
              "logits": float((logits - out.logits).abs().max())}
    for l in range(n_layers):
        errors[f"pattern{l}"] = float((cache[f"blocks.{l}.attn.hook_pattern"]
                                       - out.attentions[l]).abs().max())
        errors[f"z{l}"] = float((cache[f"blocks.{l}.attn.hook_z"] - ref[f"z{l}"]).abs().max())
        errors[f"resid_post{l}"] = float((cache[f"blocks.{l}.hook_resid_post"]
                                          - ref[f"resid_post{l}"]).abs().max())
    for key, value in errors.items():
        record_error(name, key.rstrip("0123456789"), value)
    assert max(errors.values()) < 1e-5, f"{name}: {errors}"
    if name == "gpt-oss":  # sinks: rows sum below 1, as in the real model
        assert float(out.attentions[0].sum(-1).max()) < 0.999


# ---- Step-Saliency ------------------------------------------------------------------------

def hf_saliency(hf, trace, target, **kw):
    """|A * dL/dA| per layer from HF eager attentions with retained gradients, ``[L, H, T, T]``."""
    out = hf(trace.token_ids[None], output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    get_target(target)(out.logits.float(), trace, **kw).backward()
    return torch.stack([(a * a.grad).abs()[0].detach() for a in out.attentions]), out


def pool_loops(sal, trace):
    n = trace.n_steps
    ref = torch.zeros(sal.shape[0], sal.shape[1], n, n)
    for i, si in enumerate(trace.steps):
        for j, sj in enumerate(trace.steps):
            ref[:, :, i, j] = sal[:, :, slice(*si.token_span), slice(*sj.token_span)].mean((-1, -2))
    return ref


@pytest.mark.parametrize("target,kw", [("lm", {}), ("summary", {}), ("answer", {}),
                                       ("logit", {"position": -2, "token": 11})])
def test_step_saliency_equals_hugging_face(name, target, kw, real_models, hf_models, traces,
                                           record_error):
    trace = traces[name]
    ours = step_saliency(real_models[name], trace, target=target, **kw).maps
    sal, _ = hf_saliency(hf_models[name], trace, target, **kw)
    ref = pool_loops(sal, trace)
    assert ref.abs().max() > 0
    rel = _max_rel(ours, ref)
    record_error(name, f"maps ({target}, rel.)", rel)
    assert rel < 1e-5, f"{name}/{target}: max |ours - HF| / max |HF| = {rel:.2e}"


def test_token_saliency_equals_hugging_face(name, real_models, hf_models, traces, record_error):
    trace = traces[name]
    sal, out = hf_saliency(hf_models[name], trace, "lm")
    for layer in range(real_models[name].cfg.n_layers):
        ours, pattern = token_saliency(real_models[name], trace, layer)
        record_error(name, "token saliency (rel.)", _max_rel(ours, sal[layer]))
        assert _max_rel(ours, sal[layer]) < 1e-5, f"{name} layer {layer}"
        assert float((pattern - out.attentions[layer][0].detach()).abs().max()) < 1e-6


# ---- StepFlow edits against an independent implementation -------------------------------

def _eager_with(edit):
    """Eager attention written out here (GQA, sinks, any mask form), with ``edit`` applied
    to the post-softmax logits of each layer: ``edit(logits, visible, layer) -> logits``."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = module.num_key_value_groups
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        logits = query @ k.transpose(2, 3) * scaling
        if attention_mask is None:
            visible = torch.ones_like(logits, dtype=torch.bool).tril()
        elif attention_mask.dtype == torch.bool:
            visible = attention_mask.expand_as(logits)
        else:
            visible = (attention_mask == 0).expand_as(logits)
        window = kwargs.get("sliding_window")
        if window:  # a registered implementation gets the window as an argument
            n_q, n_k = logits.shape[-2:]
            pos_q = torch.arange(n_k - n_q, n_k)[:, None]
            visible = visible & (pos_q - torch.arange(n_k)[None] < window)
        logits = logits.masked_fill(~visible, float("-inf"))
        logits = edit(logits, visible, module.layer_idx)
        sinks = getattr(module, "sinks", None)
        if sinks is not None:
            logits = torch.cat([logits, sinks.reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)], -1)
        probs = logits.softmax(-1)
        if sinks is not None:
            probs = probs[..., :-1]
        return (probs @ v).transpose(1, 2).contiguous(), probs

    return attention


def _hf_logits_with(hf, ids, edit, hooks=()):
    AttentionInterface.register("stepsal_test_eager", _eager_with(edit))
    old = hf.config._attn_implementation
    hf.set_attn_implementation("stepsal_test_eager")
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()
        hf.set_attn_implementation(old)


def _oeb_logit_shift(seg, tau_max, layers):
    """The paper's form: shift the logits of the bridge and same groups by
    ``log(tau_g / p_g)``, where sinks (if any) enter the softmax but no group."""

    def edit(logits, visible, layer):
        if layer not in layers:
            return logits
        out = logits.clone()
        sinks = _SINKS.get(layer)
        full = logits if sinks is None else torch.cat(
            [logits, sinks.reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)], -1)
        probs = full.softmax(-1)[..., : logits.shape[-1]]
        for q in range(logits.shape[2]):
            if int(seg[q]) not in (1, 2):
                continue
            vis = visible[0, 0, q]
            same = vis & (seg == seg[q])
            bridge = vis & (seg == (0 if int(seg[q]) == 1 else 1))
            n_s, n_b = int(same.sum()), int(bridge.sum())
            if n_s == 0 or n_b == 0:
                continue
            row = probs[0, :, q]
            total = row.sum(-1)
            p_b, p_s = row[:, bridge].sum(-1) / total, row[:, same].sum(-1) / total
            p_o = 1 - p_b - p_s
            tau_b = min(math.sqrt(n_b / (n_b + n_s)), tau_max)
            for h in range(logits.shape[1]):
                if p_b[h] < tau_b and p_o[h] <= 1 - tau_b:
                    tau_s = 1 - p_o[h] - tau_b
                    out[0, h, q, bridge] += math.log(tau_b / p_b[h])
                    out[0, h, q, same] += torch.log(tau_s / p_s[h])
        return out

    return edit


_SINKS: dict[int, torch.Tensor] = {}


def _teacher_forced_with_stepflow(model, ids, **cfg):
    with stepflow(model, **cfg) as sf, torch.no_grad():
        logits = model(ids)
        labels = {k: getattr(sf.tracker, k)[0].clone()
                  for k in ("segment", "step", "step_start", "anchored")}
    return logits, labels, sf


def test_oeb_equals_the_logit_shift_form_on_hugging_face(name, real_models, hf_models, traces,
                                                         record_error):
    model, hf, ids = real_models[name], hf_models[name], traces[name].token_ids[None]
    layers = list(range(model.cfg.n_layers))
    ours, labels, sf = _teacher_forced_with_stepflow(model, ids, tau_max=TAU, alpha=0.0,
                                                     oeb_layers=layers)
    assert sf.stats.to_dict()["oeb"]["triggers"] > 0
    _SINKS.clear()
    for l, layer in enumerate(_decoder_layers(hf)):
        if hasattr(layer.self_attn, "sinks"):
            _SINKS[l] = layer.self_attn.sinks.detach()
    ref = _hf_logits_with(hf, ids, _oeb_logit_shift(labels["segment"], TAU, set(layers)))
    plain = _hf_logits_with(hf, ids, lambda x, v, l: x)
    assert float((plain - hf(ids).logits.detach()).abs().max()) < 1e-4  # the test's eager = HF's
    assert float((ref - plain).abs().max()) > 1e-2  # OEB changed something
    err = float((ours.log_softmax(-1) - ref.log_softmax(-1)).abs().max())
    record_error(name, "OEB log-probs", err)
    assert err < 1e-4, f"{name}: OEB log-probs differ from the HF logit-shift form by {err:.2e}"


def test_smi_equals_a_residual_hook_on_hugging_face(name, real_models, hf_models, traces,
                                                    record_error):
    model, hf, ids = real_models[name], hf_models[name], traces[name].token_ids[None]
    smi_layer = model.cfg.n_layers - 1
    ours, labels, sf = _teacher_forced_with_stepflow(model, ids, tau_max=0.0, alpha=ALPHA,
                                                     smi_layers=[smi_layer], window=4)
    seg, step, start, anchored = (labels[k] for k in ("segment", "step", "step_start", "anchored"))
    targets = []
    for t in torch.nonzero(start & (seg == 1)).flatten().tolist():
        prev = torch.nonzero((step == step[t] - 1) & (seg == 1) & anchored).flatten()
        prev = prev[prev < t]
        if len(prev):
            targets.append((t, prev[-4:].tolist()))
    assert len(targets) >= 4, targets  # the thinking has six steps
    assert sf.stats.to_dict()["smi"]["injections"] == len(targets)

    def add_momentum(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        y = x.clone()
        for t, window in targets:
            y[0, t] = x[0, t] + ALPHA * x[0, window].mean(0)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    ref = _hf_logits_with(hf, ids, lambda x, v, l: x,
                          hooks=[(_decoder_layers(hf)[smi_layer], add_momentum)])
    plain = hf(ids).logits.detach()
    assert float((ref - plain).abs().max()) > 1e-2
    err = float((ours.log_softmax(-1) - ref.log_softmax(-1)).abs().max())
    record_error(name, "SMI log-probs", err)
    assert err < 1e-4, f"{name}: SMI log-probs differ from the HF residual hook by {err:.2e}"


# ---- generation ---------------------------------------------------------------------------

def test_cached_greedy_generation_equals_hugging_face(name, real_models, hf_models):
    from stepsal_lens.lens.generation import prompt_ids

    model, hf = real_models[name], hf_models[name]
    tok = model.tokenizer
    prompt = info_of(model).format.chat_prompt(Q, tok)
    ids = torch.tensor([prompt_ids(model, prompt)])
    hf_ids = tok.apply_chat_template([{"role": "user", "content": Q}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    assert ids[0].tolist() == list(hf_ids)  # the prompt the model really gets
    kw = dict(max_new_tokens=16, do_sample=False, stop_at_eos=False, verbose=False)
    cached = model.generate(ids, use_past_kv_cache=True, **kw)
    uncached = model.generate(ids, use_past_kv_cache=False, **kw)
    ref = hf.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                      attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id)
    assert cached.tolist() == uncached.tolist() == ref.tolist()
    cfg = dict(tau_max=TAU, alpha=ALPHA, oeb_layers=[0, 1])
    with stepflow(model, **cfg):
        flow_cached = model.generate(ids, use_past_kv_cache=True, **kw)
    with stepflow(model, **cfg):
        flow_uncached = model.generate(ids, use_past_kv_cache=False, **kw)
    assert flow_cached.tolist() == flow_uncached.tolist()
