"""A synthetic multi-step arithmetic task in the question / thinking / summary shape.

Each thinking step needs the previous step's result and one operand from the question;
the summary needs the last step. Grading is exact.

Examples
--------
>>> from stepsal_lens.zoo.task import grade_exact, make_problems
>>> p = make_problems(1, split="id", seed=3)[0]
>>> p.question  # doctest: +SKIP
'Start with 12. Add 7, then multiply by 2. What is the result?'
>>> grade_exact(p.reference_summary(), p.answer)
True
>>> grade_exact("The result is \\\\boxed{5}.", 6)
False
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from stepsal_lens.errors import StepSalError

__all__ = ["ArithmeticProblem", "SPLITS", "boxed_answer", "grade_exact", "make_problems"]

#: split name -> (min ops, max ops, max start value)
SPLITS: dict[str, tuple[int, int, int]] = {
    "id": (2, 4, 20),  # in-distribution: the bulk of tiny-lrm's training data
    "long": (5, 7, 20),  # longer chains, mixed into training at 3%
    "hard": (6, 9, 20),  # evaluation: 8 and 9 operations never occur in training
}
# tiny-lrm drew its "long" problems from the random stream named "hard"; keeping that
# stream keeps `python -m stepsal_lens.zoo.train --seed 0` replaying the same data.
_STREAM = {"long": "hard", "hard": "hard-eval"}

_MAX_VALUE = 99
_VERB = {"+": "add {}", "-": "subtract {}", "*": "multiply by {}"}
_WORD = {"+": "plus", "-": "minus", "*": "times"}


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem: a start value and a chain of (op, operand) pairs."""

    start: int
    ops: tuple[tuple[str, int], ...]
    split: str = "id"

    @property
    def values(self) -> list[int]:
        out = [self.start]
        for op, n in self.ops:
            out.append(_apply(out[-1], op, n))
        return out

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def question(self) -> str:
        chain = ", then ".join(_VERB[op].format(n) for op, n in self.ops)
        return f"Start with {self.start}. {chain[0].upper()}{chain[1:]}. What is the result?"

    def reference_thinking(self) -> str:
        """One sentence per operation, each long enough to be its own step."""
        vals = self.values
        steps = [f"We start with {self.start}."]
        steps += [f"{vals[i]} {_WORD[op]} {n} makes {vals[i + 1]}."
                  for i, (op, n) in enumerate(self.ops)]
        return " ".join(steps)

    def reference_summary(self) -> str:
        return f"The result is \\boxed{{{self.answer}}}."

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(question=self.question, answer=self.answer)
        return d


def _apply(value: int, op: str, n: int) -> int:
    return value + n if op == "+" else value - n if op == "-" else value * n


def _random_problem(rng: random.Random, split: str) -> ArithmeticProblem:
    lo, hi, max_start = SPLITS[split]
    value = start = rng.randint(1, max_start)
    ops = []
    for _ in range(rng.randint(lo, hi)):
        choices = [("+", rng.randint(1, 9))]
        if value >= 1:
            choices.append(("-", rng.randint(1, min(9, value))))
        if value * 2 <= _MAX_VALUE and value > 0:
            choices.append(("*", rng.randint(2, min(3, _MAX_VALUE // value))))
        choices = [(op, n) for op, n in choices if 0 <= _apply(value, op, n) <= _MAX_VALUE]
        op, n = rng.choice(choices)
        ops.append((op, n))
        value = _apply(value, op, n)
    return ArithmeticProblem(start, tuple(ops), split)


def make_problems(n: int, *, split: str = "id", seed: int = 0) -> list[ArithmeticProblem]:
    """``n`` random problems of a split (:data:`SPLITS`); values stay in 0..99."""
    if split not in SPLITS:
        raise StepSalError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    rng = random.Random(f"{_STREAM.get(split, split)}-{seed}")
    return [_random_problem(rng, split) for _ in range(n)]


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (None if there is none).

    Braces are balanced (:func:`stepsal_lens.segments.answers.find_boxed`, the one parser).
    """
    from stepsal_lens.segments.answers import find_boxed

    found = find_boxed(text)
    return found[-1].text if found else None


def grade_exact(text: str, answer: int | str) -> bool:
    """Exact grading: the last ``\\boxed{}`` holds exactly the answer."""
    got = boxed_answer(text)
    return got is not None and got == str(answer).strip()
