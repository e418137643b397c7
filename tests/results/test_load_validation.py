"""Loaders refuse hostile or foreign folders: every field of a saved StepSaliency,
StepEffects or ReceiverHeads is checked, and each failure is one StepSalError naming the
file, the field, the bad value and the fix; good folders round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepsal_lens import Step, StepEffects, StepSalError, StepSaliency
from stepsal_lens.results.effects import ReceiverHeads

FIX = r"this folder was not written by stepsal or was edited: re-run `stepsal analyze`"
FIX_EFFECTS = r"this folder was not written by stepsal or was edited: re-run `stepsal effects`"


def _steps() -> list[Step]:
    return [Step(0, "question", "Q?", (0, 2), (0, 2)), Step(1, "thinking", "T one.", (2, 8), (2, 4)),
            Step(2, "summary", "S.", (9, 11), (4, 6))]


def _saved(tmp_path: Path) -> Path:
    maps = torch.rand(2, 3, 3, 3)
    meta = {"model": "m", "format": "think-tags", "target": "lm", "n_layers": 4, "n_heads": 3,
            "d_vocab": 100, "text": "Q? T one. S."}
    return StepSaliency(maps, [1, 3], _steps(), torch.arange(6) + 10, meta).save(
        tmp_path / "sal")


def _json(edit):
    def damage(folder: Path):
        path = folder / "steps.json"
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    return damage


def _tensors(**edits):
    def damage(folder: Path):
        path = folder / "step_saliency.safetensors"
        t = load_file(path)
        for name, fn in edits.items():
            t[name] = fn(t).contiguous()
        save_file(t, path)
    return damage


def _step(i, **fields):
    return _json(lambda d: d["steps"][i].update(fields))


#: (id, damage, message): the table of docs/errors.md, "Untrusted results".
SALIENCY_CASES = [
    ("unknown-segment", _step(1, segment="<img src=x onerror=alert(1)>"),
     r"steps\[1\]\.segment is '<img src=x onerror=alert\(1\)>', must be one of "
     r"\['question', 'thinking', 'summary'\]"),
    ("segments-out-of-order", _step(2, segment="question"),
     r"steps\[2\]\.segment is 'question', but step 1 is 'thinking': steps run question, "
     r"thinking, summary"),
    ("negative-maps", _tensors(maps=lambda t: t["maps"] - 2.0),
     r"54 values of maps are negative \(e\.g\. -1\.\d+\); saliency, attention and effects "
     r"are never below 0"),
    ("nan-maps", _tensors(maps=lambda t: t["maps"].index_fill(0, torch.tensor([1]), float("nan"))),
     r"27 map values are NaN or infinite; saliency is never saved non-finite"),
    ("layer-99", _json(lambda d: d.update(layers=[1, 99])),
     r"layers\[1\] is 99, must be in \[0, 3\]"),
    ("layers-unsorted", _json(lambda d: d.update(layers=[3, 1])),
     r"layers is \[3, 1\], must be increasing, each layer once"),
    ("layers-count", _json(lambda d: d.update(layers=[0])), r"'layers' must list 2 layer indices"),
    ("reversed-span", _step(1, token_start=4, token_end=2),
     r"step 1 spans tokens 4-2: the end comes before the start"),
    ("empty-span", _step(1, token_start=3, token_end=3),
     r"step 1 spans tokens 3-3: no token"),
    ("overlapping-spans", _step(2, token_start=3),
     r"step 2 spans tokens 3-6, overlapping or before step 1 \(ending at 4\)"),
    ("span-past-tokens", _step(2, token_end=60),
     r"step 2 spans tokens 4-60, outside the 6 saved token ids"),
    ("negative-token-id", _tensors(token_ids=lambda t: t["token_ids"] - 12),
     r"token_ids holds the negative id -2; ids are >= 0"),
    ("token-id-past-vocab", _tensors(token_ids=lambda t: t["token_ids"] * 20),
     r"token_ids holds the id 300, outside the model's vocabulary of 100"),
    ("float-token-ids", _tensors(token_ids=lambda t: t["token_ids"].float()),
     r"token_ids must be a 1-d integer tensor; got torch\.float32"),
    ("bool-token-end", _step(0, token_end=True),
     r"steps\[0\]\.token_end is True, must be an integer \(got bool\)"),
    ("string-token-start", _step(1, token_start="2"),
     r"steps\[1\]\.token_start is '2', must be an integer \(got str\)"),
    ("float-layer", _json(lambda d: d.update(layers=[1, 3.0])),
     r"layers\[1\] is 3\.0, must be an integer \(got float\)"),
    ("step-text-not-string", _step(1, text=["<script>"]),
     r"steps\[1\]\.text is \['<script>'\], must be a string \(got list\)"),
    ("step-index-wrong", _step(1, index=7), r"steps\[1\]\.index is 7, must be 1"),
    ("model-not-string", _json(lambda d: d.update(model={"x": 1})),
     r"model is \{'x': 1\}, must be a string \(got dict\)"),
    ("n-heads-mismatch", _json(lambda d: d.update(n_heads=8)), r"n_heads is 8, but the maps hold 3 heads"),
    ("missing-key", _json(lambda d: d["steps"][1].pop("segment")), r"step 1 needs the keys"),
    ("missing-steps", _json(lambda d: d.pop("steps")), r"has no list of 'steps'"),
    ("missing-tensor", lambda f: save_file({"maps": torch.rand(2, 3, 3, 3)},
                                           f / "step_saliency.safetensors"),
     r"lacks the tensor\(s\) \['token_ids'\]"),
    ("maps-wrong-shape", _tensors(maps=lambda t: t["maps"][:, :, :2, :2]),
     r"holds maps over \(2, 2\) steps but '.*steps\.json' lists 3 steps"),
    ("maps-3d", _tensors(maps=lambda t: t["maps"][0]),
     r"maps must be a 4-d float tensor .*shape \(3, 3, 3\)"),
    ("stepflow-not-settings", _json(lambda d: d["meta"].update(stepflow={"alpha": "x", "evil": 1})),
     r"meta\.stepflow is \{'alpha': 'x', 'evil': 1\}, not StepFlow settings \(unknown StepFlow "
     r"settings \['evil'\]"),
    ("meta-not-object", _json(lambda d: d.update(meta=[1])),
     r"meta is \[1\], must be a JSON object \(got list\)"),
]


def test_good_folder_round_trips(tmp_path):
    folder = _saved(tmp_path)
    back = StepSaliency.load(folder)
    assert back.layers == [1, 3] and back.steps == _steps()
    assert back.token_ids.tolist() == list(range(10, 16)) and back.meta["d_vocab"] == 100
    assert torch.equal(back.maps, StepSaliency.load(back.save(tmp_path / "again")).maps)


@pytest.mark.parametrize("damage,message",
                         [pytest.param(*c[1:], id=c[0]) for c in SALIENCY_CASES])
def test_hostile_saliency_folder(tmp_path, damage, message):
    folder = _saved(tmp_path)
    damage(folder)
    with pytest.raises(StepSalError, match=message) as err:
        StepSaliency.load(folder)
    text = str(err.value)
    assert str(folder) in text and text.endswith(FIX.replace("\\", "")), text


def _effects(tmp_path: Path) -> Path:
    eff = torch.tril(torch.rand(3, 3), -1)
    per = torch.tril(torch.rand(2, 3, 3), -1)
    return StepEffects(eff, _steps(), torch.arange(6), per, [0, 2], None,
                       {"n_layers": 4, "n_heads": 2, "d_vocab": 50}).save(tmp_path / "eff")


def _eff_json(edit):
    def damage(folder: Path):
        path = folder / "step_effects.json"
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    return damage


def _eff_tensors(**edits):
    def damage(folder: Path):
        path = folder / "step_effects.safetensors"
        t = load_file(path)
        for name, fn in edits.items():
            t[name] = fn(t).contiguous()
        save_file(t, path)
    return damage


EFFECTS_CASES = [
    ("unknown-segment", _eff_json(lambda d: d["steps"][0].update(segment="answer")),
     r"steps\[0\]\.segment is 'answer', must be one of"),
    ("nan-effects", _eff_tensors(effects=lambda t: t["effects"] * float("nan")),
     r"9 values of effects are NaN or infinite"),
    ("negative-effects", _eff_tensors(effects=lambda t: -t["effects"] - 1),
     r"values of effects are negative"),
    ("effect-above-diagonal", _eff_tensors(effects=lambda t: t["effects"] + 1),
     r"effects is non-zero on or above the diagonal"),
    ("layer-99", _eff_json(lambda d: d.update(layers=[0, 99])),
     r"layers\[1\] is 99, must be in \[0, 3\]"),
    ("per-layer-shape", _eff_json(lambda d: d.update(layers=[0, 1, 2])),
     r"effects_per_layer has shape \(2, 3, 3\); expected \(3, 3, 3\)"),
    ("head-9", _eff_json(lambda d: d.update(heads=[9])), r"heads\[0\] is 9, must be in \[0, 1\]"),
    ("token-id-past-vocab", _eff_tensors(token_ids=lambda t: t["token_ids"] + 50),
     r"token_ids holds the id 55, outside the model's vocabulary of 50"),
    ("missing-layers", _eff_json(lambda d: d.pop("layers")), r"the document has no 'layers'"),
    ("wrong-step-count", _eff_json(lambda d: d["steps"].pop()),
     r"effects has shape \(3, 3\) but '.*' lists 2 steps"),
]


def test_good_effects_round_trip(tmp_path):
    back = StepEffects.load(_effects(tmp_path))
    assert back.layers == [0, 2] and back.per_layer.shape == (2, 3, 3) and back.steps == _steps()


@pytest.mark.parametrize("damage,message", [pytest.param(*c[1:], id=c[0]) for c in EFFECTS_CASES])
def test_hostile_effects_folder(tmp_path, damage, message):
    folder = _effects(tmp_path)
    damage(folder)
    with pytest.raises(StepSalError, match=message) as err:
        StepEffects.load(folder)
    assert str(err.value).endswith(FIX_EFFECTS.replace("\\", ""))


def test_receiver_heads_load_checks(tmp_path):
    kurt = {"attention": torch.rand(2, 3, 4), "saliency": torch.rand(2, 3, 4)}
    folder = ReceiverHeads(kurt, [0, 1, 2], 4, ["thinking"]).save(tmp_path / "rh")
    assert ReceiverHeads.load(folder).layers == [0, 1, 2]
    doc = json.loads((folder / "receiver_heads.json").read_text())
    (folder / "receiver_heads.json").write_text(json.dumps({**doc, "segments": ["<b>"]}))
    with pytest.raises(StepSalError, match=r"segments is \['<b>'\], must list segments of"):
        ReceiverHeads.load(folder)
    (folder / "receiver_heads.json").write_text(json.dumps({**doc, "k": True}))
    with pytest.raises(StepSalError, match=r"k is True, must be an integer \(got bool\)"):
        ReceiverHeads.load(folder)
