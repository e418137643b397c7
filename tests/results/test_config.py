"""StepFlowConfig: validated once, serialisable, resolved against a model; what
stepflow(), generate and evaluate take and record; blocks do not nest."""

from __future__ import annotations

import inspect
import math

import pytest

from stepsal_lens import StepFlowConfig, StepSalError, stepflow
from stepsal_lens.lens.generation import generate


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": math.nan}, "alpha must be a finite number"),
    ({"alpha": math.inf}, "alpha must be a finite number"),
    ({"tau_max": -0.1}, r"tau_max must be in \[0, 1\]"),
    ({"window": 0}, "window must be a whole number"),
    ({"smi_variant": "z"}, "smi_variant must be one of"),
    ({"oeb_layers": [-1]}, "non-negative"),
])
def test_bad_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(StepSalError, match=message):
        StepFlowConfig(**kwargs)


def test_round_trip_and_resolution():
    cfg = StepFlowConfig(tau_max=0.2, smi_layers=[3, 1, 3])
    assert cfg.smi_layers == (1, 3)
    assert StepFlowConfig.from_dict(cfg.to_dict()) == cfg
    resolved = cfg.resolve(8)
    assert resolved.oeb_layers == (0, 1) and resolved.smi_layers == (1, 3)
    assert StepFlowConfig(smi_variant="paper_code").resolve(8).smi_layers == (6,)
    with pytest.raises(StepSalError, match="out of range"):
        StepFlowConfig(oeb_layers=[9]).resolve(8)
    with pytest.raises(StepSalError, match="unknown StepFlow settings"):
        StepFlowConfig.from_dict({"tau": 0.1})


def test_stepflow_records_its_resolved_config(models):
    model = models["qwen2"]
    with stepflow(model, StepFlowConfig(alpha=0.1), tau_max=0.3) as sf:
        pass
    assert sf.config == StepFlowConfig(tau_max=0.3, alpha=0.1).resolve(model.cfg.n_layers)
    with pytest.raises(StepSalError, match="unknown StepFlow setting"):
        with stepflow(model, tau=0.3):
            pass


def test_blocks_do_not_nest_and_are_removed(models):
    model = models["qwen2"]
    with stepflow(model):
        with pytest.raises(StepSalError, match="do not nest"):
            with stepflow(model, alpha=0.5):
                pass
    with stepflow(model):  # the first block's exit released the model
        pass
    assert not any(h for hp in model.hook_dict.values() for h in hp.fwd_hooks)


def test_generation_takes_and_records_a_config(tiny_lrm):
    q = ["Start with 3. Add 4. What is the result?"]
    [g] = generate(tiny_lrm, q, stepflow=StepFlowConfig(), max_new_tokens=24, progress=False)
    assert g.stepflow == StepFlowConfig().resolve(tiny_lrm.cfg.n_layers).to_dict()
    [plain] = generate(tiny_lrm, q, max_new_tokens=24, progress=False)
    assert plain.stepflow is None
    # what a user without the tests' runtime type checker gets for an old-style dict
    with pytest.raises(StepSalError, match="StepFlowConfig or None"):
        inspect.unwrap(generate)(tiny_lrm, q, stepflow={"alpha": 0.1}, progress=False)
    with pytest.raises(StepSalError, match="temperature must be"):
        generate(tiny_lrm, q, temperature=-1.0, progress=False)
