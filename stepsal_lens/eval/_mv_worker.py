"""The math-verify worker of :mod:`stepsal_lens.eval.grading` (run as a script, not imported).

Every symbolic comparison of the grader runs here, in a child process, so that a
comparison that never ends (``10^{10^{10}}``, ``9^9^9^9``) can be killed without harming
the caller, whatever thread the caller grades from. The protocol is one JSON object per
line on stdin and stdout::

    -> {"pairs": [["gold", "prediction"], ...], "op_timeout": 3}
    <- {"results": ["equal" | "different" | "timeout" | "memory", ...]}
    -> {"grade": ["text", "gold", "math" | "choice", extract], "timeout": 10}
    <- {"grade": {"prediction": ..., "correct": ..., "error": ..., "method": ...}}

A ``grade`` request runs all of :mod:`stepsal_lens.eval.grading` here - reading the answer
out of the text (regular expressions that a hostile text can make slow), normalising it
and the comparisons - so that the parent's hard limit covers every step.

Each pair is parsed with ``math_verify.parse("$...$")`` and compared with
``math_verify.verify``; each parse and each comparison has math-verify's own time limit
(``op_timeout`` seconds, SIGALRM in this process's main thread), and the parent kills the
whole process when a request overruns its hard limit (a computation inside C code, such
as a huge integer power, does not see the alarm). The grading modules are loaded from
this folder without running ``stepsal_lens/__init__.py``, so the worker starts without
torch.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
import types
from pathlib import Path


def _limit_memory(gib: float = 4.0) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = int(gib * 2**30)
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):  # not on this platform: the kill still works
        pass


def _grading_module():
    """:mod:`stepsal_lens.eval.grading` from the files beside this one, without the package's
    ``__init__`` (which imports torch): its parent packages are registered as bare modules."""
    if "stepsal_lens.eval.grading" in sys.modules:
        return sys.modules["stepsal_lens.eval.grading"]
    root = Path(__file__).resolve().parent.parent
    for name, folder in (("stepsal_lens", root), ("stepsal_lens.segments", root / "segments"),
                         ("stepsal_lens.eval", root / "eval")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(folder)]
            sys.modules[name] = module
    return importlib.import_module("stepsal_lens.eval.grading")


def compare_pairs(pairs, op_timeout: int, parse, verify, TimeoutException) -> list[str]:
    """math-verify's verdict on each (gold, prediction) pair."""
    parsed: dict[str, object] = {}

    def get(text: str):
        if text not in parsed:
            try:
                parsed[text] = parse(f"${text}$", parsing_timeout=op_timeout,
                                     raise_on_error=True)
            except TimeoutException:
                parsed[text] = "timeout"
            except MemoryError:
                parsed[text] = "memory"
            except Exception:  # noqa: BLE001 - unparseable text compares unequal
                parsed[text] = []
        return parsed[text]

    results = []
    for gold, pred in pairs:
        g, p = get(gold), get(pred)
        if isinstance(g, str) or isinstance(p, str):  # "timeout" / "memory"
            results.append(g if isinstance(g, str) else p)
            continue
        verdict = "different"
        for gi in g:
            for pi in p:
                try:
                    if verify(gi, pi, timeout_seconds=op_timeout, raise_on_error=True):
                        verdict = "equal"
                except TimeoutException:
                    verdict = "timeout"
                except MemoryError:
                    verdict = "memory"
                except Exception:  # noqa: BLE001 - incomparable objects are unequal
                    pass
                if verdict == "equal":
                    break
            if verdict == "equal":
                break
        results.append(verdict)
    return results


def main() -> None:
    # answers go to a private copy of stdout; anything a library prints lands on stderr
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.disable(logging.CRITICAL)  # math-verify logs every timeout and parse failure
    _limit_memory()
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if "grade" in request:
            out.write(json.dumps(_grade(request, parse, verify, TimeoutException)) + "\n")
            continue
        op_timeout = int(request.get("op_timeout", 3))
        results = compare_pairs(request["pairs"], op_timeout, parse, verify, TimeoutException)
        out.write(json.dumps({"results": results}) + "\n")


def _grade(request: dict, parse, verify, TimeoutException) -> dict:
    text, gold, kind, extract = request["grade"]
    timeout = float(request["timeout"])
    started = time.monotonic()

    def compare(pairs, seconds):
        op = max(1, int(min(seconds, timeout - (time.monotonic() - started)) / 3))
        return compare_pairs(pairs, op, parse, verify, TimeoutException)

    try:
        grading = _grading_module()
        verdict = grading._grade_here(text, gold, kind, timeout, extract, compare)
    except MemoryError:
        return {"grade": {"prediction": None, "correct": False, "method": "error",
                          "error": "grading ran out of memory (the worker's 4 GiB)"}}
    except Exception as err:  # noqa: BLE001 - reported to the parent, which goes on
        return {"error": f"{type(err).__name__}: {err}"}
    return {"grade": verdict.to_dict()}


if __name__ == "__main__":
    main()
