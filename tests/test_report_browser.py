"""report.html in a real browser: headless Chromium renders it offline, every image loads, no console error.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (scripts/setup.sh installs them) and the
``selenium`` test extra; skipped cleanly without them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deepcollapse.experiments import papers
from deepcollapse.experiments.reproduce import Experiment, reproduce

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")  # fmt: skip


def _bad_claim(out: Path, p: dict, ctx: dict) -> dict:
    """A tiny experiment whose claim fails: the page must show it (and its explanation), not hide it."""
    from deepcollapse.experiments.reproduce import make_claim
    from deepcollapse.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(out / "line.png")
    plt.close(fig)
    claim = make_claim("t-fails", source="test", statement="one equals two", measured=1.0, expected=2.0,
                       tolerance=0.1, run="runs/t-bad", if_failed="planted for the browser test")  # fmt: skip
    return {"claims": [claim], "figures": ["line.png"], "settings": p}


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    exps = [e for e in papers.EXPERIMENTS if e.id == "fig1-srg"]
    exps.append(Experiment("t-bad", "test", "a failing claim", "none", _bad_claim, {"quick": {"x": 1}}))
    mp = pytest.MonkeyPatch()
    mp.setattr(papers, "EXPERIMENTS", exps)
    try:
        report = reproduce(out / "r", size="quick")
    finally:
        mp.undo()
    assert report["summary"]["failed"] == 1 and len(report["experiments"]) == 2
    return out / "r" / "report.html"


def test_report_renders_with_every_image_and_no_console_error(report_page: Path, tmp_path: Path) -> None:
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get(report_page.as_uri())
        state = driver.execute_script(
            "return {ready: document.readyState, title: document.title, h1: document.querySelector('h1').innerText,"
            " images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),"
            " fails: Array.from(document.querySelectorAll('tr.fail')).map(r => r.innerText),"
            " external: Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') ||"
            " e.getAttribute('href')).filter(u => !u.startsWith('data:') && !u.startsWith('#'))}"
        )
        logs = driver.get_log("browser")
    finally:
        driver.quit()
    assert state["ready"] == "complete" and state["title"] == "deepcollapse reproduce report"
    assert "1 of 4 claims pass" not in state["h1"] and "3 of 4 claims pass" in state["h1"]
    assert len(state["images"]) == 2  # the SRG spectra and the test's line plot
    assert all(done and w > 0 and h > 0 for done, w, h in state["images"]), state["images"]
    assert state["fails"] and "planted for the browser test" in state["fails"][0]
    assert state["external"] == []  # self-contained: nothing to fetch
    errors = [e for e in logs if e["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors


def test_a_broken_image_is_caught(report_page: Path, tmp_path: Path) -> None:
    """The check above can fail: a page with a corrupt data URI has an image of width 0."""
    from selenium.webdriver.chrome.service import Service

    bad = tmp_path / "bad.html"
    text = report_page.read_text(encoding="utf-8")
    bad.write_text(text.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1), encoding="utf-8")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get(bad.as_uri())
        widths = driver.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    finally:
        driver.quit()
    assert sorted(widths)[0] == 0 and sorted(widths)[1] > 0
