"""The CLI in process (`main([...])`) and one subprocess smoke run of the console script."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaebench.cli import main


def test_help_is_instant_and_lists_commands(capsys: pytest.CaptureFixture) -> None:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import sys, vaebench.cli; "
                          "print('torch' in sys.modules, 'mlflow' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], "importing the CLI must not import torch or mlflow"
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(cmd in text for cmd in ("run", "ls", "ui"))
    assert time.perf_counter() - t0 < 60  # sanity only; speed is measured in benchmarks/


def test_ls_prints_the_matrix_without_training(tiny_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ls", str(tiny_file)]) == 0
    out = capsys.readouterr().out
    assert "ae-mlp-z2-b1-sum-digits-s0" in out and "vae-mlp-z2-b1-sum-digits-s0" in out
    assert "2 cells in 'tiny'" in out
    assert not (tiny_file.parent / "mlruns.db").exists()


def test_ls_only_filters(tiny_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ls", str(tiny_file), "--only", "model=vae"]) == 0
    out = capsys.readouterr().out
    assert "vae-mlp" in out and "ae-mlp-z2" not in out.replace("vae-mlp-z2", "")


@pytest.mark.parametrize("only,message", [("colour=red", "unknown setting 'colour'"),
                                          ("model=gan", "no cell of the matrix matches"),
                                          ("model", "expected SETTING=VALUE")])
def test_bad_only_is_a_usage_error(tiny_file: Path, capsys: pytest.CaptureFixture, only: str, message: str) -> None:
    assert main(["run", str(tiny_file), "--only", only]) == 2
    assert message in capsys.readouterr().err
    assert not (tiny_file.parent / "mlruns.db").exists()


def test_invalid_file_exits_2_and_logs_nothing(write_yaml, capsys: pytest.CaptureFixture) -> None:
    path = write_yaml("name: x\nmatrix:\n  model: [vea]\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: matrix.model[0]: 'vea'" in err
    assert re.search(r"allowed: ae, (\w+, )*dae, (\w+, )*vae\b", err)  # every family, sorted
    assert "Traceback" not in err
    assert not (path.parent / "mlruns.db").exists()


def test_run_in_process_then_skip(tiny_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tiny_file), "--no-progress"]) == 0
    assert "2 trained" in capsys.readouterr().out
    assert main(["run", str(tiny_file), "--no-progress", "--only", "model=vae"]) == 0
    assert "0 trained (0 resumed), 1 skipped" in capsys.readouterr().out


def test_console_script_smoke_run(tiny_file: Path) -> None:
    exe = shutil.which("vaebench", path=os.path.dirname(sys.executable)) or shutil.which("vaebench")
    assert exe, "the vaebench console script is installed with the package"
    proc = subprocess.run([exe, "run", str(tiny_file), "--no-progress"], cwd=tiny_file.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 trained (0 resumed), 0 skipped (already finished), 0 failed" in proc.stdout
    assert (tiny_file.parent / "mlruns.db").exists()
    module = subprocess.run([sys.executable, "-m", "vaebench", "ls", str(tiny_file)],
                            capture_output=True, text=True, timeout=120)
    assert module.returncode == 0 and "2 cells" in module.stdout


@pytest.mark.slow
def test_ui_serves_the_project_store_on_loopback(tiny_file: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vaebench", "ui", str(tiny_file), "--port", str(port)],
                            cwd=tiny_file.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline, body = time.time() + 90, ""
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body.strip() == "OK", f"MLflow UI did not come up: {proc.poll()}"
        assert (tiny_file.parent / "mlruns.db").exists(), "the UI opened the store next to the file"
        # `vaebench ui` became the server itself: SIGTERM to it stops its worker children too
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        time.sleep(1)
        leftovers = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert not leftovers, f"server processes left behind: {leftovers}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its process group
        except ProcessLookupError:
            pass


def test_unreachable_tracking_server_is_a_clear_error(tiny_file: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert main(["run", str(tiny_file), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port} does not answer" in err and "Traceback" not in err
