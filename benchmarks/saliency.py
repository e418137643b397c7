"""Step-Saliency speed and memory, side by side in one run.

Prints a Markdown table for a random 8-layer, d_model 256 Qwen2 model (8 heads, 4 kv
heads) at several sequence lengths. Methods, each in a fresh process (medians of 3):

  ours        step_saliency(), default engine
  low_memory  step_saliency(low_memory=True)
  hf_loops    what a user would otherwise write: HF eager + output_attentions +
              retain_grad, all layers' saliency kept, pooled with Python loops over steps
  hf_sdpa     plain HF sdpa forward + backward (the floor)
  bridge      the bridge's own forward + backward (loss.backward(), weight grads on)
  bridge_act  the bridge's forward + backward with activation gradients only (what our
              engine runs, minus the saliency hooks)

Usage: python benchmarks/saliency.py [--lengths 512 1024 2048 4096] [--repeats 3]
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

METHODS = ["ours", "low_memory", "hf_loops", "hf_sdpa", "bridge", "bridge_act"]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    spans = [s.token_span for s in trace.steps]

    if method in ("hf_loops", "hf_sdpa"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="eager" if method == "hf_loops" else "sdpa")
        del model

    def run(trace=trace, ids=ids, spans=spans):
        if method == "ours":
            step_saliency(model, trace)
        elif method == "low_memory":
            step_saliency(model, trace, low_memory=True)
        elif method == "bridge":
            model.zero_grad(set_to_none=True)
            model(ids, return_type="loss").backward()
        elif method == "bridge_act":
            for p in model.parameters():
                p.requires_grad_(False)

            def grad_in(x, hook):
                return x.detach().requires_grad_(True)

            with model.hooks(fwd_hooks=[("hook_embed", grad_in)]):
                model(ids, return_type="loss").backward()
        elif method == "hf_sdpa":
            hf.zero_grad(set_to_none=True)
            hf(ids, labels=ids).loss.backward()
        elif method == "hf_loops":
            hf.zero_grad(set_to_none=True)
            out = hf(ids, labels=ids, output_attentions=True)
            for a in out.attentions:
                a.retain_grad()
            out.loss.backward()
            saliency = [(a * a.grad).abs()[0] for a in out.attentions]  # all layers kept
            maps = torch.zeros(len(saliency), saliency[0].shape[0], len(spans), len(spans))
            for layer, sal in enumerate(saliency):
                for i, (a, b) in enumerate(spans):
                    for j, (c, d) in enumerate(spans):
                        maps[layer, :, i, j] = sal[:, a:b, c:d].mean((1, 2))

    # Warm up on a short trace so lazy initialisation is not measured; ru_maxrss is a
    # high-water mark, so the short run cannot hide the long run's peak.
    run(warm, warm.token_ids[None], [s.token_span for s in warm.steps])
    before = rss_mib()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mib": rss_mib(), "rss_before_mib": before,
            "n_tokens": trace.n_tokens, "n_steps": trace.n_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "PATH", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, path, n = args.worker
        print(json.dumps(worker(method, path, int(n))))
        return

    from stepsal_lens.zoo.tiny_random import make_random_checkpoint

    path = make_random_checkpoint("qwen2", tempfile.mkdtemp(prefix="bench-"), n_layers=8,
                                  d_model=256, n_heads=8, n_kv_heads=4, n_ctx=8192)
    results: dict[tuple[str, int], list[dict]] = {}
    for n in args.lengths:
        for rep in range(args.repeats):
            for method in args.methods:  # interleaved so machine noise hits all alike
                proc = subprocess.run([sys.executable, __file__, "--worker", method, str(path),
                                       str(n)], capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{method} T={n}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                results.setdefault((method, n), []).append(json.loads(proc.stdout.splitlines()[-1]))
                print(f"T={n} rep {rep} {method}: {results[(method, n)][-1]['seconds']:.2f}s",
                      file=sys.stderr)

    def med(method, n, key):
        runs = results.get((method, n), [])
        return statistics.median(r[key] for r in runs) if runs else float("nan")

    print("| T | steps | method | time (s) | peak RSS (MiB) | RSS growth in call (MiB) |")
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        for method in args.methods:
            if (method, n) not in results:
                continue
            r0 = results[(method, n)][0]
            growth = med(method, n, "peak_rss_mib") - med(method, n, "rss_before_mib")
            print(f"| {r0['n_tokens']} | {r0['n_steps']} | {method} | {med(method, n, 'seconds'):.2f} "
                  f"| {med(method, n, 'peak_rss_mib'):.0f} | {growth:.0f} |")
    print()
    print("| T | ours / hf_loops time | low_memory / hf_loops call RSS growth | ours / bridge_act time (pooling overhead) | ours / bridge time | ours / hf_sdpa time |")
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        def growth(m):
            return med(m, n, "peak_rss_mib") - med(m, n, "rss_before_mib")
        t = {m: med(m, n, "seconds") for m in args.methods}
        print(f"| {n} | {t.get('ours', 0) / t.get('hf_loops', 1):.2f} "
              f"| {growth('low_memory') / growth('hf_loops'):.2f} "
              f"| {t.get('ours', 0) / t.get('bridge_act', 1):.2f} "
              f"| {t.get('ours', 0) / t.get('bridge', 1):.2f} "
              f"| {t.get('ours', 0) / t.get('hf_sdpa', 1):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{m}@{n}": v for (m, n), v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
