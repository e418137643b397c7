"""Train ``tiny-lrm``: a small Qwen2 reasoning model on the arithmetic-chain task.

    python -m stepsal_lens.zoo.train --seed 0 --out stepsal_lens/zoo/tiny_lrm

writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json, ...) plus
``training.json`` (recipe, loss curve, wall time). The model writes the ``think-tags``
format: ``question\\n<think>\\nthinking\\n</think>\\n\\nsummary<|endoftext|>``. The loss
covers the completion only (the question is random and cannot be predicted).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from stepsal_lens.segments.formats import get_format
from stepsal_lens.zoo.task import make_problems

__all__ = ["build_tokenizer", "make_model", "train"]

FORMAT = "think-tags"
SPECIALS = ("<|endoftext|>", "<think>", "</think>")


def render(problem) -> tuple[str, str]:
    """(prompt, full text) of a problem's reference trace."""
    fmt = get_format(FORMAT)
    prompt = fmt.prompt(problem.question)
    return prompt, fmt.render(problem.question, problem.reference_thinking(),
                              problem.reference_summary())


def build_tokenizer(seed: int = 0, vocab_size: int = 400):
    """A byte-level BPE with single-digit tokens, trained on task text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    corpus = [render(p)[1] for split in ("id", "long")
              for p in make_problems(3000, split=split, seed=seed + 1000)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0],
                                   eos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                   additional_special_tokens=list(SPECIALS[1:]))


def make_model(tokenizer, *, n_layers: int = 4, d_model: int = 128, n_heads: int = 4,
               n_kv_heads: int = 2, n_ctx: int = 512):
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=4 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        max_position_embeddings=n_ctx, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return transformers.Qwen2ForCausalLM(cfg)


def _batch(tokenizer, problems):
    """Right-padded ids and labels with the prompt and padding masked out."""
    rows = []
    for p in problems:
        prompt, text = render(p)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        rows.append((ids, n_prompt))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, :len(ids)] = 1
    return input_ids, labels, mask


def train(out: str | Path, *, seed: int = 0, steps: int = 3000, batch_size: int = 48,
          lr: float = 3e-3, long_fraction: float = 0.03, log_every: int = 50,
          progress: bool = True) -> dict:
    """Train and save tiny-lrm; returns the training record (also in training.json)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer(seed)
    model = make_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses, t0 = [], time.time()
    model.train()
    bar = tqdm(range(steps), desc="training tiny-lrm", disable=not progress)
    for step in bar:
        n_long = sum(rng.random() < long_fraction for _ in range(batch_size))
        problems = (make_problems(batch_size - n_long, split="id", seed=rng.getrandbits(32))
                    + make_problems(n_long, split="long", seed=rng.getrandbits(32)))
        ids, labels, mask = _batch(tokenizer, problems)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            losses.append({"step": step, "loss": round(loss.item(), 5)})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    record = {
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
        "long_fraction": long_fraction, "format": FORMAT,
        "n_params": sum(p.numel() for p in model.parameters()),
        "wall_seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
        "final_loss": losses[-1]["loss"], "losses": losses,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tiny-lrm", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--long-fraction", type=float, default=0.03,
                        help="share of training problems drawn from the 'long' split (5-7 ops)")
    args = parser.parse_args(argv)
    record = train(args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                   lr=args.lr, long_fraction=args.long_fraction)
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    main()
