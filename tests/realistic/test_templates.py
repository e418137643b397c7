"""Prompts, BOS and trace ids on the real tokenizers and chat templates.

A trace must hold exactly the ids the model saw: the generation prompt as the model's
chat template renders it (BOS where the template writes one, never where only the
architecture would), then the completion's tokens.
"""

from __future__ import annotations

from stepsal_lens.segments.association import info_of
import pytest
import torch
from transformers import AutoTokenizer

from stepsal_lens import StepSalError, Trace, get_format, load_lrm
from stepsal_lens.lens.generation import prompt_ids

Q = "Let $x$ satisfy $x^2 = 2x + 3$ with $x > 0$. What is $x$?"
T = ("Okay, so I have the equation x squared equals 2x plus 3. "
     "Rearranging gives x^2 - 2x - 3 = 0, which factors as (x - 3)(x + 1). "
     "The roots are 3 and -1, and only 3 is positive. "
     "Let me verify: 3.5 would be too big, while 9 = 6 + 3 holds for 3.")
S = "Since $x > 0$, the answer is $x = 3$.\n\n**Final Answer**\n\\[\\boxed{3}\\]"

#: tokenizer folder -> (format, BOS string the template writes or None, prompt ends with)
TEMPLATES = {
    "r1-distill-qwen": ("deepseek-r1", "<｜begin▁of▁sentence｜>", "<｜Assistant｜><think>\n"),
    "r1-distill-qwen-jan": ("deepseek-r1", "<｜begin▁of▁sentence｜>", "<｜Assistant｜>"),
    "r1-distill-llama": ("deepseek-r1", "<｜begin▁of▁sentence｜>", "<｜Assistant｜><think>\n"),
    "qwq": ("qwq", None, "<|im_start|>assistant\n<think>\n"),
    "qwen3": ("qwen3", None, "<|im_start|>assistant\n"),
    "gpt-oss": ("gpt-oss", None, "<|start|>assistant"),
}


@pytest.fixture(scope="module", params=list(TEMPLATES))
def real(request, find_tokenizer):
    name = request.param
    return name, AutoTokenizer.from_pretrained(find_tokenizer(name)), *TEMPLATES[name]


def _template_ids(tok, question=Q) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


def test_prompt_is_the_chat_template(real):
    name, tok, fmt_name, bos, ending = real
    fmt = get_format(fmt_name)
    prompt = fmt.chat_prompt(Q, tok)
    assert prompt.endswith(ending)
    assert tok(prompt, add_special_tokens=False)["input_ids"] == _template_ids(tok)
    if name in ("r1-distill-qwen", "r1-distill-llama", "qwq", "qwen3"):
        assert fmt.prompt(Q) == prompt  # the fallback markers equal the template


def test_trace_holds_the_ids_the_model_saw(real):
    name, tok, fmt_name, bos, _ending = real
    trace = Trace.from_segments(Q, T, S, tok, format=fmt_name)
    ids = trace.token_ids.tolist()
    prompt = _template_ids(tok)
    assert ids[:len(prompt)] == prompt
    fmt = get_format(fmt_name)
    completion = trace.text[len(fmt.chat_prompt(Q, tok)):]
    assert ids[len(prompt):] == tok(completion, add_special_tokens=False)["input_ids"]
    # exactly the template's BOS: one for R1 (Llama included), none for Qwen, QwQ, gpt-oss
    bos_id = tok.bos_token_id
    assert ids.count(bos_id) == (1 if bos else 0) if bos_id is not None else True
    if bos:
        assert ids[0] == bos_id and not trace.has_bos  # the text carries it
    # the same trace from the full text, and from the ids themselves
    again = Trace.from_text(trace.text, tok, format=fmt_name)
    assert again.token_ids.tolist() == ids
    from_ids = Trace.from_token_ids(ids, tok, format=fmt_name)
    assert from_ids.token_ids.tolist() == ids
    assert [s.token_span for s in from_ids.steps] == [s.token_span for s in trace.steps]
    for step in trace.steps:
        assert trace.decode_step(step.index) == step.text


def test_text_without_its_bos_gets_the_templates(real):
    name, tok, fmt_name, bos, _ending = real
    trace = Trace.from_segments(Q, T, S, tok, format=fmt_name)
    if not bos:
        pytest.skip(f"{name}'s template writes no BOS")
    stripped = Trace.from_text(trace.text[len(bos):], tok, format=fmt_name)
    assert stripped.has_bos and stripped.token_ids.tolist() == trace.token_ids.tolist()


def test_prompt_and_completion_are_tokenised_apart(real):
    """The model saw the template's prompt ids, then the ids it wrote: a completion that
    starts with a newline after a prompt ending with one is two tokens, where
    tokenising the whole text would merge them."""
    name, tok, fmt_name, _bos, _ending = real
    fmt = get_format(fmt_name)
    prompt = fmt.chat_prompt(Q, tok)
    completion = ("" if prompt.endswith(fmt.think_open) else fmt.think_open) + "\n" + T \
        + fmt.think_close + fmt.summary_open + S
    trace = Trace.from_text(prompt + completion, tok, format=fmt_name)
    expected = _template_ids(tok) + tok(completion, add_special_tokens=False)["input_ids"]
    assert trace.token_ids.tolist() == expected
    if prompt.endswith(fmt.think_open):  # "...<think>\n" + "\n..." would merge
        assert tok(prompt + completion, add_special_tokens=False)["input_ids"] != expected


def test_generated_ids_round_trip(name, real_models):
    model = real_models[name]
    prompt = info_of(model).format.chat_prompt(Q, model.tokenizer)
    ids = torch.tensor([prompt_ids(model, prompt)])
    out = model.generate(ids, max_new_tokens=24, do_sample=False, stop_at_eos=False,
                         verbose=False)
    completion = model.tokenizer.decode(out[0, ids.shape[1]:])
    fmt = info_of(model).format
    opener = "" if prompt.endswith(fmt.think_open) else fmt.think_open
    forced = torch.tensor([prompt_ids(model, prompt + opener)
                           + model.tokenizer("Some thinking here. " + completion,
                                             add_special_tokens=False)["input_ids"]])
    trace = Trace.from_token_ids(forced[0], model)
    assert trace.token_ids.tolist() == forced[0].tolist()


def test_a_format_whose_markers_the_tokenizer_splits_is_refused(real_checkpoints):
    with pytest.raises(StepSalError, match="not single tokens"):
        load_lrm(real_checkpoints["r1-distill-qwen"], device="cpu", format="gpt-oss")
    with pytest.raises(StepSalError, match="not single tokens"):
        load_lrm(real_checkpoints["gpt-oss"], device="cpu", format="qwen3")


def test_loaded_model_keeps_the_checkpoints_tokenizer(name, real_models):
    model = real_models[name]
    own = AutoTokenizer.from_pretrained(model.tokenizer.name_or_path)
    assert model.tokenizer.bos_token == own.bos_token
    assert model.tokenizer("Hi")["input_ids"] == own("Hi")["input_ids"]
    # to_tokens prepends BOS exactly where the tokenizer itself does (R1: yes; else no)
    assert model.to_tokens("Hi")[0].tolist() == own("Hi")["input_ids"]
