"""OEB and SMI as pure functions: OEB equals the paper's logit-shift form; rows it must
leave alone; SMI adds exactly alpha x the window mean."""

import pytest
import torch

from stepsal_lens import StepSalError
from stepsal_lens.core.interventions import odds_equal_bridge, step_momentum


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
