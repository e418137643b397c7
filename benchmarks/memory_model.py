"""Memory model of the fused Step-Saliency engine, checked against measurements.

What the fused engine keeps alive (weights frozen, so linear layers save nothing; bytes
per token, ``b`` = bytes per element of the model dtype):

  per layer, saved for backward
    2 RMSNorms          2 * 4 * D        (HF RMSNorm saves its float32 input)
    attention           b * (2 * H * d + 2 * Hkv * d) + 4 * H
                        (post-RoPE q and the output; k and v not repeated; lse)
    Qwen3 QK-norm       4 * (H + Hkv) * d
    SwiGLU MLP          3 * b * I        (gate, act(gate), up)
  low_memory=True keeps b * D per layer (each layer's input) plus one layer's set.
  once: the final hidden state for the lean loss, 4 * D.

  transients in backward (one layer at a time)
    gradients           about one layer's saved set (the gradients of its activations)
    float32 copies      4 * (3 * H * d + 5 * Hkv * d)     (q|lse, k|1, v, dO, dq, dk, dv)
    blocks              the chunk budget (min(4 GiB, free / 4) on CUDA, 48 MiB on CPU)
    lean loss           at most 512 MiB of float32 logits (a chunk of positions)

  weights               b * n_params

``python benchmarks/memory_model.py`` prints the estimates for R1-Distill-Qwen-7B and -32B
at 8k, 16k and 32k tokens on one 80 GB GPU; ``--check`` measures the bytes saved for
backward during ``step_saliency(engine="fused")`` on the benchmark's 8-layer Qwen2
(saved-tensor hooks) and compares them with the formula.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Arch:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab: int
    n_params: float
    qk_norm: bool = False


R1_7B = Arch("R1-Distill-Qwen-7B", 28, 3584, 28, 4, 128, 18944, 152064, 7.62e9)
R1_32B = Arch("R1-Distill-Qwen-32B", 64, 5120, 40, 8, 128, 27648, 152064, 32.76e9)
BENCH = Arch("bench Qwen2 8L d256", 8, 256, 8, 4, 32, 512, 600, 0)


def saved_per_token_layer(a: Arch, b: int) -> float:
    """Bytes saved for backward per token and layer (the formula in the module docstring)."""
    norms = 2 * 4 * (a.d_model + 1)  # float32 input and 1/rms
    attn = b * (2 * a.n_heads * a.d_head + 2 * a.n_kv_heads * a.d_head) + 4 * a.n_heads
    qk = 4 * (a.n_heads + a.n_kv_heads) * a.d_head if a.qk_norm else 0
    mlp = 3 * b * a.d_mlp
    return norms + attn + qk + mlp


def backward_copies_per_token(a: Arch) -> float:
    return 4 * (3 * a.n_heads * a.d_head + 5 * a.n_kv_heads * a.d_head)


def estimate(a: Arch, n_tokens: int, *, b: int = 2, low_memory: bool = False,
             gpu_gb: float | None = 80.0) -> dict[str, float]:
    """GB of each part at ``n_tokens`` on a GPU with ``gpu_gb`` (None: CPU)."""
    weights = b * a.n_params / GB
    layer = saved_per_token_layer(a, b) * n_tokens / GB
    saved = (a.n_layers * b * a.d_model * n_tokens / GB + layer) if low_memory else a.n_layers * layer
    saved += 4 * a.d_model * n_tokens / GB
    transient = backward_copies_per_token(a) * n_tokens / GB + layer
    lean = min(512 * 2**20, 4 * 4 * a.vocab * n_tokens) / GB
    if gpu_gb is None:  # CPU: fixed 48 MiB of blocks
        blocks = 48 * 2**20 / GB
    else:
        blocks = min(4 * 2**30 / GB, max(gpu_gb - weights - saved - transient - lean, 0.0) / 4)
    total = weights + saved + transient + blocks + lean
    return {"weights": weights, "saved": saved, "bwd_transient": transient, "blocks": blocks,
            "lean_logits": lean, "total": total,
            "fits": gpu_gb is None or total <= gpu_gb}


def print_estimates() -> None:
    print("| model | T | low_memory | weights | saved activations | backward transients | "
          "blocks + loss chunk | total (GB) | fits 80 GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a in (R1_7B, R1_32B):
        for n in (8192, 16384, 32768):
            for low in (False, True):
                e = estimate(a, n, low_memory=low)
                print(f"| {a.name} | {n // 1024}k | {'yes' if low else 'no'} | {e['weights']:.1f} "
                      f"| {e['saved']:.1f} | {e['bwd_transient']:.1f} "
                      f"| {e['blocks'] + e['lean_logits']:.1f} | {e['total']:.1f} "
                      f"| {'yes' if e['fits'] else 'no'} |")


def measure_saved(n_tokens: int, dtype: str = "float32", low_memory: bool = False) -> float:
    """Bytes saved for backward (distinct storages) during the fused engine's forward."""
    import torch

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from saliency import make_trace  # noqa: E402

    from stepsal_lens import load_lrm, step_saliency
    from stepsal_lens.zoo.tiny_random import make_random_checkpoint

    path = make_random_checkpoint("qwen2", tempfile.mkdtemp(prefix="mem-"), n_layers=8,
                                  d_model=256, n_heads=8, n_kv_heads=4, n_ctx=40000)
    model = load_lrm(path, device="cpu", dtype=dtype, format="think-tags")
    trace = make_trace(model, n_tokens)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    peak = [0]

    def pack(t):  # weights saved by reference are not activation memory
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
            peak[0] = max(peak[0], sum(seen.values()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_saliency(model, trace, engine="fused", low_memory=low_memory)
    return peak[0], trace.n_tokens


def check() -> None:
    print("| dtype | T | measured saved (MiB) | formula (MiB) | ratio |")
    print("|---|---|---|---|---|")
    for dtype, b in (("float32", 4), ("bfloat16", 2)):
        for n in (1024, 2048, 4096):
            got, t = measure_saved(n, dtype)
            want = (BENCH.n_layers * saved_per_token_layer(BENCH, b) + 4 * BENCH.d_model) * t
            print(f"| {dtype} | {t} | {got / 2**20:.1f} | {want / 2**20:.1f} | {got / want:.3f} |")


def check_rss(path: str) -> None:
    """The whole formula (weights excluded) against the RSS growth that
    ``benchmarks/saliency.py --json`` measured for the fused engine (float32, CPU)."""
    import json
    from pathlib import Path

    print("| T | low_memory | predicted (MiB) | measured RSS growth (MiB) | measured / predicted |")
    print("|---|---|---|---|---|")
    results = json.loads(Path(path).read_text())
    for key in sorted(results, key=lambda k: (k.split("@")[0], int(k.split("@")[1]))):
        method = key.split("@")[0]
        if method not in ("fused", "fused_low"):
            continue
        for r in results[key][:1]:
            e = estimate(BENCH, r["n_tokens"], b=4, low_memory=method == "fused_low",
                         gpu_gb=None)
            want = (e["total"] - e["weights"]) * GB / 2**20
            got = r["peak_rss_mib"] - r["rss_before_mib"]
            print(f"| {r['n_tokens']} | {'yes' if method == 'fused_low' else 'no'} "
                  f"| {want:.0f} | {got:.0f} | {got / want:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="measure and compare on CPU")
    parser.add_argument("--check-rss", metavar="RESULTS_JSON",
                        help="compare with RSS growth measured by benchmarks/saliency.py")
    args = parser.parse_args()
    if args.check_rss:
        check_rss(args.check_rss)
    elif args.check:
        check()
    else:
        print_estimates()


if __name__ == "__main__":
    main()
