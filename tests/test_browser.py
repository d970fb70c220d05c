"""The report and the MLflow UI in a real headless Chromium: Debian's `chromium` (`make test`
installs it with apt when missing), driven by Playwright (the `playwright` package of the test
extras; its own browser downloads are never used). Console errors (CSP violations included), failed
requests, image decoding, the sortable table and the gallery picker are checked in the page itself,
every request a page makes is recorded, and screenshots go to test-output/.

These tests never skip: without chromium they fail and say how to install it."""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from support import Listener, log_runs_with_urls, mlflow_server

from vaebench.config import load_experiment
from vaebench.report import build_report
from vaebench.report.collect import collect
from vaebench.runner import run_experiment

pytestmark = pytest.mark.slow

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
STUDY = """
name: 'browser <script>window.__pwned = 1</script> study'
seeds: [0, 1]
defaults:
  dataset: digits
  epochs: 2
  batch_size: 64
  max_train_samples: 256
  arch_options:
    mlp: {hidden: [32]}
evaluate: {iw_samples: 4}
matrix:
  model: [ae, vae]
  latent_dim: [2, 3]
"""
# Headless, as root, in a container: no sandbox, no GPU, no /dev/shm, and none of Chromium's own
# traffic (component updates, field trials, sync) so that a page's requests are all there is.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync", "--disable-default-apps",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars"]


def chromium_binary() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)  # type: ignore[return-value]
    pytest.fail("chromium is missing: the browser tests need Debian's chromium "
                "(`apt-get update && apt-get install -y chromium`; `make test` installs it), "
                "or point $CHROMIUM at a Chrome/Chromium binary", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chrome = playwright.chromium.launch(executable_path=chromium_binary(), args=FLAGS, timeout=60_000)
        yield chrome
        chrome.close()


@dataclass
class Tab:
    """A page in its own browser context, with what it logged and requested since it opened."""

    page: Page
    errors: list[str] = field(default_factory=list)    # console errors, uncaught exceptions, failed requests
    requests: list[str] = field(default_factory=list)  # every URL the page asked for

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=path, full_page=full_page, timeout=90_000)
        return path


def open_tab(browser: Browser, url: str, width: int = 1400, height: int = 1000) -> Tab:
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    tab = Tab(page)
    page.on("console", lambda m: tab.errors.append(f"console {m.type}: {m.text} ({m.location.get('url')})")
            if m.type in ("error", "assert") else None)
    page.on("pageerror", lambda exc: tab.errors.append(f"exception: {exc}"))
    page.on("requestfailed", lambda r: tab.errors.append(f"request failed: {r.url} ({r.failure})"))
    page.on("request", lambda r: tab.requests.append(r.url))
    page.goto(url, wait_until="load", timeout=60_000)
    return tab


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("browser-study")
    path = folder / "experiments.yaml"
    path.write_text(textwrap.dedent(STUDY).lstrip())
    exp = load_experiment(path)
    summary = run_experiment(exp, progress=False, echo=lambda s: None)
    assert summary.exit_code == 0 and len(summary.of("trained")) == 8
    return {"exp": exp, "report": build_report(exp), "folder": folder}


# --- the report ---------------------------------------------------------------------------------


def test_report_opens_in_chromium_without_errors(browser: Browser, study: dict[str, Any]) -> None:
    tab = open_tab(browser, study["report"].as_uri())
    page = tab.page
    assert tab.errors == []
    assert tab.requests == [study["report"].as_uri()]  # the page itself; everything else is inline
    # escaped names render as text, and nothing injected ran
    assert page.text_content("h1") == study["exp"].name
    assert page.evaluate("typeof window.__pwned") == "undefined"
    # every image decoded
    images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    assert len(images) > 20 and all(done and width > 0 for done, width, _ in images), \
        [alt for done, width, alt in images if not (done and width > 0)]
    tab.screenshot(OUTPUT / "report.png")

    # the results table sorts by a clicked column, missing values last, both ways
    column = """(label) => {
        const heads = Array.from(document.querySelectorAll('#results-table thead th'));
        const i = heads.findIndex(h => h.textContent.startsWith(label));
        return Array.from(document.querySelectorAll('#results-table tbody tr')).map(r => r.cells[i].getAttribute('data-v'));
    }"""
    elbo = page.locator("#results-table thead th").filter(has_text=re.compile(r"^ELBO"))
    elbo.click()
    up = page.evaluate(column, "ELBO")
    numbers = [float(v) for v in up if v]
    assert numbers == sorted(numbers) and len(numbers) == 4 and up[4:] == ["", "", "", ""]
    assert elbo.get_attribute("aria-sort") == "ascending"
    elbo.press("Enter")  # the keyboard works too
    down = [float(v) for v in page.evaluate(column, "ELBO") if v]
    assert down == sorted(numbers, reverse=True)

    # the gallery regroups by another axis, keeping every card
    assert page.locator(".card").count() == 8 and page.locator(".gallery-row").count() == 4  # by model
    page.select_option("#gallery-axis", label="seed")
    assert page.locator(".card").count() == 8 and page.locator(".gallery-row").count() == 4
    assert page.locator(".gallery-row h4").first.text_content().endswith("by seed")
    assert tab.errors == []


def test_a_report_of_runs_full_of_urls_requests_nothing(browser: Browser, tmp_path: Path) -> None:
    with Listener() as listener:
        exp = log_runs_with_urls(tmp_path, listener.url)  # names, params, tags, errors: URLs and markup
        report = build_report(exp)
        tab = open_tab(browser, report.as_uri())
        tab.page.mouse.wheel(0, 100_000)  # lazy content, if any, gets its chance
        tab.page.wait_for_timeout(500)
    assert listener.connections == []
    assert tab.requests == [report.as_uri()] and tab.errors == []
    assert listener.url in tab.page.inner_text("#failed-table")  # shown, as text
    assert tab.page.locator("#failed-table img, #failed-table link, #failed-table div").count() == 0


# --- the MLflow UI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_ui(study: dict[str, Any]) -> Iterator[str]:
    with mlflow_server(study["folder"], study["exp"].resolved_tracking_uri()) as url:
        yield url


def test_mlflow_ui_lists_the_runs_with_axis_columns(browser: Browser, study: dict[str, Any], mlflow_ui: str) -> None:
    data = collect(study["exp"], images=False)
    url = data.experiment_link(mlflow_ui)  # the view `vaebench report` shares: axis values as columns
    assert url and "viewStateShareKey=vaebench" in url
    tab = open_tab(browser, url, width=2000, height=1200)
    names = list(data.runs["run_name"])
    tab.page.wait_for_function("names => names.every(n => document.body.innerText.includes(n))", arg=names,
                               timeout=90_000)
    table = tab.page.evaluate("""() => {
        const heads = Array.from(document.querySelectorAll('[role=columnheader][col-id]'))
            .map(h => [h.getAttribute('col-id'), h.innerText.trim()]);
        const rows = {};
        document.querySelectorAll('[role=row][row-id]').forEach(r => {
            const id = r.getAttribute('row-id').split('.').pop();
            rows[id] = rows[id] || {};
            r.querySelectorAll('[role=gridcell][col-id]').forEach(c => { rows[id][c.getAttribute('col-id')] = c.innerText.trim(); });
        });
        return {heads, rows};
    }""")
    heads = dict(table["heads"])
    for axis in ("model", "latent_dim", "seed"):
        assert heads.get(f"tags.`{axis}`") == axis, json.dumps(table["heads"])
    for _, run in data.runs.iterrows():
        row = table["rows"].get(run["run_id"])
        assert row is not None, f"{run['run_name']} is not a row of the runs table"
        assert row["attributes.`Run Name`"] == run["run_name"]
        assert row["tags.`model`"] == run["model"]
        assert row["tags.`latent_dim`"] == str(run["latent_dim"])
        assert row["tags.`seed`"] == str(run["seed"])
    # the UI is served by the local server alone: nothing from elsewhere
    assert all(u.startswith((mlflow_ui, "data:", "blob:")) for u in tab.requests), \
        [u for u in tab.requests if not u.startswith((mlflow_ui, "data:", "blob:"))]
    tab.screenshot(OUTPUT / "mlflow-ui.png", full_page=False)


def test_report_through_the_tracking_server_links_every_run(browser: Browser, study: dict[str, Any], mlflow_ui: str,
                                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_ui)  # read over MLflow's REST API this time
    exp = load_experiment(study["exp"].path)
    report = build_report(exp, out=tmp_path / "served.html")
    data = collect(exp, images=False)
    html = report.read_text(encoding="utf-8")
    assert f'href="{mlflow_ui}/#/experiments/{data.experiment_id}/runs?viewStateShareKey=vaebench"' in html
    for run_id in data.runs["run_id"]:
        assert f'href="{mlflow_ui}/#/experiments/{data.experiment_id}/runs/{run_id}"' in html
    tab = open_tab(browser, report.as_uri())
    assert tab.errors == [] and tab.requests == [report.as_uri()]
    first = data.runs.iloc[0]
    link = tab.page.locator(f'#results-table a[href$="{first["run_id"]}"]')
    with tab.page.expect_navigation(timeout=60_000):
        link.click()  # a real click on the link, in the same tab
    assert tab.page.url == f"{mlflow_ui}/#/experiments/{data.experiment_id}/runs/{first['run_id']}"
    tab.page.wait_for_function("name => document.body.innerText.includes(name)", arg=first["run_name"],
                               timeout=90_000)
