"""pass@k: the unbiased estimator of the HumanEval paper, with 95% intervals and groups.

For a problem with ``n`` samples of which ``c`` pass, the unbiased estimate of pass@k
(Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1) is

    pass@k = 1 - C(n - c, k) / C(n, k)

computed as ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` (numerically stable; 1 when
``n - c < k``). A run's pass@k is its mean over problems; the 95% interval is a
percentile bootstrap over problems (2,000 resamples, seed 0: the same numbers every time).

Examples
--------
>>> from stepsal_lens.eval.code.passk import pass_at_k
>>> round(pass_at_k(10, 3, 1), 6), round(pass_at_k(10, 3, 5), 6), pass_at_k(4, 4, 2)
(0.3, 0.916667, 1.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from stepsal_lens.errors import StepSalError

__all__ = ["code_summary", "pass_at_k", "pass_at_k_table"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: ``n`` samples, ``c`` correct.

    Examples
    --------
    >>> from stepsal_lens.eval.code.passk import pass_at_k
    >>> pass_at_k(5, 0, 3), round(pass_at_k(5, 1, 1), 12)
    (0.0, 0.2)
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise StepSalError(f"pass@k needs whole numbers >= 0; got {name}={v!r}")
    if not 1 <= k <= n:
        raise StepSalError(f"pass@k needs 1 <= k <= n (samples per problem); got k={k}, n={n}")
    if c > n:
        raise StepSalError(f"c (correct samples) cannot exceed n; got c={c}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _bootstrap(values: Sequence[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    import numpy as np

    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (0.0, 1.0)
    if len(x) == 1 or np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(reps, len(x)))].mean(axis=1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def _ks(n_min: int) -> list[int]:
    ks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= n_min]
    if n_min not in ks:
        ks.append(n_min)
    return ks


def pass_at_k_table(counts: dict[str, tuple[int, int]],
                    ks: Iterable[int] | None = None) -> dict[str, Any]:
    """pass@k over problems: ``counts`` maps problem id to ``(n, c)``.

    Returns ``{"pass@K": {"value", "ci95", "n_problems"}}`` for each ``k`` (default: 1,
    2, 5, 10 ... up to the fewest samples any problem has, and that number).

    Examples
    --------
    >>> from stepsal_lens.eval.code.passk import pass_at_k_table
    >>> t = pass_at_k_table({"a": (2, 2), "b": (2, 0), "c": (2, 1)})
    >>> sorted(t), t["pass@1"]["value"], t["pass@2"]["value"]
    (['pass@1', 'pass@2'], 0.5, 0.6666666666666666)
    """
    if not counts:
        return {}
    n_min = min(n for n, _ in counts.values())
    ks = sorted(set(ks)) if ks is not None else _ks(n_min)
    out: dict[str, Any] = {}
    for k in ks:
        if k > n_min:
            raise StepSalError(f"pass@{k} needs at least {k} samples of every problem; the "
                               f"fewest is {n_min} (run with --samples {k} or more)")
        values = [pass_at_k(n, c, k) for n, c in counts.values()]
        out[f"pass@{k}"] = {"value": sum(values) / len(values), "ci95": list(_bootstrap(values)),
                            "n_problems": len(values)}
    return out


def code_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The coding part of ``summary.json``: pass@k (with 95% bootstrap intervals) overall
    and by platform and difficulty, and the count of each verdict.

    ``records`` are ``results.jsonl`` lines (``id``, ``correct``, ``verdict``,
    ``platform``, ``difficulty``); lines of other kinds are ignored.

    Examples
    --------
    >>> from stepsal_lens.eval.code.passk import code_summary
    >>> recs = [{"id": "a", "kind": "code", "correct": True, "verdict": "passed",
    ...          "platform": "atcoder", "difficulty": "easy"},
    ...         {"id": "b", "kind": "code", "correct": False, "verdict": "no_code",
    ...          "platform": "leetcode", "difficulty": "hard"}]
    >>> s = code_summary(recs)
    >>> s["pass@k"]["pass@1"]["value"], s["verdicts"], s["by_platform"]["atcoder"]["pass@1"]["value"]
    (0.5, {'passed': 1, 'no_code': 1}, 1.0)
    """
    from stepsal_lens.eval.code.judge import VERDICTS

    code = [r for r in records if r.get("kind") == "code"]
    if not code:
        return {}

    def counts(rows: Iterable[dict[str, Any]]) -> dict[str, tuple[int, int]]:
        acc: dict[str, list[int]] = {}
        for r in rows:
            n_c = acc.setdefault(str(r["id"]), [0, 0])
            n_c[0] += 1
            n_c[1] += bool(r.get("correct"))
        return {k: (v[0], v[1]) for k, v in acc.items()}

    overall = counts(code)
    ks = _ks(min(n for n, _ in overall.values()))

    def grouped(key: str) -> dict[str, Any]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in code:
            groups.setdefault(str(r.get(key) or "unknown"), []).append(r)
        return {g: pass_at_k_table(counts(rows), ks) for g, rows in sorted(groups.items())}

    verdicts: dict[str, int] = {}
    for v in VERDICTS:
        n = sum(r.get("verdict") == v for r in code)
        if n:
            verdicts[v] = n
    return {"pass@k": pass_at_k_table(overall, ks), "by_platform": grouped("platform"),
            "by_difficulty": grouped("difficulty"), "verdicts": verdicts,
            "n_problems": len(overall),
            "ci_method": "percentile bootstrap over problems (2000 resamples, seed 0)",
            "estimator": "unbiased pass@k, 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)"}
