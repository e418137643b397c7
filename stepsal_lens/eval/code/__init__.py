"""Coding benchmarks: LiveCodeBench problems, a sandbox for model programs, judging, pass@k.

* :mod:`~stepsal_lens.eval.code.sandbox` runs one program in its own sandbox
  (``bwrap``, else ``unshare``; never silently none);
* :mod:`~stepsal_lens.eval.code.judge` judges a program on its tests with LiveCodeBench's
  rules and gives one verdict (``passed``, ``wrong_answer``, ``runtime_error``,
  ``time_limit``, ``memory_limit``, ``no_code``, ``compile_error``);
* :mod:`~stepsal_lens.eval.code.lcb` reads LiveCodeBench's release files (and a plain
  form), builds its prompts and extracts the code of an answer;
* :mod:`~stepsal_lens.eval.code.passk` computes pass@k with intervals.
"""
