"""Real-browser checks: JupyterLab runs tutorial 02 and its explorer reacts to the layer
slider, hover and click, and comes back the same after a page reload with the kernel alive;
a saved executed tutorial opened with a fresh kernel shows the explorer's map (its static
image, or the view rebuilt from saved widget state);
the demo's report.html renders with no console errors.

Runs headless Debian Chromium (``/usr/bin/chromium``) through Playwright (no browser
download). Skipped where Chromium or Playwright is missing, unless
``STEPSAL_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs both), where that is a
failure. Screenshots go to ``$STEPSAL_ARTIFACTS`` (default ``artifacts/``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("STEPSAL_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("STEPSAL_ARTIFACTS", ROOT / "artifacts"))


def _require():
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None:
        missing.append("jupyterlab (pip install jupyterlab)")
    if missing:
        message = "browser test needs " + ", ".join(missing)
        if os.environ.get("STEPSAL_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    _require()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free localhost port, serving a scratch folder with a copy
    of tutorial 02 (saving must not write outputs into the repository); its kernels
    import this checkout."""
    _require()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    home = tmp_path_factory.mktemp("jupyter")
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "tutorials" / TUTORIAL, root / TUTORIAL)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log = open(home / "lab.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter-lab"), "--no-browser", "--allow-root",
         f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--expose-app-in-browser",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"JupyterLab did not start: {(home / 'lab.log').read_text()}")
        yield base, token, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


TUTORIAL = "02_step_saliency_by_hand.ipynb"
#: The explorer's heatmap as drawn: its title and every cell's value.
_HEATMAP = """() => {
    const svg = document.querySelector('svg.stepsal-heatmap');
    if (!svg) return null;
    const cells = [...svg.querySelectorAll('rect.stepsal-cell')];
    return {title: svg.dataset.title, z: cells.map(c => c.dataset.v),
            colorbar: svg.querySelector('.stepsal-colorbar-label').textContent};
}"""


def _open(page, base, token, name):
    # a workspace of its own, reset: no tab restored from an earlier test takes the focus
    page.goto(f"{base}/lab/workspaces/{Path(name).stem}/tree/{name}?token={token}&reset")
    page.wait_for_function("() => window.jupyterapp?.shell.currentWidget?.sessionContext"
                           "?.session?.kernel?.status === 'idle'", timeout=120_000)


def _wait_title(page, prefix, timeout=240_000):
    page.wait_for_function(f"""() => {{
        const svg = document.querySelector('svg.stepsal-heatmap');
        return svg && svg.dataset.title.startsWith({prefix!r});
    }}""", timeout=timeout)


def _static_images(page):
    """Height of each visible explorer static image (a PNG twin shown without widgets)."""
    return page.evaluate("""() => [...document.querySelectorAll('img')]
        .filter(i => i.src.startsWith('data:image/png') && i.offsetParent !== null
                && (i.classList.contains('stepsal-static')
                    || (i.alt || '').startsWith('layer ')))
        .map(i => i.getBoundingClientRect().height)""")


def test_explorer_in_jupyterlab(browser, lab):
    """Run tutorial 02 in JupyterLab: the explorer draws, follows the slider, hovers and
    clicks; then save, reload the page with the kernel still running, and see the same
    map again."""
    base, token, _ = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    _open(page, base, token, TUTORIAL)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    _wait_title(page, "layer 0,")
    before = page.evaluate(_HEATMAP)
    assert before["colorbar"] == "share of the row (row-normalised)"
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget?.sessionContext"
                           "?.session?.kernel?.status === 'idle'", timeout=240_000)
    assert not _static_images(page), "the live explorer must hide its static twin"
    heatmap = page.locator("svg.stepsal-heatmap").first
    heatmap.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "explorer_layer0.png"))

    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    _wait_title(page, "layer 1,", timeout=60_000)
    after = page.evaluate(_HEATMAP)
    assert after["z"] != before["z"]
    heatmap.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "explorer_layer1.png"))
    shot = heatmap.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea-output')]").first
    shot.screenshot(path=str(ARTIFACTS / "explorer.png"))

    # hover a cell: both steps' text; click it: the step pair's tokens
    cell = page.locator("svg.stepsal-heatmap rect.stepsal-cell[data-i='2'][data-j='0']")
    cell.hover()
    page.wait_for_selector(".stepsal-tooltip", state="visible", timeout=10_000)
    hover = page.locator(".stepsal-tooltip").first.text_content()
    assert "query step T2" in hover and "key step Q0" in hover and "Start with" in hover
    cell.click()
    page.wait_for_selector("text=saliency and attention each key token receives",
                           timeout=60_000)
    page.wait_for_selector("text=divided by the pair's maximum", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "explorer_tokens.png"))
    cell_errors = page.locator(".jp-OutputArea-output[data-mime-type="
                               "'application/vnd.jupyter.stderr'] >> text=Traceback").count()
    assert cell_errors == 0
    assert not errors, errors

    # save, reload with the kernel alive: the view comes back from the kernel's state
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty",
                           timeout=60_000)
    page.reload()
    _open(page, base, token, TUTORIAL)
    _wait_title(page, "layer 1,", timeout=120_000)
    again = page.evaluate(_HEATMAP)
    assert again == after
    page.locator("svg.stepsal-heatmap").first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "explorer_reloaded.png"))
    assert not errors, errors
    page.close()


def test_saved_notebook_with_a_fresh_kernel_shows_the_map(browser, lab, tmp_path):
    """An executed, saved tutorial opened in JupyterLab with a new kernel still shows each
    explorer's map. Saved without widget state (JupyterLab's default), the widget's model
    is gone and its static PNG shows; saved with widget state, JupyterLab rebuilds the view
    from that state and it draws the same map (hiding the PNG)."""
    import nbclient
    import nbformat

    base, token, root = lab
    nb = nbformat.read(ROOT / "tutorials" / TUTORIAL, as_version=4)
    env = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env])])
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("PYTHONPATH") if env is None else os.environ.update(PYTHONPATH=env)
    nbformat.write(nb, root / "with_state.ipynb")
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, root / "without_state.ipynb")

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    _open(page, base, token, "without_state.ipynb")
    page.wait_for_function("""() => [...document.querySelectorAll('img')]
        .some(i => i.src.startsWith('data:image/png') && (i.alt || '').startsWith('layer 0,')
              && i.offsetParent !== null)""", timeout=60_000)
    time.sleep(3)  # give a widget every chance to (wrongly) take over
    assert max(_static_images(page)) > 200
    assert page.locator("svg.stepsal-heatmap").count() == 0  # no model: the image shows
    page.locator("img[alt^='layer 0,']").first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "explorer_fresh_kernel.png"))
    page.close()

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    _open(page, base, token, "with_state.ipynb")
    page.wait_for_function("""() => [...document.querySelectorAll('img')]
        .some(i => (i.alt || '').startsWith('layer 0,') && i.offsetParent !== null)
        || !!document.querySelector('svg.stepsal-heatmap[data-title^="layer 0,"]')""",
                           timeout=60_000)
    time.sleep(3)
    drawn = page.evaluate(_HEATMAP)
    assert _static_images(page) or (drawn and drawn["title"].startswith("layer 0,")
                                    and len(drawn["z"]) == 36)
    page.screenshot(path=str(ARTIFACTS / "explorer_fresh_kernel_saved_state.png"))
    page.close()


_PANEL = """import torch
from stepsal_lens import StepSaliency
from stepsal_lens.segments.trace import Step
from stepsal_lens.apps.widgets import compare_groups

def result(segments, seed):
    n = len(segments)
    maps = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(seed)).tril()
    steps = [Step(i, s, f"step {i}", (i, i + 1), (i, i + 1)) for i, s in enumerate(segments)]
    return StepSaliency(maps, [0, 1], steps, torch.arange(n), {"target": "lm"})

compare_groups([result(["question"] + ["thinking"] * k + ["summary"], k) for k in (3, 4)],
        [result(["question"] + ["thinking"] * 5 + ["summary"], 9)])"""


def test_comparison_panel_hides_its_static_twin(browser, lab):
    """A comparison panel run live shows its maps once: the widget's image, not also the
    static twin."""
    import nbformat

    base, token, root = lab
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_PANEL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, root / "panel.ipynb")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    _open(page, base, token, "panel.ipynb")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    try:
        page.wait_for_selector(".widget-image", timeout=120_000)
    finally:
        page.screenshot(path=str(ARTIFACTS / "panel.png"))
    page.wait_for_function("""() => {
        const s = [...document.querySelectorAll('img.stepsal-static')];
        return s.length === 1 && s[0].offsetParent === null;
    }""", timeout=30_000)
    assert page.locator(".widget-image").count() == 2  # maps and curves
    page.close()


def test_demo_report_renders(browser, tmp_path):
    from stepsal_lens.apps.demo import run_demo

    result = run_demo("tiny-lrm", n=4, out=tmp_path / "demo", progress=False)
    page = browser.new_page()
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto((result.out / "report.html").resolve().as_uri())
    page.wait_for_load_state("load")
    assert page.locator("h1").inner_text().startswith("stepsal demo")
    assert page.locator("h2", has_text="StepFlow").count() == 1
    images = page.evaluate("() => [...document.images].map(i => i.naturalWidth)")
    assert images and all(w > 0 for w in images)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    assert not problems, problems
    page.close()


#: Markup an edited results folder could hold; any of it running sets window.__pwned.
_PWN = "<img src=x onerror=\"window.__pwned=(window.__pwned||0)+1\">"
_HOSTILE = f"""import torch
from stepsal_lens import StepSaliency
from stepsal_lens.segments.trace import Step
from stepsal_lens.apps.widgets import explore

PWN = {_PWN!r}
steps = [Step(0, "question", "Q " + PWN, (0, 1), (0, 1)),
         Step(1, PWN, "</style><script>window.__pwned = 99</script>", (1, 2), (1, 2)),
         Step(2, "summary", "'><svg onload=window.__pwned=7>", (2, 3), (2, 3))]
sal = StepSaliency(torch.rand(2, 2, 3, 3).tril(), [0, 1], steps, torch.arange(3),
                   {{"target": "lm", "model": PWN}})
explore(sal)"""


def test_hostile_result_runs_no_script(browser, lab, tmp_path):
    """A result whose segment names and step texts are markup (what an edited steps.json
    held before the loaders refused it), opened with ``explore``: hovering and clicking a
    cell show the markup as text and run none of it; the same strings in a demo report."""
    from types import SimpleNamespace

    import nbformat
    import pandas as pd

    from stepsal_lens.apps.report import write_demo_report

    base, token, root = lab
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_HOSTILE)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, root / "hostile.ipynb")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    _open(page, base, token, "hostile.ipynb")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    _wait_title(page, "layer 0,", timeout=120_000)
    cell = page.locator("svg.stepsal-heatmap rect.stepsal-cell[data-i='2'][data-j='1']")
    cell.hover()
    page.wait_for_selector(".stepsal-tooltip", state="visible", timeout=10_000)
    assert "</style><script>" in page.locator(".stepsal-tooltip").first.text_content()
    cell.click()
    page.wait_for_selector("text=query step 2", timeout=60_000)
    time.sleep(2)  # an onerror fires as soon as the broken image is parsed
    header = page.locator("text=query step 2").first.locator("xpath=..").text_content()
    assert _PWN in header, header
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("img[src='x'], svg[onload]").count() == 0
    page.screenshot(path=str(ARTIFACTS / "hostile_explorer.png"))
    page.close()

    recs = [{"index": 0, "split": _PWN, "correct": True, "answer": _PWN, "prediction": _PWN,
             "question": _PWN, "text": _PWN, "n_steps": 3}]
    result = SimpleNamespace(out=tmp_path, records=recs, saliencies=[], accuracy=1.0,
                             metrics=pd.DataFrame(), comparison=None, stepflow=None,
                             causal=None)
    page = browser.new_page()
    page.goto(write_demo_report(result, model_name=_PWN).resolve().as_uri())
    page.wait_for_load_state("load")
    time.sleep(1)
    assert _PWN in page.locator("h1").inner_text()
    assert page.evaluate("() => window.__pwned") is None
    page.close()

