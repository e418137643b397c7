"""Trace: the paper's step splitter and exact token alignment."""

from __future__ import annotations

from stepsal_lens.segments.association import info_of
import pytest
import torch

from stepsal_lens import StepSalError, Trace, list_splitters, regex_splitter, register_splitter
from stepsal_lens.segments.splitters import paper_splitter

QUESTION = "Start with 7. Add 5, then halve it. What is the result?"


def pieces(text, segment="thinking"):
    return [text[a:b] for a, b in paper_splitter(text, segment)]


# ---- the paper's rule on plain text -------------------------------------------------------

def test_decimal_point_is_not_a_boundary():
    assert pieces("Half of 7 is 3.5 and that is fine. Then we add 5 to get 8.5 now.") == [
        "Half of 7 is 3.5 and that is fine.", "Then we add 5 to get 8.5 now."]


def test_short_and_digit_only_pieces_join_the_next_piece():
    text = "The first number is seven. Ok. 3. 5. The second number is five here."
    assert pieces(text) == ["The first number is seven.",
                            "Ok. 3. 5. The second number is five here."]
    # the last piece is a step whatever it is
    assert pieces("The first number is seven here. Ok.") == ["The first number is seven here.",
                                                              "Ok."]
    # a short piece before any real step joins the next one
    assert pieces("Hm. So the total is twelve apples.") == ["Hm. So the total is twelve apples."]
    # nothing long enough: the whole segment is one step
    assert pieces("Ok. 12.") == ["Ok. 12."]


def test_digit_only_piece_longer_than_15_characters_joins():
    text = "We compute the long product now. 1234. 5678. 9012. 3456. Then we are done with it."
    assert pieces(text) == ["We compute the long product now.",
                            "1234. 5678. 9012. 3456. Then we are done with it."]


@pytest.mark.parametrize("rule", ["| --- | :-: | ---: |", "|-------|--------|", "--- | ---"])
def test_markdown_table_rule_is_not_a_step(rule):
    out = pieces(f"We look at the table carefully. {rule}. Then we read the table row by row.")
    assert out == ["We look at the table carefully.", f"{rule}. Then we read the table row by row."]


def test_summary_splits_on_blank_lines_and_joins_short_paragraphs():
    text = "The result is 12.\n\nOk.\n\n  \n\nSo the answer is \\boxed{12}."
    assert pieces(text, "summary") == ["The result is 12.",
                                       "Ok.\n\n  \n\nSo the answer is \\boxed{12}."]
    assert pieces("One line\nsecond line of the same paragraph.", "summary") == [
        "One line\nsecond line of the same paragraph."]


def test_question_is_one_step():
    assert pieces(QUESTION, "question") == [QUESTION]


# ---- alignment on real tokenizers --------------------------------------------------------

THINKING = ("We start with 7 ≥ 5 and take ½ of it, which is 3.5 😀. "
            "Then 中文 数学 says add 5 to 3.5 to get 8.5. Ok. "
            "So the final number is 8.5 and we check it again.")
SUMMARY = "The result is 8.5 ≥ 8.\n\nSo the answer is \\boxed{8.5} 🙂."


def test_steps_are_disjoint_and_decode_to_their_text(arch, models):
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, models[arch])
    assert [s.segment for s in trace.steps] == ["question"] + ["thinking"] * 3 + ["summary"] * 2
    last = 0
    for step in trace.steps:
        a, b = step.token_span
        assert last <= a < b, f"{arch}: step {step.index} overlaps the previous one"
        last = b
        assert trace.decode_step(step.index) == step.text, f"{arch}: step {step.index}"
        assert (trace.step_of_token[a:b] == step.index).all()
    assert trace.steps[2].text == "Then 中文 数学 says add 5 to 3.5 to get 8.5."
    assert trace.steps[3].text.startswith("Ok. So the final number")


def test_token_ids_are_what_the_bridge_sees(arch, models):
    model = models[arch]
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, model)
    assert trace.token_ids.tolist() == model.to_tokens(trace.text)[0].tolist()
    assert trace.has_bos == model.cfg.default_prepend_bos
    if trace.has_bos:
        assert trace.step_of_token[0] == -1


def test_multibyte_characters_map_to_their_tokens(models):
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, models["qwen2"])
    for ch in ["≥", "½", "😀", "中", "🙂"]:
        pos = trace.text.index(ch)
        # the character's span goes to the token that completes it; tokens holding its
        # first bytes are empty there
        toks = [t for t, (s, e) in enumerate(trace.offsets) if s <= pos < e or s == e == pos]
        assert toks, f"no token covers {ch!r}"
        assert ch in trace.tokenizer.decode(trace.token_ids[toks[0]:toks[-1] + 1].tolist())
        owner = {int(trace.step_of_token[t]) for t in toks}
        expected = next(s.index for s in trace.steps if s.char_span[0] <= pos < s.char_span[1])
        assert owner == {expected}


def test_markers_belong_to_no_step(models):
    trace = Trace.from_segments(QUESTION, THINKING, SUMMARY, models["qwen3"])
    for marker in ["<think>", "</think>", "<|im_start|>", "<|im_end|>"]:
        mid = trace.tokenizer.convert_tokens_to_ids(marker)
        positions = (trace.token_ids == mid).nonzero().flatten()
        assert len(positions) and (trace.step_of_token[positions] == -1).all(), marker


def test_from_text_equals_from_segments(models):
    model = models["gpt-oss"]
    a = Trace.from_segments(QUESTION, THINKING, SUMMARY, model)
    b = Trace.from_text(a.text, model)
    assert torch.equal(a.token_ids, b.token_ids)
    assert [s.token_span for s in a.steps] == [s.token_span for s in b.steps]


def test_truncated_trace_has_no_summary(models):
    model = models["qwen2"]
    text = info_of(model).format.prompt(QUESTION) + THINKING
    trace = Trace.from_text(text, model)
    assert trace.truncated and trace.steps_in("summary") == []
    assert "truncated" in repr(trace)


def test_to_dataframe(models):
    df = Trace.from_segments(QUESTION, THINKING, SUMMARY, models["llama"]).to_dataframe()
    assert list(df.columns[:3]) == ["index", "segment", "text"]
    assert (df.token_end > df.token_start).all() and df.token_start.is_monotonic_increasing


# ---- other splitters ----------------------------------------------------------------------

def test_newline_and_regex_splitters(models):
    model = models["qwen2"]
    thinking = "First line here\nSecond line here\n\nThird"
    t = Trace.from_segments(QUESTION, thinking, "Done.", model, splitter="newline")
    assert [s.text for s in t.steps if s.segment == "thinking"] == [
        "First line here", "Second line here", "Third"]
    t = Trace.from_segments(QUESTION, "a; b; c", "Done.", model, splitter=regex_splitter(r";\s*"))
    assert [s.text for s in t.steps if s.segment == "thinking"] == ["a", "b", "c"]
    assert {"paper", "newline"} <= set(list_splitters())


def test_registered_and_caller_given_spans(models):
    model = models["qwen2"]
    register_splitter("words", regex_splitter(r"\s+"), overwrite=True)
    t = Trace.from_segments(QUESTION, "alpha beta", "Done.", model, splitter="words")
    assert [s.text for s in t.steps if s.segment == "thinking"] == ["alpha", "beta"]
    text = t.text
    spans = [(text.index("alpha"), text.index("alpha") + 5), (text.index("Done"), len("Done.") + text.index("Done"))]
    t2 = Trace.from_text(text, model, step_spans=spans)
    assert [(s.segment, s.text) for s in t2.steps] == [("thinking", "alpha"), ("summary", "Done.")]
    with pytest.raises(StepSalError, match="not inside one segment"):
        Trace.from_text(text, model, step_spans=[(0, len(text))])
    with pytest.raises(StepSalError, match="unknown step splitter 'sentences'"):
        Trace.from_segments(QUESTION, "alpha beta", "Done.", model, splitter="sentences")


# ---- bad input ----------------------------------------------------------------------------

def test_slow_tokenizer_is_refused(tmp_path):
    from transformers.models.bert import BertTokenizerLegacy

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "."]))
    slow = BertTokenizerLegacy(str(vocab))
    with pytest.raises(StepSalError, match="not a fast tokenizer.*use_fast=True"):
        Trace.from_segments("q", "hello.", "hello.", slow, format="think-tags")


def test_trace_longer_than_context(models):
    model = models["qwen2"]
    long_thinking = "We add one more to the total now. " * 200
    with pytest.raises(StepSalError, match=r"tokens but the model's context is 512"):
        Trace.from_segments(QUESTION, long_thinking, "Done.", model)


def test_missing_format_and_empty_thinking(tokenizer, models):
    with pytest.raises(StepSalError, match="no reasoning format"):
        Trace.from_segments(QUESTION, THINKING, SUMMARY, tokenizer)
    with pytest.raises(StepSalError, match="thinking segment is empty"):
        Trace.from_segments(QUESTION, " ", SUMMARY, models["qwen2"])
    with pytest.raises(StepSalError, match="not found"):
        Trace.from_text("no markers at all", models["qwen2"])
