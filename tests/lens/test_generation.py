"""Batched KV-cached generation: prompt tokens, stopping, records."""

from __future__ import annotations

from stepsal_lens.segments.association import info_of
import pytest

from stepsal_lens import StepSalError
from stepsal_lens.lens.generation import generate, prompt_ids, stop_ids


def test_prompt_ids_follow_the_template_not_the_architecture(arch, models):
    # The toy tokenizer's templates-by-format write no BOS of its own (its BOS is
    # <|endoftext|>), so no architecture gets one, Llama and gpt-oss included.
    model = models[arch]
    prompt = info_of(model).format.prompt("What is 2+2?")
    ids = prompt_ids(model, prompt)
    assert ids == model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] != model.tokenizer.bos_token_id


def test_stop_ids_per_format(models):
    oss = models["gpt-oss"]
    tok = oss.tokenizer
    stops = stop_ids(oss)
    assert tok.convert_tokens_to_ids("<|return|>") in stops
    assert tok.convert_tokens_to_ids("<|end|>") not in stops  # it also closes the analysis


def test_generations_are_whole_and_cut_at_eos(tiny_lrm):
    qs = ["Start with 3. Add 4, then multiply by 2. What is the result?",
          "Start with 9. Subtract 2, then add 5, then add 1. What is the result?"]
    gens = generate(tiny_lrm, qs, max_new_tokens=96, batch_size=2, progress=False)
    for q, g in zip(qs, gens):
        assert g.token_ids[:g.prompt_len] == prompt_ids(tiny_lrm, g.prompt)
        assert g.finished and g.completion_ids[-1] in stop_ids(tiny_lrm)
        assert g.completion_ids.count(g.completion_ids[-1]) == 1  # nothing after the EOS
        assert g.text == tiny_lrm.tokenizer.decode(g.token_ids)
        seg = g.segments()
        assert seg["question"] == q and seg["error"] is None and "\\boxed" in seg["summary"]
        assert g.trace(tiny_lrm).token_ids.tolist() == g.token_ids
        assert g.stats["smi"]["injections"] == 0 and g.stats["oeb"]["triggers"] == 0
    short = generate(tiny_lrm, qs[:1], max_new_tokens=5, progress=False)[0]
    assert not short.finished and len(short.completion_ids) == 5
    assert short.segments()["truncated"] is True


def test_sampling_is_seeded(tiny_lrm):
    q = ["Start with 3. Add 4, then multiply by 2. What is the result?"]
    a = generate(tiny_lrm, q, temperature=1.5, seed=1, max_new_tokens=40, progress=False)[0]
    b = generate(tiny_lrm, q, temperature=1.5, seed=1, max_new_tokens=40, progress=False)[0]
    assert a.token_ids == b.token_ids


def test_bad_calls_are_named(tiny_lrm):
    with pytest.raises(StepSalError, match="exactly one"):
        generate(tiny_lrm)
    with pytest.raises(StepSalError, match="list of strings"):
        generate(tiny_lrm, "Start with 3.")
    with pytest.raises(StepSalError, match="context"):
        generate(tiny_lrm, ["Start with 3. Add 4. What is the result?"], max_new_tokens=10**6)


def test_batched_generation_equals_one_by_one(tiny_lrm):
    """Left padding must not change what the model writes (guards the width logic)."""
    from stepsal_lens.zoo.task import make_problems as task

    questions = [p.question for p in task(2, split="id", seed=4) + task(2, split="hard", seed=4)]
    batched = generate(tiny_lrm, questions, batch_size=4, progress=False)
    single = generate(tiny_lrm, questions, batch_size=1, progress=False)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(g.text.endswith("<|endoftext|>") for g in batched)
