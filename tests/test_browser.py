"""The report and the MLflow UI in a real headless Chromium (Debian's `chromium`; CI installs it in
.ci/run). Driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: no port, no
extra package): console errors, image decoding, the sortable table and the gallery picker are
checked in the page itself, and screenshots go to test-output/.

These tests never skip: without chromium they fail and say how to install it."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

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
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-default-apps",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars", "--remote-debugging-pipe"]


def chromium_binary() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)  # type: ignore[return-value]
    pytest.fail("chromium is missing: the browser tests need Debian's chromium "
                "(`apt-get update && apt-get install -y chromium`; CI installs it in .ci/run), "
                "or point $CHROMIUM at a Chrome/Chromium binary", pytrace=False)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on fds 3/4 (null-terminated JSON)."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="vaebench-chromium-")  # a fresh profile every time
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_pipes() -> None:  # in the child: fd 3 = commands in, fd 4 = replies out
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = open(Path(self.profile) / "chromium.log", "w")
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     preexec_fn=wire_pipes, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.send("Browser.getVersion", timeout=60)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            for reply in self._drain(0.2):
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)
        raise TimeoutError(f"chromium did not answer {method} within {timeout} s")

    def _drain(self, wait: float) -> list[dict[str, Any]]:
        ready, _, _ = select.select([self._from_chrome], [], [], wait)
        if ready:
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise EOFError(f"chromium exited ({self.proc.poll()}); see {self.log.name}")
            self._buffer += chunk
        out = []
        while b"\0" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\0", 1)
            out.append(json.loads(raw))
        return out

    def pump(self, seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            self.events += self._drain(0.1)

    def open(self, url: str, width: int = 1400, height: int = 1000) -> str:
        """A new tab on `url`, loaded; returns its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        deadline = time.time() + 60
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session for e in self.events):
            assert time.time() < deadline, f"{url} did not load within 60 s"
            self.pump(0.2)
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout: float = 60) -> Any:
        deadline = time.time() + timeout
        while True:
            value = self.evaluate(session, expression)
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression[:200]}")
            self.pump(0.5)

    def console_errors(self, session: str) -> list[str]:
        self.pump(0.3)
        errors = []
        for event in self.events:
            if event.get("sessionId") != session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append("log: " + params["entry"].get("text", "") + " " + params["entry"].get("url", ""))
        return errors

    def screenshot(self, session: str, path: Path, max_height: int = 14000) -> Path:
        size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height), "scale": 1}
        shot = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                         session=session, timeout=90)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
            self.proc.wait(timeout=15)
        except Exception:  # noqa: BLE001 - make sure it is gone, whatever state it is in
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Any:
    chrome = Chromium(chromium_binary())
    yield chrome
    chrome.close()


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


def test_report_opens_in_chromium_without_errors(browser: Chromium, study: dict[str, Any]) -> None:
    session = browser.open(study["report"].as_uri())
    assert browser.console_errors(session) == []
    # escaped names render as text, and nothing injected ran
    assert browser.evaluate(session, "document.querySelector('h1').textContent") == study["exp"].name
    assert browser.evaluate(session, "typeof window.__pwned") == "undefined"
    # every image decoded
    images = browser.evaluate(session, "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    assert len(images) > 20 and all(done and width > 0 for done, width, _ in images), \
        [alt for done, width, alt in images if not (done and width > 0)]
    browser.screenshot(session, OUTPUT / "report.png")

    # the results table sorts by a clicked column, missing values last, both ways
    column = """(label) => {
        const heads = Array.from(document.querySelectorAll('#results-table thead th'));
        const i = heads.findIndex(h => h.textContent.startsWith(label));
        return Array.from(document.querySelectorAll('#results-table tbody tr')).map(r => r.cells[i].getAttribute('data-v'));
    }"""
    click = "Array.from(document.querySelectorAll('#results-table thead th')).find(h => h.textContent.startsWith('ELBO')).click()"
    browser.evaluate(session, click)
    up = browser.evaluate(session, f"({column})('ELBO')")
    numbers = [float(v) for v in up if v]
    assert numbers == sorted(numbers) and len(numbers) == 4 and up[4:] == ["", "", "", ""]
    browser.evaluate(session, click)
    down = [float(v) for v in browser.evaluate(session, f"({column})('ELBO')") if v]
    assert down == sorted(numbers, reverse=True)

    # the gallery regroups by another axis, keeping every card
    before = browser.evaluate(session, "[document.querySelectorAll('.card').length, document.querySelectorAll('.gallery-row').length]")
    assert before == [8, 4]  # by model: 4 rows (latent_dim x seed) of 2 cards
    browser.evaluate(session, """(() => { const s = document.getElementById('gallery-axis');
        s.value = Array.from(s.options).find(o => o.text === 'seed').value; s.dispatchEvent(new Event('change')); })()""")
    after = browser.evaluate(session, "[document.querySelectorAll('.card').length, document.querySelectorAll('.gallery-row').length, "
                                      "document.querySelector('.gallery-row h4').textContent]")
    assert after[:2] == [8, 4] and after[2].endswith("by seed")
    assert browser.console_errors(session) == []


# --- the MLflow UI ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(study: dict[str, Any]) -> Any:
    uri = study["exp"].resolved_tracking_uri()
    port = free_port()
    log = open(study["folder"] / "mlflow-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                             "--default-artifact-root", (study["folder"] / "mlartifacts").as_uri(),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=study["folder"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            # no background job runner (7 huey worker processes) for a read-only UI
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"the MLflow server exited; see {log.name}"
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.read().decode().strip() == "OK":
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"the MLflow server did not answer /health; see {log.name}"
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker, started by this fixture
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        log.close()


def test_mlflow_ui_lists_the_runs_with_axis_columns(browser: Chromium, study: dict[str, Any], mlflow_ui: str) -> None:
    data = collect(study["exp"], images=False)
    url = data.experiment_link(mlflow_ui)  # the view `vaebench report` shares: axis values as columns
    assert url and "viewStateShareKey=vaebench" in url
    session = browser.open(url, width=2000, height=1200)
    names = list(data.runs["run_name"])
    browser.wait_for(session, f"{json.dumps(names)}.every(n => document.body.innerText.includes(n))", timeout=90)
    table = browser.evaluate(session, """(() => {
        const heads = Array.from(document.querySelectorAll('[role=columnheader][col-id]'))
            .map(h => [h.getAttribute('col-id'), h.innerText.trim()]);
        const rows = {};
        document.querySelectorAll('[role=row][row-id]').forEach(r => {
            const id = r.getAttribute('row-id').split('.').pop();
            rows[id] = rows[id] || {};
            r.querySelectorAll('[role=gridcell][col-id]').forEach(c => { rows[id][c.getAttribute('col-id')] = c.innerText.trim(); });
        });
        return {heads, rows};
    })()""")
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
    browser.screenshot(session, OUTPUT / "mlflow-ui.png", max_height=1200)


def test_report_through_the_tracking_server_links_every_run(browser: Chromium, study: dict[str, Any], mlflow_ui: str,
                                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_ui)  # read over MLflow's REST API this time
    exp = load_experiment(study["exp"].path)
    report = build_report(exp, out=tmp_path / "served.html")
    data = collect(exp, images=False)
    html = report.read_text(encoding="utf-8")
    assert f'href="{mlflow_ui}/#/experiments/{data.experiment_id}/runs?viewStateShareKey=vaebench"' in html
    for run_id in data.runs["run_id"]:
        assert f'href="{mlflow_ui}/#/experiments/{data.experiment_id}/runs/{run_id}"' in html
    session = browser.open(report.as_uri())
    assert browser.console_errors(session) == []
    first = data.runs.iloc[0]
    link = browser.evaluate(session, f"document.querySelector('#results-table a[href$=\"{first['run_id']}\"]').href")
    run_page = browser.open(link)
    browser.wait_for(run_page, f"document.body.innerText.includes({json.dumps(first['run_name'])})", timeout=90)
