"""A trace is bound to the tokenizer that cut it: it records the tokenizer's fingerprint,
keeps it through its JSON form, and every function that runs a model on it refuses a
model whose tokenizer differs (a trace without a fingerprint is accepted)."""

from __future__ import annotations

import json

import pytest

from stepsal_lens import StepSalError, StepSaliency, Trace, load_lrm, step_saliency
from stepsal_lens.lens.causal import step_effects
from stepsal_lens.lens.saliency import token_saliency
from stepsal_lens.fingerprint import tokenizer_fingerprint
from stepsal_lens.zoo.tiny_random import make_random_checkpoint, train_tokenizer

REFUSED = (r"the trace was cut with tokenizer sha256:[0-9a-f]{16} \(made with 'tiny-lrm'\), but "
           r"the model '.*' has tokenizer sha256:[0-9a-f]{16}: the trace's token ids would "
           r"mean other text to it; re-cut the trace for this model with "
           r"Trace.from_text\(trace.text, model\)")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random Llama checkpoint with its own (larger) tokenizer: every id of a tiny-lrm
    trace is inside its vocabulary, so only the fingerprint tells them apart."""
    return load_lrm(make_random_checkpoint("llama", tmp_path_factory.mktemp("llama")),
                    format="think-tags")


@pytest.fixture(scope="module")
def trace(tiny_lrm):
    return Trace.from_segments("Start with 7. Add 5. What is the result?",
                               "We start with 7. Adding 5 to 7 gives 12.",
                               "The result is \\boxed{12}.", tiny_lrm)


def test_fingerprint_is_stable_and_tells_tokenizers_apart(tiny_lrm, llama):
    a, b = train_tokenizer(), train_tokenizer()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) == tokenizer_fingerprint(a)
    assert tokenizer_fingerprint(tiny_lrm) != tokenizer_fingerprint(llama)
    c = train_tokenizer()
    c("some text", truncation=True, max_length=2)  # settings a call leaves behind do not count
    assert '"truncation":{' in c.backend_tokenizer.to_str()
    assert tokenizer_fingerprint(c) == tokenizer_fingerprint(a)
    b.add_tokens(["<new-token>"])  # a changed vocabulary is a new fingerprint
    assert tokenizer_fingerprint(b) != tokenizer_fingerprint(a)


def test_other_tokenizer_is_refused(trace, llama):
    assert trace.model_name == "tiny-lrm"
    assert trace.tokenizer_fingerprint == tokenizer_fingerprint(trace.tokenizer)
    assert int(trace.token_ids.max()) < llama.cfg.d_vocab  # the vocabulary check alone passes
    for run in (lambda: step_saliency(llama, trace), lambda: step_effects(llama, trace),
                lambda: token_saliency(llama, trace, 0)):
        with pytest.raises(StepSalError, match=REFUSED):
            run()


def test_same_tokenizer_is_accepted(trace, tiny_lrm):
    again = load_lrm("tiny-lrm")  # another object, the same tokenizer
    sal = step_saliency(again, trace)
    assert sal.meta["tokenizer"] == trace.tokenizer_fingerprint
    assert step_saliency(tiny_lrm, trace).maps.shape == sal.maps.shape


def test_json_round_trip_keeps_the_fingerprint(trace, tiny_lrm, llama, tmp_path):
    doc = json.loads(json.dumps(trace.to_dict()))
    assert doc["tokenizer"] == trace.tokenizer_fingerprint and doc["model"] == "tiny-lrm"
    back = Trace.from_dict(doc, tiny_lrm)
    assert back.steps == trace.steps and back.token_ids.tolist() == trace.token_ids.tolist()
    assert back.tokenizer_fingerprint == trace.tokenizer_fingerprint
    assert back.to_dict() == doc
    with pytest.raises(StepSalError, match=REFUSED):
        Trace.from_dict(doc, llama)
    # a saved result keeps it too
    sal = StepSaliency.load(step_saliency(tiny_lrm, back).save(tmp_path / "sal"))
    assert sal.meta["tokenizer"] == trace.tokenizer_fingerprint


def test_trace_without_fingerprint_is_accepted(trace, tiny_lrm, llama):
    doc = trace.to_dict()
    doc.pop("tokenizer")
    old = Trace.from_dict(doc, tiny_lrm)
    assert old.tokenizer_fingerprint is None
    old.check_tokenizer(llama)  # nothing to compare: accepted (the vocabulary check remains)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(token_ids=[-1, *d["token_ids"][1:]]), r"token_ids\[0\] is -1, must be in"),
    (lambda d: d.update(token_ids=[True, *d["token_ids"][1:]]),
     r"token_ids\[0\] is True, must be an integer \(got bool\)"),
    (lambda d: d["steps"][1].update(segment="<img src=x>"),
     r"steps\[1\]\.segment is '<img src=x>', must be one of"),
    (lambda d: d["steps"][1].update(token_end=d["steps"][1]["token_end"] + 1),
     r"steps is .*, but the text cuts into"),
    (lambda d: d.update(offsets=d["offsets"][:-1]), r"offsets holds \d+ spans but token_ids \d+ ids"),
    (lambda d: d.update(tokenizer=5), r"tokenizer is 5, must be a fingerprint string or null"),
    (lambda d: d.pop("text"), r"'t\.json' lacks \['text'\] \(it has \['format',"),
], ids=["negative-id", "bool-id", "unknown-segment", "steps-differ", "offsets-count",
        "fingerprint-type", "missing-text"])
def test_hostile_trace_document(trace, tiny_lrm, edit, message):
    doc = json.loads(json.dumps(trace.to_dict()))
    edit(doc)
    with pytest.raises(StepSalError, match=message):
        Trace.from_dict(doc, tiny_lrm, where="'t.json'")


def test_explorer_drill_down_refuses_another_model(trace, tiny_lrm, llama):
    from stepsal_lens.apps.widgets import explore

    sal = step_saliency(tiny_lrm, trace)
    with pytest.raises(StepSalError, match=REFUSED):
        explore(sal, model=llama, trace=trace)
    other = Trace.from_segments("Start with 2. Add 3. What is the result?",
                                "We start with 2. Adding 3 to 2 gives 5.",
                                "The result is \\boxed{5}.", tiny_lrm)
    with pytest.raises(StepSalError, match=r"pass the trace the result was computed on"):
        explore(sal, model=tiny_lrm, trace=other)


def test_replay_refuses_another_tokenizer(trace, tiny_lrm, llama):
    from stepsal_lens.lens.saliency import replay

    sal = step_saliency(tiny_lrm, trace)
    with pytest.raises(StepSalError, match=r"this result was computed with tokenizer sha256:"
                       r"[0-9a-f]{16} \(model 'tiny-lrm'\), but the model '.*' has tokenizer "
                       r"sha256:[0-9a-f]{16}; replay it with the model it was computed with"):
        replay(sal, llama, token_saliency, trace, 0)


def test_pickled_trace_keeps_its_binding(trace, tiny_lrm, llama):
    """A trace sent to another process (e.g. a Ray worker) keeps its fingerprint."""
    import pickle

    copy = pickle.loads(pickle.dumps(trace))
    assert copy.tokenizer_fingerprint == trace.tokenizer_fingerprint
    copy.check_tokenizer(tiny_lrm)
    with pytest.raises(StepSalError, match=REFUSED):
        copy.check_tokenizer(llama)
