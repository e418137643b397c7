"""Numerics: float16 underflow is refused, non-finite targets and maps are refused, and
NaN never becomes a metric (library and `stepsal analyze`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from stepsal_lens import StepSalError, Trace, load_lrm, step_saliency
from stepsal_lens.apps.cli import main
from stepsal_lens.core.metrics import trace_metrics
from stepsal_lens.lens.models import BUNDLED
from stepsal_lens.lens.saliency import token_saliency

Q = "Start with 12. Subtract 5, then add 9, then multiply by 2. What is the result?"
T = "We start with 12. 12 minus 5 makes 7. 7 plus 9 makes 16. 16 times 2 makes 32."
S = "The result is \\boxed{32}."


def _zero_rows(dtype) -> tuple[list[int], int, int]:
    """Hugging Face eager on tiny-lrm: per layer, how many (head, query) rows have
    |A * dL/dA| exactly 0 (mean next-token loss, step_saliency's 'lm'); heads; tokens."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        BUNDLED["tiny-lrm"], dtype=dtype, attn_implementation="eager")
    tok = transformers.AutoTokenizer.from_pretrained(BUNDLED["tiny-lrm"])
    ids = tok(f"{Q}\n<think>\n{T}\n</think>\n\n{S}", return_tensors="pt")["input_ids"]
    out = hf(ids, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:]).backward()
    zero = [int(((a.float() * a.grad.float())[0].abs().sum(-1) == 0).sum())
            for a in out.attentions]
    return zero, out.attentions[0].shape[1], ids.shape[1]


def test_float16_underflows_the_gradients_so_it_is_refused():
    """The failure exists outside our code (HF's own backward in float16 zeroes most
    rows); bfloat16 does not have it. step_saliency refuses float16 and names the fix."""
    f32, heads, n = _zero_rows(torch.float32)
    f16, _, _ = _zero_rows(torch.float16)
    bf16, _, _ = _zero_rows(torch.bfloat16)
    # only the last query of each head (it predicts nothing) may be all zero
    assert max(f32) <= heads and max(bf16) <= heads, (f32, bf16)
    assert min(f16) > 0.3 * heads * n, f"float16: {f16} of {heads * n} rows are zero"

    model = load_lrm("tiny-lrm", device="cpu", dtype="float16")
    trace = Trace.from_segments(Q, T, S, model)
    with pytest.raises(StepSalError, match="float16 model.*dtype='bfloat16'"):
        step_saliency(model, trace)
    with pytest.raises(StepSalError, match="float16"):
        token_saliency(model, trace, 0)


def test_bfloat16_maps_have_no_zero_rows_and_match_float32(tiny_lrm):
    model = load_lrm("tiny-lrm", device="cpu", dtype="bfloat16")
    trace = Trace.from_segments(Q, T, S, model)
    maps = step_saliency(model, trace).maps
    ref = step_saliency(tiny_lrm, trace).maps
    assert not bool((maps.sum(-1) == 0).any())
    rel = ((maps - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.03, f"bfloat16 vs float32: max |diff| / max = {rel:.3g}"


@pytest.fixture(scope="module")
def nan_checkpoint(checkpoints, tmp_path_factory):
    """The qwen2 fixture with one MLP weight of layer 0 set to NaN."""
    folder = tmp_path_factory.mktemp("nan-qwen2")
    shutil.copytree(checkpoints["qwen2"], folder, dirs_exist_ok=True)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_nan_weights_are_refused(nan_checkpoint):
    model = load_lrm(nan_checkpoint, device="cpu", format="deepseek-r1")
    trace = Trace.from_segments(Q, T, S, model)
    with pytest.raises(StepSalError, match="target 'lm' is nan.*non-finite logits"):
        step_saliency(model, trace)
    with pytest.raises(StepSalError, match="target 'answer' is nan"):
        step_saliency(model, trace, target="answer")
    with pytest.raises(StepSalError, match="is nan"):
        token_saliency(model, trace, 1)
    # the hooks came off with the error
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())


def test_finite_target_with_non_finite_gradient_is_refused(models):
    """A target whose value is finite but whose gradient is NaN (torch.where over a NaN
    branch): the maps are checked after the backward pass too."""
    model = models["qwen2"]
    trace = Trace.from_segments(Q, T, S, model)

    def nan_grad(logits, trace):
        return torch.where(torch.tensor(True), logits.sum() * 0,
                           torch.sqrt(-logits.abs().sum() - 1))

    with pytest.raises(StepSalError, match=r"saliency maps of layers \[0, 1\] are not finite"):
        step_saliency(model, trace, target=nan_grad)
    with pytest.raises(StepSalError, match=r"token saliencies of layers \[1\] are not finite"):
        token_saliency(model, trace, 1, target=nan_grad)


def test_analyze_refuses_nan_weights_and_float16(tmp_path, capsys, nan_checkpoint):
    (tmp_path / "t.json").write_text(json.dumps({"question": Q, "thinking": T, "summary": S}))
    runs = [(["--model", str(nan_checkpoint), "--format", "deepseek-r1"], "is nan"),
            (["--model", "tiny-lrm", "--dtype", "float16"], "float16 model")]
    for args, message in runs:
        out = tmp_path / args[1].replace("/", "_")
        rc = main(["analyze", *args, "--trace", str(tmp_path / "t.json"), "--out", str(out)])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert rc == 2
        assert len(errors) == 1 and errors[0].startswith("stepsal: error:"), errors
        assert message in errors[0]
        assert not (out / "metrics.json").exists()


def test_nan_maps_give_nan_metrics_never_zero():
    segments = ["question", "thinking", "thinking", "summary", "summary"]
    maps = torch.rand(4, 2, 5, 5, generator=torch.Generator().manual_seed(0)).tril()
    maps[2, 1, 3, 1] = float("nan")  # one entry of one head, a summary row, layer 2
    doc = trace_metrics(maps, segments)
    for name in ("thinking_share", "summary_self_share", "last_k_share"):
        assert doc[name][2] is None, name  # NaN is written as null, not 0.0
        assert all(v is not None for i, v in enumerate(doc[name]) if i != 2), name
    assert doc["decay"] is None  # layer 2 is in the deepest half
    # rows and blocks that do not hold the NaN keep their values
    assert doc["lock_in"][2] is not None and doc["final_block_intensity"][2] is not None
