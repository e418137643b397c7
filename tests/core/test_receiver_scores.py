"""Receiver-head scores against loops and scipy on hand-built attention."""

import numpy as np
import torch
from scipy import stats

from stepsal_lens.core.causal import receiver_kurtosis, vertical_scores


def test_receiver_kurtosis_against_scipy_on_hand_built_attention():
    g = torch.Generator().manual_seed(1)
    att = torch.rand(3, 2, 9, 9, generator=g).tril()
    att[1, 0, :, 2] *= 20  # one head singles out step 2
    k = 4
    ref_v = np.zeros((3, 2, 9 - k))
    for l in range(3):
        for h in range(2):
            for j in range(9 - k):
                ref_v[l, h, j] = np.mean([float(att[l, h, i, j]) for i in range(j + k, 9)])
    np.testing.assert_allclose(vertical_scores(att, k).numpy(), ref_v, rtol=1e-6)
    ref_k = stats.kurtosis(ref_v, axis=-1, fisher=True, bias=True)
    np.testing.assert_allclose(receiver_kurtosis(att, k).numpy(), ref_k, rtol=1e-5)
    assert receiver_kurtosis(att, k).flatten().argmax() == 2  # layer 1, head 0
