"""Real-browser checks: JupyterLab runs tutorial 02 and its explorer reacts to the layer
slider; the demo's report.html renders with no console errors.

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
    """A JupyterLab server on a free localhost port, serving the repository."""
    _require()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    home = tmp_path_factory.mktemp("jupyter")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    log = open(home / "lab.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter-lab"), "--no-browser", "--allow-root",
         f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={ROOT}", "--expose-app-in-browser",
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
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _heatmap_state(page):
    return page.evaluate("""() => {
        const el = [...document.querySelectorAll('.js-plotly-plot')]
            .find(e => e.data && e.data[0] && e.data[0].type === 'heatmap');
        return el ? {title: el.layout.title.text, z: el.data[0].z} : null;
    }""")


def test_explorer_in_jupyterlab(browser, lab):
    base, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{base}/lab/tree/tutorials/02_step_saliency_by_hand.ipynb?token={token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session",
                           timeout=120_000)
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext"
                           ".session.kernel.status === 'idle'", timeout=120_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function("""() => [...document.querySelectorAll('.js-plotly-plot')]
        .some(e => e.data && e.data[0] && e.data[0].type === 'heatmap')""", timeout=240_000)
    before = _heatmap_state(page)
    assert before["title"].startswith("layer 0,")
    heatmap = page.locator(".js-plotly-plot").first
    heatmap.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "explorer_layer0.png"))

    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function("""() => [...document.querySelectorAll('.js-plotly-plot')]
        .some(e => e.data && e.data[0] && e.data[0].type === 'heatmap'
              && e.layout.title.text.startsWith('layer 1,'))""", timeout=60_000)
    after = _heatmap_state(page)
    assert after["z"] != before["z"]
    heatmap.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "explorer_layer1.png"))
    shot = heatmap.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea-output')]").first
    shot.screenshot(path=str(ARTIFACTS / "explorer.png"))

    # hover a cell: both steps' text; click it: the step pair's tokens (circuitsvis)
    x, y = page.evaluate("""() => {
        const el = [...document.querySelectorAll('.js-plotly-plot')]
            .find(e => e.data && e.data[0] && e.data[0].type === 'heatmap');
        const fl = el._fullLayout, box = el.getBoundingClientRect();
        return [box.left + fl.xaxis._offset + fl.xaxis.l2p(0),
                box.top + fl.yaxis._offset + fl.yaxis.l2p(2)];
    }""")
    page.mouse.move(x, y)
    page.wait_for_selector(".hoverlayer .hovertext", timeout=10_000)
    hover = page.locator(".hoverlayer .hovertext").first.text_content()
    assert "query step 2" in hover and "key step 0" in hover and "Start with" in hover
    page.mouse.click(x, y)
    page.wait_for_selector("text=saliency and attention each key token receives",
                           timeout=60_000)
    # the circuitsvis view renders offline (inlined JavaScript): the question's tokens
    page.wait_for_function("""() => [...document.querySelectorAll('[id^="circuits-vis-"]')]
        .some(e => e.innerText.includes('Start'))""", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "explorer_tokens.png"))
    cell_errors = page.locator(".jp-OutputArea-output[data-mime-type="
                               "'application/vnd.jupyter.stderr'] >> text=Traceback").count()
    assert cell_errors == 0
    assert not errors, errors
    page.close()


def test_demo_report_renders(browser, tmp_path):
    from stepsal_lens.demo import run_demo

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
