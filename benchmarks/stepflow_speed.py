"""Tokens per second of KV-cached greedy generation with StepFlow, each engine against
Hugging Face's sdpa ``generate``. Prints a table.

    python benchmarks/stepflow_speed.py [--new-tokens 192] [--repeats 5] [--batches 1,8]

Model: a random 8-layer, d_model 256 Qwen2 (8 heads, 4 key/value heads), CPU. Each method
runs in its own fresh process (no method inherits another's allocator or caches) on the
same checkpoint and prompts. The processes take turns, one run at a time, round-robin
(so a noisy neighbour on a shared machine slows every method alike); each figure is the
median of ``--repeats`` turns after one warm-up, every run generates exactly
``--new-tokens`` tokens per row (no early stop), and StepFlow runs with the paper's
settings (OEB on the bottom quarter, SMI on the top quarter). ``--passive`` sets
``OMP_WAIT_POLICY=PASSIVE`` in the workers (a busy machine). Methods:

* ``HF sdpa generate``: ``AutoModelForCausalLM(..., attn_implementation="sdpa").generate``.
* ``bridge generate``: the bridge's ``generate``, StepFlow off.
* ``StepFlow hook_pattern``: the bridge's ``generate`` inside
  ``stepflow(model, engine="hook_pattern")``.
* ``StepFlow fused``: :func:`stepsal_lens.lens.fused_stepflow.generate_tokens` inside
  ``stepflow(model, engine="fused")`` (what :func:`stepsal_lens.lens.generation.generate` runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("HF sdpa generate", "bridge generate", "StepFlow hook_pattern", "StepFlow fused")


def _prompts(n):
    from stepsal_lens import get_format
    from stepsal_lens.zoo.task import make_problems as task

    fmt = get_format("think-tags")
    return [fmt.prompt(p.question) for p in task(n, split="id", seed=5)]


def _batch(model, prompts):
    from stepsal_lens.lens.generation import prompt_ids

    ids = [prompt_ids(model, p) for p in prompts]
    width = max(map(len, ids))
    pad = model.tokenizer.pad_token_id or 0
    tokens = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return tokens, mask


def worker(method: str, folder: str, batch: int, new_tokens: int) -> None:
    """Serve one method in this process: after a warm-up, each line ``run`` on stdin
    times one generation and answers a JSON line (seconds, generated tokens)."""
    from stepsal_lens import load_lrm, stepflow
    from stepsal_lens.lens.fused_stepflow import generate_tokens

    model = load_lrm(folder, device="cpu", format="think-tags")
    tokens, mask = _batch(model, _prompts(batch))
    if method == "HF sdpa generate":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        config = copy.deepcopy(hf.generation_config)
        config.eos_token_id, config.pad_token_id = -1, 0  # an id no token has: never stops
        config.do_sample = False

        def run(n):
            config.max_new_tokens = n
            with torch.no_grad():
                return hf.generate(input_ids=tokens, attention_mask=mask,
                                   generation_config=config)
    elif method in ("bridge generate", "StepFlow hook_pattern"):
        on = method != "bridge generate"

        def run(n):
            with stepflow(model, engine="hook_pattern") if on else _null():
                return model.generate(tokens, attention_mask=mask, max_new_tokens=n,
                                      do_sample=False, stop_at_eos=False, verbose=False)
    else:
        def run(n):
            with stepflow(model, engine="fused"):
                return generate_tokens(model, tokens, mask, max_new_tokens=n)
    run(4)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0 = time.perf_counter()
        out = run(new_tokens)
        dt = time.perf_counter() - t0
        print(json.dumps({"time": dt, "tokens": out[:, tokens.shape[1]:].tolist()}), flush=True)


def _spawn(method: str, folder, batch: int, new_tokens: int, threads: int | None,
           passive: bool):
    cmd = [sys.executable, __file__, "--worker", method, "--folder", str(folder),
           "--batch", str(batch), "--new-tokens", str(new_tokens)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    if passive:
        # threads that sleep at barriers instead of spinning: on a busy shared machine
        # spinning threads slow every method several times, and unevenly
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])  # this checkout's package
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    while proc.stdout.readline().strip() != "ready":
        if proc.poll() is not None:
            raise RuntimeError(f"the {method!r} worker failed to start")
    return proc


def _turn(proc) -> dict:
    proc.stdin.write("run\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: torch's)")
    parser.add_argument("--passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE in the workers (for a busy machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.folder, args.batch, args.new_tokens)
        return
    from stepsal_lens.zoo.tiny_random import make_random_checkpoint

    folder = make_random_checkpoint("qwen2", tempfile.mkdtemp(), n_layers=8, d_model=256,
                                    n_heads=8, n_kv_heads=4, n_ctx=1024)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        procs = {m: _spawn(m, folder, batch, args.new_tokens, args.threads, args.passive)
                 for m in METHODS}
        res: dict[str, dict] = {m: {"times": []} for m in METHODS}
        try:
            for _ in range(args.repeats):
                for method, proc in procs.items():
                    out = _turn(proc)
                    res[method]["times"].append(out["time"])
                    res[method]["tokens"] = out["tokens"]
        finally:
            for proc in procs.values():
                proc.stdin.close()
                proc.wait()
        hf = statistics.median(res["HF sdpa generate"]["times"])
        for method in METHODS:
            med = statistics.median(res[method]["times"])
            same = {"bridge generate": res["HF sdpa generate"],
                    "StepFlow fused": res["StepFlow hook_pattern"]}.get(method)
            note = "" if same is None else (
                "same tokens as " + ("HF" if method == "bridge generate" else "hook_pattern")
                if same["tokens"] == res[method]["tokens"] else "TOKENS DIFFER")
            rows.append((batch, method, med, batch * args.new_tokens / med, hf / med, note))
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads"
          f"{', OMP_WAIT_POLICY=PASSIVE' if args.passive else ''}, "
          f"random Qwen2 (8 layers, d_model 256, 8 heads / 4 kv heads), {args.new_tokens} new "
          f"tokens per row, median of {args.repeats} turns, a fresh process per method\n")
    print("| batch | generation | seconds | tokens/s | vs HF sdpa | note |")
    print("|---|---|---|---|---|---|")
    for batch, method, sec, tps, ratio, note in rows:
        print(f"| {batch} | {method} | {sec:.2f} | {tps:.0f} | {ratio:.2f}x | {note} |")


if __name__ == "__main__":
    main()
