"""Evaluation: grading answers (math-verify in a worker), problem sources and files,
resumable accuracy runs and paired comparisons."""
