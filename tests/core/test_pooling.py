"""Pooling saliency into step maps against plain loops."""

import torch

from stepsal_lens.core import pooling
from stepsal_lens.core.pooling import pool_saliency


def test_pooling_core_against_loops():
    torch.manual_seed(0)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    pattern = torch.randn(1, 3, 10, 10).masked_fill(~causal, float("-inf")).softmax(-1)
    grad = torch.randn(1, 3, 10, 10)
    spans = [(0, 3), (4, 7), (7, 10)]  # token 3 is in no step
    owner = torch.tensor([0, 0, 0, -1, 1, 1, 1, 2, 2, 2])
    sal = (pattern * grad).abs()[0]
    for chunk in (1, 3, 256):  # chunk edges must not change the sums
        out = pool_saliency(pattern, grad, owner, 3, chunk=chunk)
        for i, (a, b) in enumerate(spans):
            for j, (c, d) in enumerate(spans):
                torch.testing.assert_close(out[:, i, j], sal[:, a:b, c:d].mean((1, 2)))


def test_pooling_functions_against_loops():
    torch.manual_seed(0)
    sal = torch.rand(3, 9, 12)  # rows are tokens 3..11, keys tokens 0..11
    spans = [(0, 2), (3, 6), (6, 7), (9, 12)]
    starts, ends = pooling.step_bounds(spans)
    out = pooling.pool_block(sal, starts, ends, row0=3, key0=0)
    for i, (a, b) in enumerate(spans):
        for j, (c, d) in enumerate(spans):
            rows = slice(max(a, 3) - 3, max(b, 3) - 3)
            torch.testing.assert_close(out[:, i, j], sal[:, rows, c:d].sum((1, 2)))
    keys = pooling.key_step_sums(sal[:, :, 4:], starts, ends, key0=4)  # keys 4..11 only
    torch.testing.assert_close(keys[..., 1], sal[:, :, 4:6].sum(-1))
    torch.testing.assert_close(keys[..., 0], torch.zeros(3, 9))
