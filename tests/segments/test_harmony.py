"""gpt-oss / harmony on the real o200k_harmony tokenizer, checked against openai-harmony.

Needs the real gpt-oss tokenizer folder (``python -m stepsal_lens.zoo.real_tokenizers``,
found through ``$STEPSAL_TOKENIZERS``); without it these tests skip, unless
``STEPSAL_REQUIRE_REAL_TOKENIZERS=1``, which makes a missing folder a failure.
"""

from __future__ import annotations

import datetime
import os
import shutil

import pytest
import torch

from stepsal_lens import SegmentTracker, StepSalError, Trace, get_format
from stepsal_lens.segments.harmony import harmony_encoding, harmony_messages
from stepsal_lens.segments.tracker import SEGMENT_CODES
from stepsal_lens.segments.splitters import paper_splitter

H = pytest.importorskip("openai_harmony")

DATE = "2025-08-05"
Q = "A shop sells pencils at 3 dollars each. How much do 7 pencils cost?"
T1 = "We need the cost of 7 pencils at 3 dollars each. Seven times three is twenty one."
T2 = "Let me double check the product. Three plus three plus three, seven times, gives 21."
S = "Seven pencils cost 21 dollars.\n\nThe answer is \\boxed{21}."


@pytest.fixture(scope="module")
def folder():
    from stepsal_lens.zoo.real_tokenizers import real_tokenizer_dir

    try:
        path = real_tokenizer_dir("gpt-oss")
        if not (path / "o200k_base.tiktoken").is_file():
            raise StepSalError(f"no o200k_base.tiktoken in {path}")
    except StepSalError as err:
        if os.environ.get("STEPSAL_REQUIRE_REAL_TOKENIZERS") == "1":
            pytest.fail(f"STEPSAL_REQUIRE_REAL_TOKENIZERS=1 but {err}")
        pytest.skip(f"{err} (set STEPSAL_TOKENIZERS=DIR to use a built one)")
    return path


@pytest.fixture(scope="module")
def tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def enc(folder):
    return harmony_encoding(folder)


@pytest.fixture(scope="module")
def fmt():
    return get_format("gpt-oss").with_options(current_date=DATE)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _harmony_prompt(enc, question, *, effort="medium", date=DATE, instructions=None,
                    identity=None):
    system = H.SystemContent.new().with_reasoning_effort(H.ReasoningEffort(effort.title()))
    if date is not None:
        system = system.with_conversation_start_date(date)
    if identity is not None:
        system = system.with_model_identity(identity)
    msgs = [H.Message.from_role_and_content(H.Role.SYSTEM, system)]
    if instructions is not None:
        dev = H.DeveloperContent.new().with_instructions(instructions)
        msgs.append(H.Message.from_role_and_content(H.Role.DEVELOPER, dev))
    msgs.append(H.Message.from_role_and_content(H.Role.USER, question))
    return enc.render_conversation_for_completion(H.Conversation.from_messages(msgs),
                                                  H.Role.ASSISTANT)


# ---- without the real tokenizer (the toy tokenizer of the other tests) --------------------

TOOL_TRACE = ("<|channel|>analysis<|message|>" + T1 + "<|end|>"
              "<|start|>assistant<|channel|>commentary to=functions.get_price <|constrain|>json"
              '<|message|>{"item": "pencil"}<|call|>'
              "<|start|>functions.get_price to=assistant<|channel|>commentary<|message|>"
              '{"price": 3}<|end|>'
              "<|start|>assistant<|channel|>analysis<|message|> " + T2 + "\n<|end|>"
              "<|start|>assistant<|channel|>final<|message|>" + S + "<|return|>")


def _toy_steps(tokenizer, fmt, text):
    trace = Trace.from_text(text, tokenizer, format=fmt)
    return trace, [(s.segment, s.text) for s in trace.steps]


def test_toy_several_analysis_messages_and_a_tool_call(tokenizer, fmt):
    text = fmt.prompt(Q) + TOOL_TRACE
    parsed = fmt.parse(text)
    assert [text[a:b] for a, b in parsed.thinking_spans] == [T1, T2]
    assert parsed.thinking == T1 + "\n\n" + T2 and parsed.summary == S
    assert not parsed.truncated and parsed.thinking_span == (parsed.thinking_spans[0][0],
                                                             parsed.thinking_spans[1][1])
    trace, steps = _toy_steps(tokenizer, fmt, text)
    expected = [("thinking", t[a:b]) for t in (T1, T2) for a, b in paper_splitter(t, "thinking")]
    expected += [("summary", S[a:b]) for a, b in paper_splitter(S, "summary")]
    assert steps == [("question", Q)] + expected
    # the streaming tracker: token by token = the whole text = the Trace
    ids = trace.token_ids.tolist()
    n_prompt = len(_ids(tokenizer, fmt.prompt(Q)))
    tracker = SegmentTracker(tokenizer, fmt)
    tracker.reset(torch.tensor([ids[:n_prompt]]))
    for t in ids[n_prompt:]:
        tracker.extend(torch.tensor([[t]]))
    whole = SegmentTracker(tokenizer, fmt)
    whole.reset(torch.tensor([ids]))
    for key in ("segment", "step", "step_start", "anchored"):
        assert torch.equal(getattr(whole, key), getattr(tracker, key)), key
    assert tracker.step[0].tolist() == trace.step_of_token.tolist()
    # the tool call and its result: in the text, in no segment
    a = text.index('{"item"')
    b = text.index("<|start|>assistant<|channel|>analysis", a)
    inside = [t for t, (s, e) in enumerate(trace.offsets) if a <= s < b]
    assert inside and (tracker.segment[0, inside] == -1).all()


def test_toy_final_only_and_truncated(tokenizer, fmt):
    final_only = fmt.prompt(Q) + "<|channel|>final<|message|>" + S + "<|return|>"
    parsed = fmt.parse(final_only)
    assert parsed.thinking == "" and parsed.thinking_spans == () and parsed.summary == S
    trace, steps = _toy_steps(tokenizer, fmt, final_only)
    assert trace.steps_in("thinking") == [] and steps[0] == ("question", Q)
    assert not trace.truncated and steps[1:] == [("summary", S[a:b])
                                                 for a, b in paper_splitter(S, "summary")]
    cut = fmt.prompt(Q) + TOOL_TRACE[:TOOL_TRACE.index("<|start|>assistant<|channel|>final")]
    parsed = fmt.parse(cut)
    assert parsed.truncated and parsed.summary == "" and len(parsed.thinking_spans) == 2
    to_tool = fmt.prompt(Q) + TOOL_TRACE[:TOOL_TRACE.index("<|call|>") + 8]
    assert not fmt.parse(to_tool).truncated  # stopped at a tool call: waits, not cut off


def test_toy_errors_and_the_question(fmt):
    with pytest.raises(StepSalError, match="no user message"):
        fmt.parse("<|start|>assistant<|channel|>final<|message|>4<|return|>")
    with pytest.raises(StepSalError, match="no assistant message after the question"):
        fmt.parse(fmt.prompt(Q))
    # earlier turns and a turn after the answer: the question is the one answered
    earlier = ("<|start|>user<|message|>Hi there<|end|><|start|>assistant<|channel|>final"
               "<|message|>Hello!<|end|>")
    prompt = fmt.prompt(Q).replace("<|start|>user", earlier + "<|start|>user")
    text = prompt + "<|channel|>final<|message|>21<|return|>"
    assert (fmt.parse(text).question, fmt.parse(text).summary) == (Q, "21")
    later = text + "<|start|>user<|message|>And 8 pencils?<|end|>"
    assert (fmt.parse(later).question, fmt.parse(later).summary) == (Q, "21")
    regions = fmt.regions(prompt)
    assert prompt[slice(*regions["question"])] == Q


# ---- the prompt --------------------------------------------------------------------------

@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_prompt_equals_chat_template_and_openai_harmony(tok, enc, fmt, effort):
    harmony = _harmony_prompt(enc, Q, effort=effort)
    from_template = _ids(tok, fmt.chat_prompt(Q, tok, reasoning_effort=effort))
    built_in = _ids(tok, fmt.prompt(Q, reasoning_effort=effort))  # no chat template needed
    variant = _ids(tok, fmt.with_options(reasoning_effort=effort).chat_prompt(Q, tok))
    assert from_template == built_in == variant == harmony
    text = tok.decode(harmony)
    assert f"Reasoning: {effort}\n" in text and f"Current date: {DATE}\n" in text
    # No BOS, no forced channel: the model writes <|channel|>analysis<|message|> itself.
    start = tok.convert_tokens_to_ids("<|start|>")
    assert harmony[0] == start and tok.bos_token_id not in harmony
    assert text.endswith("<|end|><|start|>assistant")


def test_the_official_template_writes_todays_date(tok, enc, fmt):
    for _ in range(2):  # once more if midnight passes in between
        today = datetime.date.today().strftime("%Y-%m-%d")
        raw = tok.apply_chat_template([{"role": "user", "content": Q}],
                                      add_generation_prompt=True, tokenize=False)
        ours = get_format("gpt-oss").chat_prompt(Q, tok)
        built_in = get_format("gpt-oss").prompt(Q)
        if datetime.date.today().strftime("%Y-%m-%d") == today:
            break
    assert _ids(tok, raw) == _ids(tok, ours) == _ids(tok, built_in) == _harmony_prompt(
        enc, Q, date=today)
    assert _harmony_prompt(enc, Q, date=None) != _ids(tok, raw)  # harmony: no date line


def test_developer_message_and_model_identity(tok, enc, fmt):
    note = "Answer in one short sentence."
    identity = "You are a careful math tutor."
    raw = tok.apply_chat_template([{"role": "system", "content": note},
                                   {"role": "user", "content": Q}],
                                  add_generation_prompt=True, tokenize=False)
    ours = fmt.chat_prompt(Q, tok, system=note, model_identity=identity)
    assert ours == fmt.prompt(Q, system=note, model_identity=identity)
    assert _ids(tok, ours) == _harmony_prompt(enc, Q, instructions=note + "\n\n",
                                              identity=identity)
    assert ours.replace(identity, "You are ChatGPT, a large language model trained by "
                        "OpenAI.").replace(DATE, raw.split("Current date: ")[1][:10]) == raw
    # The one difference between the official template and openai-harmony: the template
    # ends the developer instructions with a blank line, harmony does not.
    plain = tok.decode(_harmony_prompt(enc, Q, instructions=note))
    assert f"# Instructions\n\n{note}<|end|>" in plain
    assert f"# Instructions\n\n{note}\n\n<|end|>" in ours


def test_prompt_options_are_checked(tok, fmt):
    with pytest.raises(StepSalError, match="reasoning_effort 'extreme'"):
        fmt.chat_prompt(Q, tok, reasoning_effort="extreme")
    with pytest.raises(StepSalError, match="YYYY-MM-DD"):
        fmt.with_options(current_date="5 Aug 2025")
    with pytest.raises(StepSalError, match="unknown gpt-oss prompt option"):
        fmt.with_options(effort="high")
    with pytest.raises(StepSalError, match="no reasoning effort.*gpt-oss"):
        get_format("qwq").chat_prompt(Q, reasoning_effort="high")


# ---- completions rendered by openai-harmony -----------------------------------------------

def _analysis(text):
    return H.Message.from_role_and_content(H.Role.ASSISTANT, text).with_channel("analysis")


def _final(text):
    return H.Message.from_role_and_content(H.Role.ASSISTANT, text).with_channel("final")


def _call(args):
    return (H.Message.from_role_and_content(H.Role.ASSISTANT, args).with_channel("commentary")
            .with_recipient("functions.get_price").with_content_type("<|constrain|>json"))


def _tool_result(text):
    author = H.Author.new(H.Role.TOOL, "functions.get_price")
    return (H.Message.from_author_and_content(author, text).with_channel("commentary")
            .with_recipient("assistant"))


def _completion(enc, messages, cut=None):
    """Completion ids as the model writes them after the prompt's <|start|>assistant:
    each message rendered by openai-harmony, the final one closed by <|return|>."""
    ids = []
    for m in messages:
        part = enc.render(m)
        if m.channel == "final":
            assert part[-1] == enc.encode("<|end|>", allowed_special="all")[0]
            part = part[:-1] + enc.encode("<|return|>", allowed_special="all")
        ids += part
    head = enc.encode("<|start|>assistant", allowed_special="all")
    assert ids[:len(head)] == head
    ids = ids[len(head):]
    return ids if cut is None else ids[:cut]


def _python_call(code):
    return (H.Message.from_role_and_content(H.Role.ASSISTANT, code).with_channel("analysis")
            .with_recipient("python"))


def _python_result(text):
    author = H.Author.new(H.Role.TOOL, "python")
    return (H.Message.from_author_and_content(author, text).with_channel("analysis")
            .with_recipient("assistant"))


CASES = {
    "two analysis messages": [_analysis(T1), _analysis(T2), _final(S)],
    "final only": [_final(S)],
    "tool call then final": [_analysis(T1), _call('{"item": "pencil"}'),
                             _tool_result('{"price": 3}'), _analysis(T2), _final(S)],
    "stops at a tool call": [_analysis(T1), _call('{"item": "pencil"}')],
    # a built-in tool's call goes to the analysis channel: a tool call all the same
    "python in the analysis channel": [_analysis(T1), _python_call("print(7 * 3)"),
                                       _python_result("21"), _analysis(T2), _final(S)],
    # the header as gpt-oss writes it: the recipient after the channel
    "tool call written by the model": (
        f"<|channel|>analysis<|message|>{T1}<|end|><|start|>assistant<|channel|>commentary "
        f'to=functions.get_price <|constrain|>json<|message|>{{"item": "pencil"}}<|call|>'),
    "truncated": [_analysis(T1), _analysis(T2)],
}


def _case(enc, fmt, tok, name):
    prompt = _ids(tok, fmt.prompt(Q))
    if isinstance(CASES[name], str):
        return prompt, _ids(tok, CASES[name])
    cut = -6 if name == "truncated" else None  # ends inside the second analysis message
    return prompt, _completion(enc, CASES[name], cut)


def _role(m):
    return m.author.name if m.author.role == H.Role.TOOL else m.author.role.value


@pytest.mark.parametrize("name", list(CASES))
def test_messages_and_segments_equal_openai_harmony(tok, enc, fmt, name):
    prompt, completion = _case(enc, fmt, tok, name)
    text = tok.decode(prompt + completion)
    assert _ids(tok, text) == prompt + completion  # the HF tokenizer = harmony's encoder
    theirs = enc.parse_messages_from_completion_tokens(completion, H.Role.ASSISTANT)
    ours = harmony_messages(text)[-len(theirs):]
    assert [(m.role, m.channel, m.recipient, text[slice(*m.content)]) for m in ours] == [
        (_role(m), m.channel, m.recipient, m.content[0].text) for m in theirs]

    parsed = fmt.parse(text)
    assert parsed.question == Q
    thinking = [m.content[0].text for m in theirs
                if m.author.role == H.Role.ASSISTANT and m.channel == "analysis"
                and m.recipient is None]
    assert [text[a:b] for a, b in parsed.thinking_spans] == thinking
    finals = [m.content[0].text for m in theirs if m.channel == "final"]
    assert parsed.summary == (finals[0] if finals else "")
    assert parsed.truncated == (name == "truncated")
    for tool_text in ('"item"', "print(", '"price"'):  # calls and results: no segment
        assert tool_text not in parsed.thinking + parsed.summary


def _step_texts(messages):
    """The paper's steps of each analysis message, then of the final one."""
    out = []
    for m in messages:
        body = m.content[0].text
        if (m.author.role == H.Role.ASSISTANT and m.channel in ("analysis", "final")
                and m.recipient is None):
            seg = "thinking" if m.channel == "analysis" else "summary"
            out += [(seg, body[a:b]) for a, b in paper_splitter(body, seg)]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_trace_steps_cover_each_message_and_no_marker(tok, enc, fmt, name):
    prompt, completion = _case(enc, fmt, tok, name)
    ids = prompt + completion
    trace = Trace.from_token_ids(ids, tok, format=fmt)
    assert trace.token_ids.tolist() == ids  # the ids are kept exactly
    messages = enc.parse_messages_from_completion_tokens(completion, H.Role.ASSISTANT)
    got = [(s.segment, s.text) for s in trace.steps[1:]]
    assert trace.steps[0].text == Q and got == _step_texts(messages)
    for step in trace.steps:
        assert trace.decode_step(step.index) == step.text
    # no template marker, header, tool call or tool result token is in a step
    specials = torch.tensor([i >= 199998 for i in ids])
    assert (trace.step_of_token[specials] == -1).all()
    for m in harmony_messages(trace.text):
        said = m.role == "assistant" and m.channel in ("analysis", "final") and not m.recipient
        if m.content is not None and m.role != "user" and not said:  # system, tools
            a, b = m.content
            inside = [t for t, (s, e) in enumerate(trace.offsets) if a <= s < b]
            assert inside and (trace.step_of_token[inside] == -1).all(), m
    # each analysis message starts a new step at its first character
    starts = {s.char_span[0] for s in trace.steps}
    assert {a for a, _ in trace.parsed.thinking_spans} <= starts
    if name == "final only":
        assert trace.steps_in("thinking") == [] and not trace.truncated
        assert "0 thinking" in repr(trace)
    if name in ("truncated", "stops at a tool call"):
        assert trace.steps_in("summary") == []
    # the same text re-tokenised gives the same trace
    again = Trace.from_text(trace.text, tok, format=fmt)
    assert again.token_ids.tolist() == ids
    assert [s.token_span for s in again.steps] == [s.token_span for s in trace.steps]


def test_from_segments_renders_as_openai_harmony(tok, enc, fmt):
    trace = Trace.from_segments(Q, T1, S, tok, format=fmt)
    expected = _ids(tok, fmt.prompt(Q)) + _completion(enc, [_analysis(T1), _final(S)])
    assert trace.token_ids.tolist() == expected
    assert (trace.question, trace.thinking, trace.summary) == (Q, T1, S)


@pytest.mark.parametrize("name", list(CASES))
def test_tracker_one_token_at_a_time_equals_the_whole(tok, enc, fmt, name):
    prompt, completion = _case(enc, fmt, tok, name)
    ids = prompt + completion
    tracker = SegmentTracker(tok, fmt)
    tracker.reset(torch.tensor([prompt]))
    for t in completion:
        tracker.extend(torch.tensor([[t]]))
    whole = SegmentTracker(tok, fmt)
    whole.reset(torch.tensor([ids]))
    for key in ("segment", "step", "step_start", "anchored"):
        assert torch.equal(getattr(whole, key), getattr(tracker, key)), key
    # every sentence here is a step offline too, so the labels equal the Trace's
    trace = Trace.from_token_ids(ids, tok, format=fmt)
    assert tracker.step[0].tolist() == trace.step_of_token.tolist()
    assert torch.nonzero(tracker.step_start[0]).flatten().tolist() == [
        s.token_span[0] for s in trace.steps]
    segment = tracker.segment[0]
    for s in trace.steps:
        a, b = s.token_span
        assert set(segment[a:b].tolist()) == {SEGMENT_CODES[s.segment]}
    if name == "two analysis messages":
        # the markers between the two analysis messages are in no segment
        spans = trace.parsed.thinking_spans
        between = [t for t, (s, e) in enumerate(trace.offsets)
                   if spans[0][1] <= s < spans[1][0] and e > s]
        assert len(between) >= 5 and (segment[between] == -1).all()


# ---- stopping and loading ------------------------------------------------------------------

def test_stop_ids_are_return_and_call(tok, fmt):
    from stepsal_lens import attach
    from stepsal_lens.lens.generation import stop_ids

    class Bare:  # stop_ids needs only a tokenizer and the attached format
        tokenizer = tok

    model = Bare()
    attach(model, fmt)
    stops = stop_ids(model)
    assert set(stops) == set(tok.convert_tokens_to_ids(["<|return|>", "<|call|>"]))
    assert tok.convert_tokens_to_ids("<|end|>") not in stops


def test_generation_prompt_on_a_random_gpt_oss_model(folder, tok, enc, tmp_path):
    from stepsal_lens import load_lrm
    from stepsal_lens.lens.generation import generate, stop_ids
    from stepsal_lens.zoo.tiny_random import make_random_checkpoint

    path = make_random_checkpoint("gpt-oss", tmp_path / "oss", tokenizer=folder, n_layers=1)
    model = load_lrm(path, device="cpu", format=get_format("gpt-oss").with_options(
        current_date=DATE))
    [g] = generate(model, [Q], reasoning_effort="high", max_new_tokens=3, progress=False)
    assert g.token_ids[:g.prompt_len] == _harmony_prompt(enc, Q, effort="high")
    assert g.finished == (g.completion_ids[-1] in stop_ids(model))


def test_harmony_encoding_restores_the_environment(folder, tmp_path, monkeypatch):
    for i, before in enumerate([None, "/somewhere/else"]):
        copy = tmp_path / f"vocab{i}"  # a new folder: not the cached encoding
        copy.mkdir()
        shutil.copy(folder / "o200k_base.tiktoken", copy)
        if before is None:
            monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
        else:
            monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", before)
        enc = harmony_encoding(copy)
        assert os.environ.get("TIKTOKEN_ENCODINGS_BASE") == before
        assert sorted(enc.stop_tokens_for_assistant_actions()) == [200002, 200012]
    with pytest.raises(StepSalError, match="python -m stepsal_lens.zoo.real_tokenizers"):
        harmony_encoding(tmp_path / "empty")
