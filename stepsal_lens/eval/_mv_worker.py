"""The math-verify worker of :mod:`stepsal_lens.eval.grading` (run as a script, not imported).

Every symbolic comparison of the grader runs here, in a child process, so that a
comparison that never ends (``10^{10^{10}}``, ``9^9^9^9``) can be killed without harming
the caller, whatever thread the caller grades from. The protocol is one JSON object per
line on stdin and stdout::

    -> {"pairs": [["gold", "prediction"], ...], "op_timeout": 3}
    <- {"results": ["equal" | "different" | "timeout" | "memory", ...]}

Each pair is parsed with ``math_verify.parse("$...$")`` and compared with
``math_verify.verify``; each parse and each comparison has math-verify's own time limit
(``op_timeout`` seconds, SIGALRM in this process's main thread), and the parent kills the
whole process when a request overruns its hard limit (a computation inside C code, such
as a huge integer power, does not see the alarm). This file imports nothing from
stepsal_lens, so the worker starts without torch.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def _limit_memory(gib: float = 4.0) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = int(gib * 2**30)
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):  # not on this platform: the kill still works
        pass


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
        op_timeout = int(request.get("op_timeout", 3))
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
        for gold, pred in request["pairs"]:
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
        out.write(json.dumps({"results": results}) + "\n")


if __name__ == "__main__":
    main()
