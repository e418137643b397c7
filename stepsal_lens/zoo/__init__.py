"""The bundled zoo, a plug-in: the tiny-lrm model, its arithmetic task and random
checkpoints with the real architectures' features.

Importing it registers what the rest of the package finds by name: the model
``tiny-lrm`` (:func:`~stepsal_lens.lens.models.register_model`, bundled folder
``zoo/tiny_lrm``) and the problem source ``tiny`` (``load_problems("tiny:hard")``,
:func:`~stepsal_lens.eval.problems.register_source`). ``stepsal_lens`` imports it last.

Examples
--------
>>> from stepsal_lens.eval.problems import list_sources
>>> "tiny" in list_sources()
True
"""

from __future__ import annotations

from pathlib import Path

from stepsal_lens.eval.problems import Problem, register_source
from stepsal_lens.lens.models import BUNDLED, ModelSpec, register_model

#: Seed of the held-out evaluation problems (tiny-lrm's ``eval.json``).
EVAL_SEED = 20_000


def tiny_problems(split: str, limit: int | None) -> list[Problem]:
    """Held-out problems of the arithmetic task (``tiny:id`` / ``tiny:long`` /
    ``tiny:hard``), 500 unless ``limit`` says otherwise."""
    from stepsal_lens.zoo.task import make_problems

    return [Problem(f"{split}-{i}", p.question, str(p.answer), "math", (), f"tiny:{split}", "")
            for i, p in enumerate(make_problems(limit or 500, split=split, seed=EVAL_SEED))]


BUNDLED["tiny-lrm"] = Path(__file__).parent / "tiny_lrm"
register_model(ModelSpec("tiny-lrm", "tiny", "think-tags", "Qwen2ForCausalLM", 4, 4, 2,
                         "1.0M (bundled)"))
register_source("tiny", tiny_problems)
