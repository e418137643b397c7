"""Reasoning formats: render -> parse round trips, truncation, bad input."""

from __future__ import annotations

import pytest

from stepsal_lens import StepSalError, get_format, list_formats

Q = "Start with 7.\nAdd 5. What is the result?"
T = "We start with 7. Adding 5 gives 12."
S = "The result is 12.\n\nSo \\boxed{12}."


@pytest.mark.parametrize("name", ["deepseek-r1", "qwq", "qwen3", "gpt-oss", "think-tags"])
def test_round_trip(name):
    fmt = get_format(name)
    parsed = fmt.parse(fmt.render(Q, T, S))
    assert (parsed.question, parsed.thinking, parsed.summary, parsed.truncated) == (Q, T, S, False)


@pytest.mark.parametrize("name", ["deepseek-r1", "qwq", "gpt-oss", "think-tags"])
def test_prompt_is_a_prefix_of_the_rendered_trace(name):
    fmt = get_format(name)
    assert fmt.render(Q, T, S).startswith(fmt.prompt(Q))


def test_qwen3_prompt_leaves_think_tag_to_the_model():
    fmt = get_format("qwen3")
    assert fmt.prompt(Q).endswith("<|im_start|>assistant\n")
    assert fmt.parse(fmt.prompt(Q) + "<think>" + T + "</think>" + S).thinking == T


@pytest.mark.parametrize("name", ["deepseek-r1", "qwq", "gpt-oss", "think-tags"])
def test_truncated_trace_is_all_thinking_and_reported(name):
    fmt = get_format(name)
    opener = "" if fmt.prompt_opens_thinking else fmt.think_open  # gpt-oss: the model's
    parsed = fmt.parse(fmt.prompt(Q) + opener + T + " And then")
    assert parsed.truncated
    assert parsed.thinking == T + " And then"
    assert parsed.summary == ""


def test_eos_marker_ends_the_summary():
    fmt = get_format("qwq")
    text = fmt.render(Q, T, S) + "<|im_start|>user\nnext turn"
    assert fmt.parse(text).summary == S


def test_gpt_oss_summary_is_the_final_channel():
    fmt = get_format("gpt-oss")
    text = fmt.render(Q, T, S)
    assert "<|channel|>final<|message|>" + S + "<|return|>" in text
    assert fmt.parse(text).summary == S


def test_unknown_format_lists_the_options():
    with pytest.raises(StepSalError, match=r"unknown reasoning format 'r1'.*deepseek-r1"):
        get_format("r1")
    assert set(list_formats()) >= {"deepseek-r1", "qwq", "qwen3", "gpt-oss", "think-tags"}


def test_missing_markers():
    with pytest.raises(StepSalError, match="not found"):
        get_format("qwq").parse("just some text without any markers")
    with pytest.raises(StepSalError, match=r"'<think>' \(thinking\) not found"):
        get_format("qwq").parse("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nno think")


@pytest.mark.parametrize("thinking", ["", "   \n "])
def test_empty_thinking(thinking):
    fmt = get_format("deepseek-r1")
    with pytest.raises(StepSalError, match="thinking segment is empty"):
        fmt.render(Q, thinking, S)
    with pytest.raises(StepSalError, match="thinking segment is empty"):
        fmt.parse(fmt.prompt(Q) + thinking + "</think>" + S)
