"""Every tutorial and notebook runs top to bottom on CPU (a real Jupyter kernel)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Notebooks that need a GPU and real weights say so in their metadata; CI skips them.
NOTEBOOKS = sorted([*ROOT.glob("tutorials/*.ipynb"), *ROOT.glob("notebooks/*.ipynb")])


def _needs_gpu(path: Path) -> bool:
    return bool(json.loads(path.read_text()).get("metadata", {}).get("stepsal", {}).get("gpu"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if _needs_gpu(path):
        pytest.skip("needs a GPU and real weights (marked in its metadata)")
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert elapsed < 180, f"{path.name} took {elapsed:.0f} s; tutorials must run in 3 minutes"
    if path.name.startswith("02_"):
        _check_static_export(nb)


def _check_static_export(nb):
    """Saved without widget state (JupyterLab's default), an HTML export still shows the
    explorer: its static image, not an empty widget placeholder."""
    exporter = pytest.importorskip("nbconvert").HTMLExporter()
    nb.metadata.pop("widgets", None)
    html, _ = exporter.from_notebook_node(nb)
    assert '<img alt="layer 0, head mean, row-normalised" src="data:image/png;base64,' in html


def test_there_are_tutorials():
    assert any(p.parent.name == "tutorials" for p in NOTEBOOKS)
