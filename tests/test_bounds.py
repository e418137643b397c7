"""Inputs bounded before work, arguments type-checked (issue 20): each bad input gives one
StepSalError that names it and the fix, quickly, or a correct result."""

from __future__ import annotations

import inspect
import json
import math
import time

import pytest

from stepsal_lens import StepFlowConfig, StepSalError, Trace
from stepsal_lens.apps.cli import main


def unchecked(fn):
    """``fn`` without the jaxtyping/beartype wrapper the tests put on the package, so that
    the library's own boundary check (what users see: beartype does not run for them) is
    what runs. A context manager comes back as a function that enters it."""
    inner = inspect.unwrap(getattr(fn, "__func__", fn))
    if inspect.isgeneratorfunction(inner):
        return lambda *a, **k: next(inner(*a, **k))
    return inner


def config(**kwargs):
    """``StepFlowConfig(**kwargs)`` without beartype's check of the field annotations."""
    cfg = object.__new__(StepFlowConfig)
    inspect.unwrap(StepFlowConfig.__init__)(cfg, **kwargs)
    return cfg


@pytest.fixture(scope="module")
def trace(tiny_lrm):
    return Trace.from_segments("Start with 3. Add 4. What is the result?",
                               "Start with 3. Then add 4 to get 7.",
                               "The result is \\boxed{7}.", tiny_lrm)


# ---- 2. text longer than the context --------------------------------------------------------

@pytest.mark.parametrize("mb", [5, 50])
def test_a_text_far_longer_than_the_context_is_refused_at_once(tiny_lrm, mb):
    text = "<think>" + "Add four to seven. " * (mb * 2**20 // 19) + "</think> done"
    for build in (lambda: Trace.from_text(text, tiny_lrm),
                  lambda: Trace.from_segments("q", text, "s", tiny_lrm)):
        t0 = time.monotonic()
        with pytest.raises(StepSalError) as err:
            build()
        took = time.monotonic() - t0
        assert took < 3, f"refused after {took:.1f} s"
        msg = str(err.value)
        assert f"{len(text):,}" in msg[:200] or "characters" in msg
        assert "tokens but the model's context is 512 tokens" in msg and "shorten" in msg


def test_a_prompt_longer_than_the_context_is_refused_before_tokenising(tiny_lrm):
    from stepsal_lens.lens.generation import generate

    t0 = time.monotonic()
    with pytest.raises(StepSalError, match="a prompt has .* context is 512 tokens"):
        unchecked(generate)(tiny_lrm, prompts=["seven " * 2_000_000], progress=False)
    assert time.monotonic() - t0 < 3


def test_long_text_within_the_context_still_works(tiny_lrm):
    from stepsal_lens.segments.trace import check_fits

    check_fits("x " * 2000, tiny_lrm.tokenizer, 4096)  # 4000 chars: not counted
    check_fits("ab " * 20_000, tiny_lrm.tokenizer, 60_000)  # counted, fits


# ---- 3. no coercion ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"oeb_layers": "12"}, "oeb_layers must be a list .* got the str '12'"),
    ({"smi_layers": [1.5]}, r"the float 1.5 is not a layer index"),
    ({"oeb_layers": [True]}, r"the bool True is not a layer index"),
    ({"oeb_layers": [-1]}, r"not valid layer indices"),
    ({"window": True}, "window must be a whole number"),
    ({"window": 2.0}, "window must be a whole number"),
    ({"tau_max": "0.1"}, "tau_max must be a finite number"),
])
def test_stepflow_config_coerces_nothing(kwargs, match):
    with pytest.raises(StepSalError, match=match):
        config(**kwargs)


def test_layer_arguments_share_one_validator(tiny_lrm, trace):
    from stepsal_lens import step_effects, step_saliency

    for fn in (step_saliency, step_effects):
        for bad, match in (("12", "got the str '12'"), ([1.5], "float 1.5"), ([True], "bool"),
                           ([9], "not valid layer indices for a model with 4 layers")):
            with pytest.raises(StepSalError, match=match):
                unchecked(fn)(tiny_lrm, trace, layers=bad)


def test_choices_as_a_string_are_refused_with_the_line(tmp_path):
    from stepsal_lens.eval.problems import load_problems

    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"question": "Which?", "choices": ["1", "2", "3", "4"],
                             "answer": "B"}) + "\n"
                 + json.dumps({"question": "Which?", "choices": "ABCD", "answer": "B"}) + "\n")
    with pytest.raises(StepSalError, match=r"mc.jsonl:2: 'choices' must be a list .* the str "
                                           r"'ABCD'"):
        load_problems(f)


# ---- 4. public API: wrong types -----------------------------------------------------------

def _api_calls(model, trace):
    import stepsal_lens as S

    return {
        "step_saliency(m, 'text')": (lambda: unchecked(S.step_saliency)(model, "text"),
                                     "trace must be a Trace; got the str 'text'; build one"),
        "step_effects(m, 'text')": (lambda: unchecked(S.step_effects)(model, "text"),
                                    "trace must be a Trace"),
        "step_attention(m, 1)": (lambda: unchecked(S.step_attention)(model, 1),
                                 "trace must be a Trace; got the int 1"),
        "receiver_heads(m, 'text')": (lambda: unchecked(S.receiver_heads)(model, "text"),
                                      "traces must be a Trace"),
        "receiver_heads(m, [t, 'x'])": (lambda: unchecked(S.receiver_heads)(model, [trace, "x"]),
                                        r"traces\[1\] must be a Trace"),
        "patch_step(m, 'a', t, 1)": (lambda: unchecked(S.patch_step)(model, "a", trace, 1),
                                     "source must be a Trace"),
        "patch_step(m, t, t, 1.0)": (lambda: unchecked(S.patch_step)(model, trace, trace, 1.0),
                                     "step must be a whole number"),
        "token_saliency(m, t, '0')": (lambda: unchecked(S.token_saliency)(model, trace, "0"),
                                      "layer must be a whole number"),
        "stepflow(m, {'alpha': 1})": (lambda: unchecked(S.stepflow)(model, {"alpha": 1}),
                                      r"config must be a StepFlowConfig or None; got the dict "
                                      r"\{'alpha': 1\}; pass settings as keywords"),
        "stepflow(m, window=10**9)": (lambda: unchecked(S.stepflow)(model, window=10**9),
                                      "window=1000000000 is longer than the model's context"),
        "generate(m, 'What?')": (lambda: unchecked(S.generate)(model, "What?"),
                                 "questions must be a list of strings; got the str"),
        "generate(temperature=1e-45)": (
            lambda: unchecked(S.generate)(model, ["What?"], temperature=1e-45),
            "temperature must be 0 .* or between 0.0001 and 100; got 1e-45"),
        "generate(seed=10**23)": (
            lambda: unchecked(S.generate)(model, ["What?"], temperature=1.0, seed=10**23),
            "seed must be a whole number between 0 and 9223372036854775807"),
        "generate(max_new_tokens=2.5)": (
            lambda: unchecked(S.generate)(model, ["What?"], max_new_tokens=2.5),
            "max_new_tokens must be a whole number"),
        "Trace.from_text(b'..', m)": (lambda: unchecked(Trace.from_text)(Trace, b"abc", model),
                                      "the text must be a str; got the bytes"),
        "Trace.from_segments(1, ..)": (
            lambda: unchecked(Trace.from_segments)(Trace, 1, "t", "s", model),
                                       "question must be a str; got the int 1"),
        "load_lrm(42)": (lambda: unchecked(S.load_lrm)(42), "name_or_path must be a "
                                                            "checkpoint folder or a model name"),
        "odds_equal_bridge(list, ..)": (
            lambda: unchecked(S.odds_equal_bridge)([[0.5]], [[True]], [[False]]),
            "pattern must be a torch.Tensor; got the list"),
        "step_momentum(list, ..)": (lambda: unchecked(S.step_momentum)([1.0], [[1.0]], 0.1),
                                    "x must be a torch.Tensor"),
        "explore('result')": (lambda: unchecked(S.explore)("result"),
                              "result must be a StepSaliency; got the str"),
        "layer_metrics('x')": (lambda: unchecked(S.layer_metrics)("x"),
                               "result must be a StepSaliency"),
        "trace_metrics('x')": (lambda: unchecked(S.trace_metrics)("x"),
                               "result must be a StepSaliency"),
    }


def test_public_api_names_the_wrong_type(tiny_lrm, trace):
    failures = []
    for call, (fn, match) in _api_calls(tiny_lrm, trace).items():
        try:
            fn()
        except StepSalError as err:
            import re

            if not re.search(match, str(err)):
                failures.append(f"{call}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            failures.append(f"{call}: raw {type(err).__name__}: {err}")
            continue
        failures.append(f"{call}: no error")
    assert not failures, "\n".join(failures)


def test_step_knockout_checks_its_trace(tiny_lrm):
    from stepsal_lens import step_knockout

    with pytest.raises(StepSalError, match="trace must be a Trace; got the str"):
        unchecked(step_knockout)(tiny_lrm, "text", [1])


# ---- 5. numeric flags ----------------------------------------------------------------------

@pytest.mark.parametrize("flags, match", [
    (["--temperature", "1e-45"], "--temperature must be 0 (greedy) or between 0.0001 and 100"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--seed", str(10**23)], "--seed must be a whole number between 0 and 9223372036854775807"),
    (["--seed", "-1"], "--seed must be a whole number between 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a whole number >= 1"),
    (["--stepflow", "--window", "0"], "window must be a whole number >= 1"),
    (["--stepflow", "--tau-max", "nan"], "tau_max must be a finite number"),
    (["--stepflow", "--oeb-layers", "1.5"], "layers must be comma-separated integers"),
])
def test_numeric_flags_refused_before_loading(tmp_path, capsys, flags, match):
    # a model that does not exist: the flag is refused before anything is loaded
    rc = main(["generate", "--model", str(tmp_path / "no-model"), "--question", "What?",
               "--out", str(tmp_path / "g.json"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("stepsal: error: "), err
    assert match in err, err


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "1e9"])
def test_grade_timeout_refused(tmp_path, capsys, value):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"output": "\\boxed{2}", "answer": "2"}) + "\n")
    rc = main(["grade", str(src), "--out", str(tmp_path / "out.jsonl"), "--timeout", value])
    err = capsys.readouterr().err
    assert rc == 2 and "stepsal: error: --timeout must be a finite number > 0 and <= 86400" in err


def test_window_beyond_the_context_refused_before_allocating(tiny_lrm):
    from stepsal_lens import stepflow

    with pytest.raises(StepSalError, match="longer than the model's context of 512"):
        with stepflow(tiny_lrm, window=10**9):
            pass


def test_a_trace_id_too_long_for_a_folder_name(tmp_path):
    from stepsal_lens.apps.batch import read_traces

    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"id": "x" * 300, "text": "abc"}) + "\n")
    with pytest.raises(StepSalError, match=r"t.jsonl:1: 'id' has 300 characters \(at most 200"):
        read_traces(f)


# ---- 6. pickle checkpoints -----------------------------------------------------------------

def test_pickle_checkpoint_refused_and_never_unpickled(tmp_path, checkpoints):
    import shutil

    from stepsal_lens import load_lrm

    folder = tmp_path / "pickled"
    shutil.copytree(checkpoints["qwen2"], folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    # a file that would run code if unpickled
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch PWNED'\ntR.")
    with pytest.raises(StepSalError, match=r"only pickle weights \(pytorch_model.bin\).*never "
                                           r"loaded.*safetensors"):
        load_lrm(folder, device="cpu")
    assert not (tmp_path / "PWNED").exists()


# ---- 7. file encodings ---------------------------------------------------------------------

@pytest.mark.parametrize("encoding, match", [
    ("utf-16", "is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8"),
    ("utf-16-le", "not UTF-8 text (a quarter of its bytes are zero"),
    ("latin-1", "is not UTF-8 text: byte 0xe9 at line 1 is not UTF-8 (Latin-1"),
])
def test_non_utf8_files_refused_by_name(tmp_path, capsys, encoding, match):
    doc = json.dumps({"question": "Café?", "thinking": "Un café.", "summary": "Oui."},
                     ensure_ascii=False)
    trace_file = tmp_path / "trace.json"
    trace_file.write_bytes(doc.encode(encoding))
    rc = main(["analyze", "--model", str(tmp_path / "no-model"), "--trace", str(trace_file),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"stepsal: error: trace file {str(trace_file)!r} " in err and match in err

    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("Qu'est-ce qu'un café ?".encode(encoding))
    rc = main(["generate", "--model", str(tmp_path / "no-model"), "--prompt-file", str(prompt),
               "--out", str(tmp_path / "g.json")])
    err = capsys.readouterr().err
    assert rc == 2 and f"prompt file {str(prompt)!r} " in err and match in err

    data = tmp_path / "data.json"
    data.write_bytes(json.dumps([{"problem": "Café?", "answer": "1"}],
                                ensure_ascii=False).encode(encoding))
    from stepsal_lens.eval.problems import load_problems

    with pytest.raises(StepSalError, match="data file .* " + match.split(" (")[0][:20]):
        load_problems(data)


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    from stepsal_lens._checks import read_utf8

    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffcafé".encode("utf-8"))
    assert read_utf8(f, "prompt file") == "café"


def test_checks_refuse_bool_and_non_finite():
    from stepsal_lens._checks import check_number, check_seed, check_temperature, check_whole

    for bad in (True, 1.0, "3", None):
        with pytest.raises(StepSalError):
            check_whole(bad, "n")
    for bad in (math.nan, math.inf, True, "1"):
        with pytest.raises(StepSalError):
            check_number(bad, "x")
    assert check_temperature(0) == 0 and check_temperature(0.6) == 0.6
    assert check_seed(2**63 - 1) == 2**63 - 1
