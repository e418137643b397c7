"""The knockout renormalisation on the post-softmax pattern = masking the logits."""

import pytest
import torch

from stepsal_lens.core.knockout import suppress_attention


@pytest.mark.parametrize("sinks", [False, True])
def test_suppress_attention_equals_masking_the_logits(sinks):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    causal = torch.ones(5, 7, dtype=torch.bool).tril(2)
    cut = torch.rand(2, 3, 5, 7, generator=g) < 0.3
    cut[..., 2] = False  # every row keeps a visible key
    sink = torch.randn(1, 3, 1, 1, generator=g, dtype=torch.float64).expand(2, 3, 5, 1)

    def softmax(z):
        z = z.masked_fill(~causal, float("-inf"))
        if sinks:
            return torch.cat([z, sink], -1).softmax(-1)[..., :-1]
        return z.softmax(-1)

    ours, left = suppress_attention(softmax(logits), cut, sinks=sinks)
    ref = softmax(logits.masked_fill(cut, float("-inf")))
    err = float((ours - ref).abs().max())
    assert err < 1e-12, f"max |ours - masked softmax| = {err:.2e}"
    assert int(left) == 0


def test_a_row_with_everything_cut_is_left_alone():
    a = torch.tensor([[[[1.0, 0.0, 0.0], [0.4, 0.6, 0.0]]]])
    cut = torch.tensor([[[[True, False, False], [False, True, False]]]])
    out, left = suppress_attention(a, cut)
    assert out[0, 0, 0].tolist() == [1.0, 0.0, 0.0] and int(left) == 1
    assert out[0, 0, 1].tolist() == [1.0, 0.0, 0.0]
