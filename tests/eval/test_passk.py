"""pass@k equals the exact estimator 1 - C(n-c, k) / C(n, k), with intervals and groups."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction
from math import comb

import pytest

from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.code.passk import code_summary, pass_at_k, pass_at_k_table


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


def test_equals_the_exact_estimator_on_a_grid():
    worst = 0.0
    for n in range(1, 31):
        for c, k in itertools.product(range(n + 1), range(1, n + 1)):
            worst = max(worst, abs(pass_at_k(n, c, k) - float(_exact(n, c, k))))
    for n, c, k in [(200, 3, 1), (200, 3, 10), (200, 3, 100), (500, 250, 50), (1000, 1, 999)]:
        worst = max(worst, abs(pass_at_k(n, c, k) - float(_exact(n, c, k))))
    assert worst < 1e-12, f"max abs difference to 1 - C(n-c,k)/C(n,k): {worst:.3g}"


def test_closed_forms():
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7, abs=1e-15)  # pass@1 = c / n
    # unbiased: the mean over all k-subsets of "some sample passes"
    n, c, k = 6, 2, 3
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets),
                                               abs=1e-12)


@pytest.mark.parametrize("args,match", [((3, 1, 4), "1 <= k <= n"), ((3, 1, 0), "1 <= k <= n"),
                                        ((3, 4, 1), "cannot exceed n"),
                                        ((3, -1, 1), "whole numbers")])
def test_bad_arguments(args, match):
    with pytest.raises(StepSalError, match=match):
        pass_at_k(*args)


def test_table_means_over_problems_with_a_bootstrap_interval():
    rng = random.Random(0)
    counts = {f"p{i}": (10, rng.randint(0, 10)) for i in range(40)}
    table = pass_at_k_table(counts)
    assert sorted(table, key=lambda s: int(s.split("@")[1])) == [
        "pass@1", "pass@2", "pass@5", "pass@10"]
    for key, row in table.items():
        k = int(key.split("@")[1])
        want = sum(float(_exact(n, c, k)) for n, c in counts.values()) / len(counts)
        assert abs(row["value"] - want) < 1e-12
        low, high = row["ci95"]
        assert 0 <= low <= row["value"] <= high <= 1 and high - low > 0.02
    assert pass_at_k_table(counts) == table  # the same numbers every time (seeded)
    with pytest.raises(StepSalError, match="needs at least 20 samples"):
        pass_at_k_table(counts, ks=[20])


def test_code_summary_groups_by_platform_and_difficulty():
    recs = []
    for pid, platform, diff, results in [("a", "atcoder", "easy", [1, 1, 0, 0]),
                                         ("b", "leetcode", "easy", [0, 0, 0, 0]),
                                         ("c", "leetcode", "hard", [1, 0, 0, 0])]:
        for s, ok in enumerate(results):
            recs.append({"id": pid, "sample": s, "kind": "code", "correct": bool(ok),
                         "verdict": "passed" if ok else "wrong_answer", "platform": platform,
                         "difficulty": diff})
    recs.append({"id": "m", "sample": 0, "kind": "math", "correct": True})
    s = code_summary(recs)
    assert s["n_problems"] == 3 and s["verdicts"] == {"passed": 3, "wrong_answer": 9}
    assert s["pass@k"]["pass@1"]["value"] == pytest.approx((0.5 + 0 + 0.25) / 3)
    assert s["pass@k"]["pass@4"]["value"] == pytest.approx(2 / 3)
    assert s["by_platform"]["leetcode"]["pass@2"]["value"] == pytest.approx(
        (0 + float(_exact(4, 1, 2))) / 2)
    assert s["by_difficulty"]["hard"]["pass@1"]["value"] == pytest.approx(0.25)
    assert code_summary([{"id": "m", "kind": "math", "correct": True}]) == {}
