"""One step rule: the offline Trace and StepFlow's online tracker cut the same steps,
for every format and splitter, on texts with short pieces, decimals, lists, tables and
CJK; and SMI fires exactly at the Trace's thinking-step starts (from the second on)."""

from __future__ import annotations

import pytest
import torch

from stepsal_lens import StepFlowConfig, Trace, get_format, regex_splitter, stepflow
from stepsal_lens.lens.generation import prompt_ids
from stepsal_lens.segments.association import info_of
from stepsal_lens.segments.tracker import SegmentTracker
from stepsal_lens.segments.splitters import register_splitter

THINKINGS = [
    # short pieces, a decimal, a list, an abbreviation-like piece
    "We start with 7. Ok. Then 3.5 plus 2.25 gives 5.75 here. So 12. Twelve is right.",
    # numbered list whose numbers are digit-only pieces
    "Steps to do now:\n1. Add the two numbers first. 2. Multiply the sum by three. "
    "3. Check the final product carefully.",
    # a markdown table with its rule, then prose
    "| a | b |\n| --- | --- |\n| 1 | 2 |. The table lists both values clearly. Done.",
    # CJK and emoji inside sentences, a short trailing piece
    "数学 is fun to practice daily. 答案 should be 42 以上 I think. 中文 text 😀 here. Yes.",
    # many short pieces in a row, then a long one, and a newline-separated tail
    "A. B. C. D. Now a long enough sentence arrives.\nAnother line follows here.\n\nEnd.",
]
SUMMARY = "The result is 24.\n\nOk.\n\nSo the answer is \\boxed{24} after checking twice."

register_splitter("test-semicolons", regex_splitter(r";\s*|\.\s+", keep_separator=True),
                  overwrite=True)
SPLITTERS = ["paper", "newline", "test-semicolons"]
FORMATS = ["deepseek-r1", "qwq", "qwen3", "think-tags"]


def _feed(tokenizer, fmt, ids, n_prompt, splitter):
    tracker = SegmentTracker(tokenizer, fmt, splitter)
    tracker.reset(torch.tensor([ids[:n_prompt]]))
    for t in ids[n_prompt:]:
        tracker.extend(torch.tensor([[t]]))
    return tracker


@pytest.mark.parametrize("splitter", SPLITTERS)
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("thinking", THINKINGS)
def test_online_steps_are_the_traces(tokenizer, name, thinking, splitter):
    fmt = get_format(name)
    text = fmt.render("Start with 7. What is the result?", thinking, SUMMARY)
    trace = Trace.from_text(text, tokenizer, format=fmt, splitter=splitter)
    ids = trace.token_ids.tolist()
    n_prompt = len(tokenizer(fmt.prompt("Start with 7. What is the result?"),
                             add_special_tokens=False)["input_ids"])
    tracker = _feed(tokenizer, fmt, ids, n_prompt, splitter)
    starts = torch.nonzero(tracker.step_start[0]).flatten().tolist()
    assert starts == [s.token_span[0] for s in trace.steps]
    assert tracker.step[0].tolist() == trace.step_of_token.tolist()


@pytest.mark.parametrize("thinking", THINKINGS[:3])
def test_smi_fires_exactly_at_the_traces_thinking_step_starts(models, thinking):
    model = models["qwen2"]
    fmt = info_of(model).format
    trace = Trace.from_segments("Start with 7. What is the result?", thinking, SUMMARY, model)
    ids = trace.token_ids[None]
    last = model.cfg.n_layers - 1
    seen = {}

    def before(x, hook):
        seen["before"] = x.detach().clone()

    def after(x, hook):
        seen["after"] = x.detach().clone()

    name = f"blocks.{last}.hook_resid_post"
    with model.hooks(fwd_hooks=[(name, before)]):
        with stepflow(model, StepFlowConfig(tau_max=0.0, alpha=1.0, smi_layers=[last])):
            with model.hooks(fwd_hooks=[(name, after)]):
                model(ids)
    changed = ((seen["after"] - seen["before"]).abs().amax(-1)[0] > 0).nonzero().flatten()
    thinking_starts = [trace.steps[i].token_span[0] for i in trace.steps_in("thinking")]
    assert changed.tolist() == thinking_starts[1:]
    assert fmt.name == "deepseek-r1"
