"""What judging model programs in a sandbox costs, against a bare ``subprocess.run``.

    python benchmarks/code_sandbox.py [--n 400] [--tests 10] [--json OUT.json]

``--n`` short stdin programs (sum, sort, count, a loop: what an LCB easy problem runs in
milliseconds), ``--tests`` tests each, all passing. Measured in one process, one after
another:

* **bare**: ``subprocess.run([python, solution.py], input=...)`` once per test, and the
  output compared with LiveCodeBench's rule (how an unsandboxed harness runs a program);
* **sandbox, 1 worker** (``--code-workers 1``) and **2 workers**: :func:`judge_many`, one
  sandbox per program (one Python start, one fork per test), with each backend that
  works here (``bwrap``, ``unshare``) and the ``none`` backend (the same judge without a
  sandbox: isolates what the sandbox itself costs);
* **start-up**: a one-test program, sandboxed vs bare (the fixed price per program).

Prints programs per second, milliseconds per program, and each configuration's
difference to bare per program.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TEMPLATES = [
    ("n = int(input())\nxs = list(map(int, input().split()))\nprint(sum(xs) + n)",
     lambda r: (f"{len(r)}\n{' '.join(map(str, r))}\n", f"{sum(r) + len(r)}\n")),
    ("input()\nxs = sorted(map(int, input().split()))\nprint(*xs)",
     lambda r: (f"{len(r)}\n{' '.join(map(str, r))}\n", " ".join(map(str, sorted(r))) + "\n")),
    ("import sys\ndata = sys.stdin.read().split()\nprint(len(set(data[1:])))",
     lambda r: (f"{len(r)}\n{' '.join(map(str, r))}\n", f"{len(set(map(str, r)))}\n")),
    ("n = int(input())\nxs = list(map(int, input().split()))\nbest = 0\nfor x in xs:\n"
     "    best = max(best, x * x % 97)\nprint(best)",
     lambda r: (f"{len(r)}\n{' '.join(map(str, r))}\n", f"{max(x * x % 97 for x in r)}\n")),
]


def make_programs(n: int, tests: int, seed: int = 0):
    import random

    from stepsal_lens.eval.code.judge import CodeTest

    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        code, io = TEMPLATES[i % len(TEMPLATES)]
        cases = []
        for _ in range(tests):
            r = [rng.randint(1, 1000) for _ in range(rng.randint(3, 30))]
            inp, out = io(r)
            cases.append(CodeTest(inp, out))
        jobs.append({"code": code, "tests": cases})
    return jobs


def run_bare(jobs, folder: str) -> float:
    """Seconds for every program run bare: one subprocess.run per test, compared."""
    from stepsal_lens.eval.code.judge import compare_stdout

    start = time.perf_counter()
    for i, job in enumerate(jobs):
        path = os.path.join(folder, f"sol{i}.py")
        with open(path, "w") as f:
            f.write(job["code"])
        for t in job["tests"]:
            done = subprocess.run([sys.executable, path], input=t.input, capture_output=True,
                                  text=True, timeout=6)
            if done.returncode or not compare_stdout(done.stdout, t.output)[0]:
                raise SystemExit(f"bare run failed on program {i}: {done.stderr[-300:]}")
    return time.perf_counter() - start


def run_sandboxed(jobs, backend: str, workers: int) -> float:
    from stepsal_lens.eval.code.judge import judge_many
    from stepsal_lens.eval.code.sandbox import Limits

    start = time.perf_counter()
    verdicts = judge_many(jobs, workers=workers, backend=backend, limits=Limits(),
                          progress=False)
    took = time.perf_counter() - start
    bad = [v for v in verdicts if v.verdict != "passed"]
    if bad:
        raise SystemExit(f"{backend}: {len(bad)} programs did not pass: {bad[0]}")
    return took


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="programs (default 400)")
    parser.add_argument("--tests", type=int, default=10, help="tests per program (default 10)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="interleaved rounds; the median round counts (default 4)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    from stepsal_lens.eval.code.sandbox import detect_backend
    from stepsal_lens.errors import StepSalError

    backends = []
    for b in ("bwrap", "unshare"):
        try:
            backends.append(detect_backend(b))
        except StepSalError as err:
            print(f"({b} does not work here: {err})", file=sys.stderr)
    jobs = make_programs(args.n, args.tests)
    one = make_programs(max(20, args.n // 10), 1, seed=1)
    configs = [("bare subprocess.run per test", None, 1)] + [
        (f"judge, backend {b}", b, w) for b in ["none"] + backends for w in (1, 2)]
    # rounds interleave the configurations (a shared machine's load drifts): each round
    # runs every configuration on its share of the programs; the median round counts
    rounds = max(1, args.rounds)
    times = {c: [] for c in configs}
    times_one = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(rounds):
            part, part_one = jobs[r::rounds], one[r::rounds]
            for c in configs:
                name, backend, workers = c
                if backend is None:
                    times[c].append(run_bare(part, folder) / len(part))
                    times_one[c].append(run_bare(part_one, folder) / len(part_one))
                else:
                    times[c].append(run_sandboxed(part, backend, workers) / len(part))
                    if workers == 1:
                        times_one[c].append(run_sandboxed(part_one, backend, 1) / len(part_one))
    import statistics

    rows = [(name, workers, statistics.median(times[c]) * len(jobs),
             statistics.median(times_one[c]) * len(one) if times_one[c] else float("nan"))
            for c in configs for name, _, workers in [c]]
    bare, bare_one = rows[0][2], rows[0][3]
    n = len(jobs)
    print(f"\n{n} programs x {args.tests} tests; start-up: {len(one)} one-test programs; "
          f"{os.cpu_count()} CPUs; median of {rounds} interleaved rounds; load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print("| how | workers | programs/s | ms / program | vs bare, ms / program | "
          "one-test program, ms | start-up vs bare, ms |")
    print("|---|---|---|---|---|---|---|")
    out = []
    for name, workers, took, took_one in rows:
        per = 1000 * took / n
        per_one = 1000 * took_one / len(one)
        diff = per - 1000 * bare / n
        diff_one = per_one - 1000 * bare_one / len(one)
        one_text = "-" if took_one != took_one else f"{per_one:.1f}"
        diff_one_text = "-" if took_one != took_one else f"{diff_one:+.1f}"
        print(f"| {name} | {workers} | {n / took:.1f} | {per:.1f} | {diff:+.1f} | "
              f"{one_text} | {diff_one_text} |")
        out.append({"how": name, "workers": workers, "programs_per_s": n / took,
                    "ms_per_program": per, "ms_vs_bare": diff,
                    "one_test_ms": None if took_one != took_one else per_one,
                    "one_test_ms_vs_bare": None if took_one != took_one else diff_one})
    for backend in backends:
        t1 = next(r for r in out if r["how"].endswith(backend) and r["workers"] == 1)
        t2 = next(r for r in out if r["how"].endswith(backend) and r["workers"] == 2)
        print(f"\n{backend}: 2 workers / 1 worker = "
              f"{t2['programs_per_s'] / t1['programs_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "tests": args.tests, "cpus": os.cpu_count(), "rows": out}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
