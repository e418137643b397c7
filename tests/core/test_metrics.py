"""Metrics on hand-built maps with known answers; compare() on synthetic groups."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stepsal_lens import StepSalError
from stepsal_lens.core.metrics import compare, decay, layer_metrics, normalize_rows, trace_metrics

SEG = ["question", "thinking", "thinking", "thinking", "summary", "summary"]


def test_pure_lock_in_map():
    maps = torch.eye(6).expand(4, 2, 6, 6)
    df = layer_metrics(maps, SEG)
    assert np.allclose(df.lock_in, 1.0) and np.allclose(df.context_share, 0.0)
    assert np.allclose(df.thinking_share, 0.0) and np.allclose(df.summary_self_share, 1.0)


def test_uniform_causal_map():
    maps = torch.ones(6, 6).tril().expand(2, 3, 6, 6)
    df = layer_metrics(maps, SEG)
    # thinking rows 2 and 3 (second thinking step on) have 3 and 4 visible steps
    assert df.lock_in[0] == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert df.context_share[0] == pytest.approx((2 / 3 + 3 / 4) / 2)
    # summary rows 4 and 5: thinking is 3 of 5 and 3 of 6 visible steps
    assert df.thinking_share[0] == pytest.approx((3 / 5 + 3 / 6) / 2)
    assert df.last_k_share[0] == df.thinking_share[0]
    assert layer_metrics(maps, SEG, k=1).last_k_share[0] == pytest.approx((1 / 5 + 1 / 6) / 2)
    assert df.final_block_intensity[0] == pytest.approx(3 / 4)  # tril of a 2x2 block
    assert df.analysis_block_intensity[0] == pytest.approx(6 / 9)
    assert df.final_heat_anomaly[0] == pytest.approx((3 / 4) / (6 / 9))


def test_decaying_map_has_negative_slope():
    shares = [0.8, 0.8, 0.8, 0.8, 0.6, 0.4, 0.2, 0.0]
    maps = torch.zeros(8, 1, 6, 6)
    for layer, share in enumerate(shares):
        maps[layer, 0, 4:, 1:4] = share / 3  # summary -> thinking
        maps[layer, 0, 4:, 4] = 1 - share  # summary -> summary
        maps[layer, 0, :4, 0] = 1
    doc = trace_metrics(maps, SEG)
    assert np.allclose(doc["thinking_share"], shares)
    assert doc["decay"] == pytest.approx(-0.2)
    assert decay(shares) == pytest.approx(np.polyfit(np.arange(4, 8), shares[4:], 1)[0])


def test_normalize_rows_keeps_zero_rows():
    out = normalize_rows(torch.tensor([[0.0, 0.0], [1.0, 3.0]]))
    assert out.tolist() == [[0.0, 0.0], [0.25, 0.75]]


def test_normalize_rows_propagates_nan():
    out = normalize_rows(torch.tensor([[[float("nan"), 1.0], [1.0, 3.0]]]))
    assert out[0, 0].isnan().all() and out[0, 1].tolist() == [0.25, 0.75]


def test_all_zero_rows_are_left_out_not_counted_as_zero():
    maps = torch.ones(6, 6).tril().expand(2, 1, 6, 6).clone()
    maps[:, :, 5] = 0  # the last summary step has no saliency (e.g. after the answer)
    df = layer_metrics(maps, SEG)
    assert df.thinking_share[0] == pytest.approx(3 / 5)  # summary row 4 alone
    assert df.summary_self_share[0] == pytest.approx(1 / 5)
    maps[:, :, 4] = 0
    df = layer_metrics(maps, SEG)
    assert df.thinking_share.isna().all() and df.summary_self_share.isna().all()
    assert df.lock_in[0] == pytest.approx((1 / 3 + 1 / 4) / 2)
    # the block metrics are plain means: an all-zero summary block really is 0
    assert (df.final_block_intensity == 0).all() and (df.final_heat_anomaly == 0).all()


def test_decay_does_not_skip_nan_layers():
    assert np.isnan(decay([0.9, 0.8, float("nan"), 0.4]))
    assert decay([float("nan"), 0.8, 0.6, 0.4]) == pytest.approx(-0.2)  # shallow half unused


def test_missing_summary_gives_nan_not_error():
    df = layer_metrics(torch.rand(2, 1, 4, 4), SEG[:4])
    assert df.thinking_share.isna().all() and not df.lock_in.isna().any()


def test_compare_finds_a_known_difference():
    rng = np.random.default_rng(0)

    def group(mean, n):
        return [pd.DataFrame({"layer": [0, 1], "lock_in": rng.normal(mean, 0.05, 2)})
                for _ in range(n)]

    df = compare(group(0.8, 30), group(0.5, 25), metrics=["lock_in"])
    assert (df.p < 1e-6).all() and (df["diff"] > 0.2).all() and (df.d > 3).all()
    assert df.n_correct.tolist() == [30, 30] and df.n_wrong.tolist() == [25, 25]
    same = compare(group(0.5, 30), group(0.5, 30), metrics=["lock_in"])
    assert (same.p > 0.001).all()
    # Welch's t against scipy directly
    from scipy import stats

    a, b = group(0.6, 5), group(0.5, 7)
    out = compare(a, b, metrics=["lock_in"])
    expected = stats.ttest_ind([f.lock_in[0] for f in a], [f.lock_in[0] for f in b],
                               equal_var=False)
    assert out.p[0] == pytest.approx(expected.pvalue)


def test_compare_needs_two_per_group():
    with pytest.raises(StepSalError, match="at least 2 traces per group"):
        compare([torch.rand(1)], [])


def test_bad_shapes():
    with pytest.raises(StepSalError, match="one segment per step"):
        layer_metrics(torch.rand(2, 3, 3), SEG)
    with pytest.raises(StepSalError, match="pass segments"):
        layer_metrics(torch.rand(2, 3, 3))
