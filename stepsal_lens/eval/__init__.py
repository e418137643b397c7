"""Evaluation: grading answers (math-verify in a worker), problem sources and files,
resumable accuracy runs and paired comparisons."""

# coding rows (LiveCodeBench) register their reader with eval.problems; importing it here
# makes them readable whenever any module of this package is imported
from stepsal_lens.eval.code import lcb as _lcb  # noqa: E402, F401
