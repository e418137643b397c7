"""Tokens per second of KV-cached greedy generation, with and without StepFlow, and
Hugging Face ``generate`` on the same weights as the reference. Prints a table.

    python benchmarks/generation.py [--new-tokens 192] [--repeats 3]

Models: the bundled tiny-lrm (4 layers, d_model 128) and a random 8-layer d_model 256
Qwen2. Conditions run interleaved in one process (plain, StepFlow, HF per repeat) and
each figure is the median of ``--repeats``; every run generates exactly
``--new-tokens`` tokens per row (no early stop), batch sizes 1 and 8.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

from stepsal_lens.segments.association import info_of
import torch


def _prompts(model, n):
    from stepsal_lens.zoo.task import make_problems as task

    fmt = info_of(model).format
    return [fmt.prompt(p.question) for p in task(n, split="id", seed=5)]


def _batch(model, prompts):
    from stepsal_lens.lens.generation import prompt_ids

    ids = [prompt_ids(model, p) for p in prompts]
    width = max(map(len, ids))
    pad = model.tokenizer.pad_token_id or 0
    tokens = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return tokens, mask


def _bridge(model, tokens, mask, n, stepflow_on):
    from stepsal_lens import stepflow

    def run():
        return model.generate(tokens, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              stop_at_eos=False, verbose=False)

    t0 = time.perf_counter()
    if stepflow_on:
        with stepflow(model):
            out = run()
    else:
        out = run()
    dt = time.perf_counter() - t0
    return dt, out[:, tokens.shape[1]:]


def _hf(hf, tokens, mask, n):
    # No EOS: every row generates n tokens with unchanged logits, like the bridge runs.
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id, config.pad_token_id = -1, 0  # an id no token has: never stops
    config.max_new_tokens, config.do_sample = n, False
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=tokens, attention_mask=mask, generation_config=config)
    return time.perf_counter() - t0, out[:, tokens.shape[1]:]


def bench(name, path, model, new_tokens, repeats, batches):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    rows = []
    for batch in batches:
        tokens, mask = _batch(model, _prompts(model, batch))
        times = {"bridge": [], "bridge + StepFlow": [], "HF generate (sdpa)": []}
        _bridge(model, tokens, mask, 4, False)  # warm-up
        for _ in range(repeats):
            dt, plain = _bridge(model, tokens, mask, new_tokens, False)
            times["bridge"].append(dt)
            dt, _ = _bridge(model, tokens, mask, new_tokens, True)
            times["bridge + StepFlow"].append(dt)
            dt, ref = _hf(hf, tokens, mask, new_tokens)
            times["HF generate (sdpa)"].append(dt)
        # greedy ties after EOS can flip between eager and sdpa kernels: report agreement
        mismatch = (plain != ref).int()
        first = [int(r.argmax()) if r.any() else new_tokens for r in mismatch]
        same = "same tokens" if min(first) == new_tokens else f"same first {min(first)} tokens"
        base = statistics.median(times["bridge"])
        for cond, ts in times.items():
            med = statistics.median(ts)
            rows.append((name, batch, cond, med, batch * new_tokens / med, base / med,
                         same if cond == "HF generate (sdpa)" else ""))
    return rows


def main(argv=None):
    from stepsal_lens import load_lrm
    from stepsal_lens.lens.models import BUNDLED
    from stepsal_lens.zoo.tiny_random import make_random_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    rows = []
    tiny = load_lrm("tiny-lrm", device="cpu")
    rows += bench("tiny-lrm (4L, d128)", BUNDLED["tiny-lrm"], tiny, args.new_tokens,
                  args.repeats, batches)
    folder = make_random_checkpoint("qwen2", tempfile.mkdtemp(), n_layers=8, d_model=256,
                                    n_heads=8, n_kv_heads=2, n_ctx=1024)
    rnd = load_lrm(folder, device="cpu", format="think-tags")
    rows += bench("random Qwen2 (8L, d256)", folder, rnd, args.new_tokens, args.repeats, batches)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} new tokens per row, median of {args.repeats}\n")
    print(f"| model | batch | generation | seconds | tokens/s | speed vs bridge | note |")
    print("|---|---|---|---|---|---|---|")
    for name, batch, cond, sec, tps, ratio, note in rows:
        print(f"| {name} | {batch} | {cond} | {sec:.2f} | {tps:.0f} | {ratio:.2f}x | {note} |")


if __name__ == "__main__":
    main()
