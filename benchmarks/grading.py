"""Accuracy of the answer grader on a hand-labelled corpus, against plain ``math-verify``.

    python benchmarks/grading.py [--corpus tests/eval/data/grading_corpus.jsonl] [--misses]

Each corpus line holds a model output (R1 / QwQ / gpt-oss style summaries of MATH-500,
AIME, AMC and GPQA problems), the gold ``answer``, ``kind`` (``math`` or ``choice``) and
``label``: whether the output is really right, judged by hand. A grader is right on a
line when its verdict equals the label (a grading error counts as "not correct").

* **stepsal_lens**: :func:`stepsal_lens.eval.grading.grade_output`.
* **math-verify**: ``verify(parse("$" + gold + "$"), parse(output))``, the library used
  as its README shows; for choice lines both sides are parsed with
  ``StringExtractionConfig()`` (its multiple-choice mode). It runs in this process's main
  thread with its own 5 s alarm per operation.

Prints a table: corpus size, accuracy of each grader (overall, math, choice) and the
mean time per line. ``--misses`` also lists the lines each grader gets wrong. Lines with
``"set": "held-out"`` were written after the grader's rules were last changed and were
never used to tune them.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "eval" / "data" / "grading_corpus.jsonl"


def load_corpus(path: str | Path = CORPUS) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def math_verify_correct(output: str, answer: str, kind: str) -> bool:
    """Plain math-verify's verdict on one line (main thread only: it uses SIGALRM)."""
    from math_verify import parse, verify
    from math_verify.parser import StringExtractionConfig

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every timeout
    if kind == "choice":
        config = [StringExtractionConfig()]
        return bool(verify(parse(answer, extraction_config=config),
                           parse(output, extraction_config=config)))
    return bool(verify(parse(f"${answer}$"), parse(output)))


def ours_correct(output: str, answer: str, kind: str) -> bool:
    from stepsal_lens.eval.grading import grade_output

    return grade_output(output, answer, kind).correct


def score(rows: list[dict], grader) -> tuple[list[bool], float]:
    """Per-line agreement with the label, and seconds per line."""
    t0 = time.perf_counter()
    hits = [grader(r["output"], str(r["answer"]), r.get("kind", "math")) == r["label"]
            for r in rows]
    return hits, (time.perf_counter() - t0) / max(1, len(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--misses", action="store_true", help="list the lines each grader misses")
    args = parser.parse_args(argv)
    rows = load_corpus(args.corpus)
    ours_correct("\\boxed{1}", "1/1", "math")  # start the worker outside the timing
    results = {"stepsal_lens": score(rows, ours_correct),
               "math-verify": score(rows, math_verify_correct)}
    kinds = {k: [i for i, r in enumerate(rows) if r.get("kind", "math") == k]
             for k in ("math", "choice")}
    kinds["held-out"] = [i for i, r in enumerate(rows) if r.get("set") == "held-out"]
    print(f"corpus: {len(rows)} lines ({len(kinds['math'])} math, {len(kinds['choice'])} "
          f"choice; {sum(r['label'] for r in rows)} labelled correct)\n")
    print(f"| grader | right | accuracy | math | choice | held-out ({len(kinds['held-out'])}) "
          f"| ms / line |")
    print("|---|---|---|---|---|---|---|")
    for name, (hits, seconds) in results.items():
        part = {k: sum(hits[i] for i in idx) / len(idx) for k, idx in kinds.items() if idx}
        print(f"| {name} | {sum(hits)}/{len(rows)} | {100 * sum(hits) / len(rows):.1f}% | "
              f"{100 * part.get('math', 0):.1f}% | {100 * part.get('choice', 0):.1f}% | "
              f"{100 * part.get('held-out', 0):.1f}% | {1000 * seconds:.1f} |")
    if args.misses:
        for name, (hits, _) in results.items():
            print(f"\n{name} misses:")
            for r, ok in zip(rows, hits):
                if not ok:
                    print(f"  label={r['label']!s:5} gold={r['answer']!r} "
                          f"output=...{r['output'][-70:]!r}")


if __name__ == "__main__":
    main()
