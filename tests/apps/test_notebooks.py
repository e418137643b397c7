"""Every tutorial and notebook runs top to bottom on CPU (a real Jupyter kernel), shows all
its figures, stays small when saved, exports to an HTML page that shows its explorers
offline, and says only what its outputs show.

Tutorials are stored without outputs; each test executes one (widget state stored, as
JupyterLab saves it) and checks the executed notebook. The kernel imports this checkout
(``PYTHONPATH``), whatever is installed. After the notebook's own cells, a probe cell reads
the numbers its text relies on; ``CLAIMS`` asserts them, so a change that makes the text
false fails here.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Notebooks that need a GPU and real weights say so in their metadata; CI skips them.
NOTEBOOKS = sorted([*ROOT.glob("tutorials/*.ipynb"), *ROOT.glob("notebooks/*.ipynb")])
#: A saved executed notebook (outputs and widget state) must stay under this size.
MAX_BYTES = 2_000_000
#: Cells whose source draws a figure or an explorer: each must leave an image output.
FIGURE = re.compile(r"\bplot_\w+\(|\bexplore\(|\bcompare_view\(|\bcompare_stepflow\(|"
                    r"\bplt\.show\(")


def _needs_gpu(path: Path) -> bool:
    return bool(json.loads(path.read_text()).get("metadata", {}).get("stepsal", {}).get("gpu"))


# ---- what each notebook's text claims -------------------------------------------------------
# name prefix -> (probe expression evaluated in the kernel after the last cell, check)

def _claims_01(c):
    # the trap drops each step's operation; the fixed pattern loses nothing and finds
    # the paper's four thinking steps; the newline splitter makes one
    assert "plus" in c["lost_trap"] and "times" in c["lost_trap"]
    assert c["lost_fixed"] == ""
    assert c["fixed_steps"] == c["paper_steps"] and len(c["paper_steps"]) == 4
    assert c["newline_steps"] == 1


def _claims_02(c):
    assert c["max_diff"] < 1e-7
    assert 1e-9 < c["saliency_max"] < 1e-7  # "around 1e-8 here"
    # scaled, tokens differ clearly; the top ones are punctuation and connectives
    # (the first ".", "is", "then"), the operand "3" under half the maximum
    top = [t.strip() for t in c["top_tokens"]]
    assert top[:3] == [".", "is", "then"], top
    assert c["min_value"] < 0.1 and c["three"] < 0.5


def _claims_03(c):
    # lock-in higher in correct traces at every layer, p < 0.05 at each
    assert all(d > 0 and p < 0.05 for d, p in c["lock_in"]), c["lock_in"]
    # thinking share higher in wrong traces at layers 0 and 1 (p < 0.05); weaker deeper
    # (none at layer 2, p about 0.05 at layer 3), never the other way
    share = c["thinking_share"]
    assert all(d < 0 and p < 0.05 for d, p in share[:2]), share
    assert share[2][1] > 0.5 and share[3][0] < 0 and 0.03 < share[3][1] < 0.1, share
    # every wrong trace has 8 or 9 operations, every correct one 2 to 7: no shared length
    assert set(c["wrong_ops"]) <= {8, 9} and max(c["right_ops"]) <= 7
    assert c["n_traces"] * c["n_layers"] == c["n_rows"]
    # lock-in falls with length among correct traces; the wrong traces sit near the trend
    assert c["slope"] < 0
    assert abs(c["gap"]) < abs(c["raw"]) / 2, (c["gap"], c["raw"])
    assert c["no_empty_bins"]


def _claims_04(c):
    assert c["identical"]  # the one question's text is unchanged at the paper's defaults
    assert c["triggers"] > 0 and c["injections"] > 0  # yet the hooks fired
    changed, acc = c["changed"], c["accuracy"]
    assert changed["baseline"] == 0
    assert changed["paper defaults"] == 1  # "one of the 32 generations and no grade"
    assert acc["paper defaults"] == acc["baseline"] and c["paper_discordant"] == [0, 0]
    assert changed["tau_max 0.5"] == 32 and acc["tau_max 0.5"] <= 0.1  # every one; collapse
    assert c["on_same_steps"] and c["on_text_is_flow"]


CLAIMS = {
    "01_": ("""{"lost_trap": uncovered(trap), "lost_fixed": uncovered(fixed),
        "fixed_steps": [fixed.steps[i].text for i in fixed.steps_in("thinking")],
        "paper_steps": [trace.steps[i].text for i in trace.steps_in("thinking")],
        "newline_steps": len(by_line.steps_in("thinking"))}""", _claims_01),
    "02_": ("""{"max_diff": (sal.maps - by_hand).abs().max().item(),
        "saliency_max": values["saliency_max"],
        "top_tokens": [values["tokens"][i] for i in
                       sorted(range(len(values["tokens"])),
                              key=lambda i: -values["saliency"][i])[:4]],
        "min_value": float(values["saliency"].min()),
        "three": float(values["saliency"][[t.strip() for t in values["tokens"]].index("3")])}""",
            _claims_02),
    "03_": ("""{"lock_in": [(r.diff, r.p) for r in table[table.metric == "lock_in"].itertuples()],
        "thinking_share": [(r.diff, r.p) for r in
                           table[table.metric == "thinking_share"].itertuples()],
        "wrong_ops": sorted(set(traces[~traces.correct].n_ops.tolist())),
        "right_ops": sorted(set(traces[traces.correct].n_ops.tolist())),
        "n_traces": len(results), "n_layers": model.cfg.n_layers, "n_rows": len(metrics),
        "slope": float(fit[0]), "gap": float(gap), "raw": float(raw),
        "no_empty_bins": all(not np.isnan(compare_view(right, wrong).group_map(g)).any()
                             for g in ("correct", "wrong"))}""", _claims_03),
    "04_": ("""{"identical": flow.text == plain.text,
        "triggers": flow.stats["oeb"]["triggers"], "injections": flow.stats["smi"]["injections"],
        "changed": dict(zip(summary.setting, summary["generations changed"].tolist())),
        "accuracy": dict(zip(summary.setting, summary.accuracy.tolist())),
        "paper_discordant": summary[summary.setting == "paper defaults"][
            ["right only with it", "right only without"]].iloc[0].tolist(),
        "on_same_steps": [s.text for s in on.steps] == [s.text for s in off.steps],
        "on_text_is_flow": on.token_ids.tolist() == flow.trace(model).token_ids.tolist()}""",
            _claims_04),
}


def _claims_for(path: Path):
    return next((v for k, v in CLAIMS.items() if path.name.startswith(k)), None)


def _execute(path: Path, tmp_path: Path, monkeypatch):
    """Run a notebook in a fresh kernel that imports this checkout; returns the executed
    notebook (with widget state, as JupyterLab saves it), the seconds it took and the
    probe's answer."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(path, as_version=4)
    claims = _claims_for(path)
    if claims:
        nb.cells.append(nbformat.v4.new_code_cell(
            "import json as _json, stepsal_lens as _sl\n"
            f"print(_json.dumps({{'file': _sl.__file__, **{claims[0]}}}, default=float))"))
    start = time.perf_counter()
    timeout = int(os.environ.get("STEPSAL_CELL_TIMEOUT", "300"))  # raise on a loaded machine
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    elapsed = time.perf_counter() - start
    probe = None
    if claims:
        cell = nb.cells.pop()
        probe = json.loads("".join(o.get("text", "") for o in cell.outputs
                                   if o.get("name") == "stdout"))
        assert probe.pop("file").startswith(str(ROOT)), "the kernel imported another checkout"
    return nb, elapsed, probe


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    if _needs_gpu(path):
        pytest.skip("needs a GPU and real weights (marked in its metadata)")
    nb, elapsed, probe = _execute(path, tmp_path, monkeypatch)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors

    # every figure cell shows an image (in the notebook itself, not only in a live widget)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and FIGURE.search(cell.source):
            kinds = [k for o in cell.outputs for k in o.get("data", {})]
            assert "image/png" in kinds, f"{path.name} cell {i} shows no image: {kinds}"

    # saved (outputs + widget state) it stays small
    size = len(nbformat.writes(nb).encode())
    assert size < MAX_BYTES, f"{path.name} saves to {size / 1e6:.1f} MB"
    out = os.environ.get("STEPSAL_EXECUTED")  # keep the executed copy (browser tests, docs)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(out) / path.name)

    # formulas are plain text: MathJax comes from a CDN, so offline LaTeX stays raw
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            assert not re.search(r"\$[^$\s][^$]*\$", cell.source), cell.source[:80]

    _check_static_export(nb)
    check = _claims_for(path)
    if check:
        check[1](probe)
    limit = float(os.environ.get("STEPSAL_NOTEBOOK_SECONDS", "180"))
    assert elapsed < limit, f"{path.name} took {elapsed:.0f} s; tutorials must run in 3 minutes"


def _check_static_export(nb):
    """An HTML export shows every explorer's static image, with widget state (the widget
    manager would come from a CDN, so offline it draws nothing) and without it."""
    exporter = pytest.importorskip("nbconvert").HTMLExporter()
    n_explorers = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                      if "stepsal-static" in o.get("data", {}).get("text/html", ""))
    for keep_state in (True, False):
        copy = json.loads(json.dumps(nb))
        if not keep_state:
            copy["metadata"].pop("widgets", None)
        import nbformat

        html, _ = exporter.from_notebook_node(nbformat.from_dict(copy))
        shown = re.findall(r'<img alt="[^"]*" class="stepsal-static[^"]*" '
                           r'src="data:image/png;base64,', html)
        assert len(shown) == n_explorers, (keep_state, len(shown), n_explorers)


def test_there_are_tutorials():
    assert any(p.parent.name == "tutorials" for p in NOTEBOOKS)


def test_tutorials_are_stored_without_outputs():
    """The repository keeps tutorials clean (CI executes them); outputs would go stale."""
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        outputs = [c for c in nb["cells"] if c.get("outputs")]
        assert not outputs and "widgets" not in nb["metadata"], path.name
