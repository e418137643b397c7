"""Generation: one generated reasoning trace, as the model saw it, with StepFlow's record.

Examples
--------
>>> from stepsal_lens import Generation
>>> g = Generation("Q?<think>\\n", "Q?<think>\\nSo 2.</think>2", [1, 2, 3, 4], 2, True,
...                "think-tags")
>>> g.completion_ids
[3, 4]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stepsal_lens.errors import StepSalError
from stepsal_lens.typing import Model
from stepsal_lens.segments.formats import get_format
from stepsal_lens.segments.trace import Trace

__all__ = ["Generation"]


@dataclass
class Generation:
    """One generated trace.

    Attributes
    ----------
    prompt : str
        The prompt text (the format's template around the question).
    text : str
        Everything the model saw, decoded: prompt and completion.
    token_ids : list[int]
        Prompt and completion ids as the model saw them (no padding).
    prompt_len : int
        How many of ``token_ids`` are the prompt.
    finished : bool
        The completion ended with an end-of-sequence marker (else it hit the budget).
    stats : dict
        StepFlow's counts for this sequence (zeros when StepFlow was off).
    stepflow : dict or None
        The resolved :class:`~stepsal_lens.StepFlowConfig` it ran with (None: off).
    engine : str or None
        How the model ran: ``"fused"`` (the Hugging Face model inside the bridge, StepFlow
        as an attention function and module hooks) or ``"hook_pattern"`` (the bridge's
        ``generate``, StepFlow as hooks on its hook points).
    """

    prompt: str
    text: str
    token_ids: list[int]
    prompt_len: int
    finished: bool
    format: str
    stats: dict[str, Any] = field(default_factory=dict)
    stepflow: dict[str, Any] | None = None
    engine: str | None = None

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    def segments(self) -> dict[str, Any]:
        """Question, thinking and summary text (``truncated``: the thinking never
        closed; ``error``: the text could not be parsed)."""
        try:
            p = get_format(self.format).parse(self.text)
        except StepSalError as err:
            return {"question": None, "thinking": None, "summary": None, "truncated": None,
                    "error": str(err)}
        return {"question": p.question, "thinking": p.thinking, "summary": p.summary,
                "truncated": p.truncated, "error": None}

    def trace(self, model: Model, **kwargs: Any):
        """The :class:`~stepsal_lens.Trace` over exactly these token ids."""
        return Trace.from_token_ids(self.token_ids, model, format=self.format, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record written by ``stepsal generate``."""
        d = asdict(self)
        d["segments"] = self.segments()
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
        return path
