"""Step-Saliency speed and memory, side by side in one table.

A random 8-layer, d_model 256 Qwen2 (8 heads, 4 kv heads, vocabulary 600), synthetic
reasoning traces with ~28-token steps. Every (method, T) runs in a fresh process: load,
warm up on a 64-token trace, then time one call and read the peak RSS.

  fused         step_saliency(engine="fused")          (the default engine)
  fused_low     step_saliency(engine="fused", low_memory=True)
  hook_pattern  step_saliency(engine="hook_pattern")   (T <= 4096: it needs ~11 GiB at 4k)
  hf_sdpa       Hugging Face sdpa forward + backward of the LM loss (the floor)

RSS growth = peak RSS of the child (ru_maxrss) minus its RSS just before the timed call.
Long runs: run a few lengths per invocation with ``--json results.json`` (results merge
into the file), then ``--table results.json`` prints the table of everything measured.

Usage: python benchmarks/saliency.py [--lengths 1024 2048 4096] [--methods ...]
       [--repeats 1] [--json FILE] [--table FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["fused", "fused_low", "hook_pattern", "hf_sdpa"]
#: lengths above which a method is not run (it does not fit in 24 GiB)
MAX_T = {"hook_pattern": 4096}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_trace(model, n_tokens: int):
    """A synthetic reasoning trace of about ``n_tokens`` tokens, steps of ~30 tokens."""
    from stepsal_lens import Trace

    sentence = "Then we add {} to the running total and the value becomes {}. "
    thinking, i = "", 0
    while True:
        thinking += sentence.format(i, 3 * i + 7)
        i += 1
        trace = Trace.from_segments("Start with 7. Add many numbers. What is the total?",
                                    thinking, "The total is 42.\n\nSo the answer is \\boxed{42}.",
                                    model)
        if trace.n_tokens >= n_tokens:
            return trace
        if trace.n_tokens < n_tokens - 400:  # grow fast until close
            thinking += sentence.format(i, i) * 10


def worker(method: str, path: str, n_tokens: int) -> dict:
    import torch
    import transformers

    from stepsal_lens import load_lrm, step_saliency

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_lrm(path, device="cpu", format="think-tags")
    warm = make_trace(model, 64)
    trace = make_trace(model, n_tokens)
    ids = trace.token_ids[None]
    if method == "hf_sdpa":
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
        del model

    def run(trace):
        if method == "hf_sdpa":
            hf.zero_grad(set_to_none=True)
            tokens = trace.token_ids[None]
            hf(tokens, labels=tokens).loss.backward()
        else:
            engine = "hook_pattern" if method == "hook_pattern" else "fused"
            sal = step_saliency(model, trace, engine=engine, low_memory=method == "fused_low")
            assert sal.meta["engine"] == engine

    run(warm)
    before = current_rss_mib()
    t0 = time.perf_counter()
    run(trace)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mib": rss_mib(), "rss_before_mib": before,
            "n_tokens": trace.n_tokens, "n_steps": trace.n_steps, "method": method,
            "T": n_tokens, "threads": torch.get_num_threads()}


def print_table(results: dict[str, list[dict]]) -> None:
    def med(method, n, key):
        runs = results.get(f"{method}@{n}", [])
        return statistics.median(r[key] for r in runs) if runs else float("nan")

    def growth(method, n):
        return med(method, n, "peak_rss_mib") - med(method, n, "rss_before_mib")

    lengths = sorted({r["T"] for runs in results.values() for r in runs})
    methods = [m for m in METHODS if any(k.startswith(m + "@") for k in results)]
    print("| T | steps | method | time (s) | x sdpa time | RSS growth (MiB) | x sdpa RSS growth |")
    print("|---|---|---|---|---|---|---|")
    for n in lengths:
        for m in methods:
            runs = results.get(f"{m}@{n}")
            if not runs:
                continue
            t, g = med(m, n, "seconds"), growth(m, n)
            print(f"| {runs[0]['n_tokens']} | {runs[0]['n_steps']} | {m} | {t:.2f} "
                  f"| {t / med('hf_sdpa', n, 'seconds'):.2f} | {g:.0f} "
                  f"| {g / growth('hf_sdpa', n):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--json", help="merge the raw results into this file")
    parser.add_argument("--table", help="print the table of a results file and exit")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "PATH", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, path, n = args.worker
        print(json.dumps(worker(method, path, int(n))))
        return
    if args.table:
        print_table(json.loads(Path(args.table).read_text()))
        return

    from stepsal_lens.zoo.tiny_random import make_random_checkpoint

    path = make_random_checkpoint("qwen2", tempfile.mkdtemp(prefix="bench-"), n_layers=8,
                                  d_model=256, n_heads=8, n_kv_heads=4, n_ctx=40000)
    results: dict[str, list[dict]] = {}
    if args.json and Path(args.json).exists():
        results = json.loads(Path(args.json).read_text())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    for n in args.lengths:
        fresh: dict[str, list[dict]] = {}
        for rep in range(args.repeats):
            for method in args.methods:  # interleaved so machine noise hits all alike
                if n > MAX_T.get(method, n):
                    continue
                try:
                    proc = subprocess.run([sys.executable, __file__, "--worker", method,
                                           str(path), str(n)], capture_output=True, text=True,
                                          env=env, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"{method} T={n}: over {args.timeout:.0f} s", file=sys.stderr)
                    continue
                if proc.returncode != 0:
                    print(f"{method} T={n}: failed (exit {proc.returncode})\n"
                          f"{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(proc.stdout.splitlines()[-1])
                fresh.setdefault(f"{method}@{n}", []).append(r)
                print(f"T={n} rep {rep} {method}: {r['seconds']:.2f} s, RSS growth "
                      f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f} MiB", file=sys.stderr)
        results.update(fresh)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results)


if __name__ == "__main__":
    main()
