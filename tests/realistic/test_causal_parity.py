"""The causal effect matrix against Hugging Face on the realistic checkpoints: real
tokenizers (vocab 128k-200k), GQA, q/k/v(/o) biases, QK-norm, gpt-oss sinks and sliding
windows. The reference (tests/lens/causal_reference.py) cuts each step with an attention mask
in HF eager; nothing of stepsal_lens' knockout is reused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lens"))
from causal_reference import reference_effects  # noqa: E402

from stepsal_lens import Trace, step_effects  # noqa: E402

Q = "A rectangle has a perimeter of 30 cm and its length is twice its width. What is its area?"
T = ("Let me call the width w, which makes the length equal to 2w here. "
     "The perimeter is 2(w + 2w) = 6w, and that has to equal 30. "
     "So w = 5 and the length is 10, which gives an area of 5 times 10. "
     "Yes, it checks out, so the area is 50 square centimetres.")
S = "The area is 50 square centimetres.\n\n**Final Answer**\n\\[\\boxed{50}\\]"


@pytest.fixture(scope="module")
def hf_models(real_checkpoints):
    return {n: transformers.AutoModelForCausalLM.from_pretrained(p, attn_implementation="eager")
            for n, p in real_checkpoints.items()}


def test_effects_equal_hugging_face(name, real_models, hf_models):
    model, hf = real_models[name], hf_models[name]
    trace = Trace.from_segments(Q, T, S, model)
    ours = step_effects(model, trace, per_layer=True, batch_size=4)
    ref = reference_effects(hf, trace)
    assert float(ref.max()) > 1e-3
    err = float((ours.effects.double() - ref).abs().max())
    assert err < 1e-5 * max(1.0, float(ref.max())), f"{name}: max |ours - HF| = {err:.2e}"
    last = model.cfg.n_layers - 1
    ref_l = reference_effects(hf, trace, layers=[last])
    err_l = float((ours.layer_map(last).double() - ref_l).abs().max())
    assert err_l < 1e-5 * max(1.0, float(ref_l.max())), f"{name} layer {last}: {err_l:.2e}"
