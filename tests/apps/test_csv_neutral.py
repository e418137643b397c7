"""Every CSV the package writes neutralises cells a spreadsheet would evaluate (OWASP:
text starting with ``=``, ``+``, ``-``, ``@``, tab or CR gets a leading ``'``), while
numbers, negative ones included, stay numbers."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

import stepsal_lens
from stepsal_lens.apps.escape import csv_cell, write_csv

PACKAGE = Path(stepsal_lens.__file__).parent
IDS = ["=cmd|' /C calc'!A0", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "plain"]


def test_csv_cell_rule():
    assert [csv_cell(v) for v in IDS] == ["'=cmd|' /C calc'!A0", "'+1", "'-2+3", "'@SUM(A1)",
                                          "'\tx", "'\rx", "plain"]
    for number in (-2.5, -3, 0, 1e-9, float("nan"), True, None):
        assert csv_cell(number) is number


def test_write_csv_keeps_numbers(tmp_path):
    frame = pd.DataFrame({"id": IDS, "value": -np.arange(len(IDS)) - 0.5,
                          "layer": range(len(IDS)), "mixed": [-1, "-1", 2.5, "=x", None, 3, "y"]})
    with open(write_csv(frame, tmp_path / "x.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "value", "layer", "mixed"]
    assert [r[0] for r in rows[1:]] == [csv_cell(v) for v in IDS]
    assert [r[1] for r in rows[1:]] == [str(-k - 0.5) for k in range(len(IDS))]  # numbers
    assert [r[3] for r in rows[1:]] == ["-1", "'-1", "2.5", "'=x", "", "3", "y"]
    back = pd.read_csv(tmp_path / "x.csv")
    assert back["value"].dtype == np.float64 and (back["value"] < 0).all()


def test_every_csv_goes_through_write_csv():
    writers = sorted(f"{p.relative_to(PACKAGE).as_posix()}:{m.group(0)}"
                     for p in PACKAGE.rglob("*.py") for m in re.finditer(
                         r"\.to_csv\(|csv\.writer\(|DictWriter\(", p.read_text()))
    assert writers == ["apps/escape.py:.to_csv("], writers


def test_metrics_csv_of_hostile_trace_ids(tmp_path, tiny_lrm):
    from stepsal_lens.apps.batch import analyze_traces

    ids = IDS[:4]
    lines = [{"id": i, "question": "Start with 7. Add 5. What is the result?",
              "thinking": f"We start with {k + 7}. Adding 5 to it gives {k + 12}.",
              "summary": f"The result is \\boxed{{{k + 12}}}.", "correct": k % 2 == 0}
             for k, i in enumerate(ids)]
    src = tmp_path / "traces.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    analyze_traces(tiny_lrm, src, tmp_path / "out", model_name="tiny-lrm", progress=False)
    with open(tmp_path / "out" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["id"] for r in rows} == {"'" + i for i in ids}
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    numeric = [c for c in metrics.columns if c not in ("trace", "id", "correct")]
    assert all(metrics[c].dtype.kind in "fi" for c in numeric), metrics.dtypes
    for name in ("compare.csv",):
        text = (tmp_path / "out" / name).read_text()
        assert not any(line.startswith(("=", "+", "@")) for line in text.splitlines())
