"""Parity with the raw Hugging Face model, per realistic checkpoint, as one table.

Runs the realistic test tier (tests/realistic, which recomputes every quantity on the
Hugging Face model with its own hooks) and prints the largest error it measured for each
model and quantity. Needs the real tokenizers (`make tokenizers`).

    python benchmarks/parity.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "parity.json"
        env = {**os.environ, "STEPSAL_PARITY_REPORT": str(report)}
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly",
                              "tests/realistic/test_parity.py"], cwd=ROOT, env=env)
        if run.returncode != 0 or not report.exists():
            sys.exit(f"the realistic tier failed (exit {run.returncode}); no table")
        errors = json.loads(report.read_text())
    table = pd.DataFrame(errors).T
    with pd.option_context("display.float_format", "{:.1e}".format, "display.width", 200):
        print("max |ours - Hugging Face| (log-probs, activations: absolute; maps: relative "
              "to the largest entry)")
        print(table.T.to_string())


if __name__ == "__main__":
    main()
