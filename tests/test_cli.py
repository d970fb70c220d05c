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


def test_a_mapping_selects_and_excludes_as_written_in_the_matrix(write_yaml, capsys: pytest.CaptureFixture) -> None:
    # the cell's value is filled in with defaults (cycles, ratio): the entries given must match,
    # the others are whatever the cell has
    path = write_yaml("name: m\ndefaults: {dataset: digits}\nmatrix:\n"
                      "  kl_anneal: [{schedule: none}, {schedule: linear, epochs: 2}, {schedule: linear, epochs: 4}]\n")
    assert main(["ls", str(path), "--only", "kl_anneal={schedule: linear, epochs: 2}"]) == 0
    out = capsys.readouterr().out
    assert "1 cell in 'm'" in out and "'epochs':2" in out
    assert main(["ls", str(path), "--only", "kl_anneal={schedule: linear}"]) == 0
    assert "2 cells in 'm'" in capsys.readouterr().out
    assert main(["ls", str(path), "--only", "kl_anneal={schedule: linear, epochs: 3}"]) == 2
    assert "no cell has that value" in capsys.readouterr().err
    path.write_text(path.read_text() + "exclude:\n  - {kl_anneal: {schedule: linear, epochs: 4}}\n")
    assert main(["ls", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 cells in 'm'" in out and "'epochs':4" not in out


@pytest.mark.parametrize("only,message", [("colour=red", "unknown setting 'colour'"),
                                          ("model=gan", "--only model=gan: no cell has that value; the matrix has model = ae, vae"),
                                          ("model", "expected SETTING=VALUE")])
def test_bad_only_is_a_usage_error(tiny_file: Path, capsys: pytest.CaptureFixture, only: str, message: str) -> None:
    assert main(["run", str(tiny_file), "--only", only]) == 2
    assert message in capsys.readouterr().err
    assert not (tiny_file.parent / "mlruns.db").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="asks for a device the machine lacks")
def test_a_device_the_machine_lacks_stops_the_sweep_before_it_starts(write_yaml, capsys: pytest.CaptureFixture) -> None:
    # it used to end the sweep with exit 1 and a RuntimeError naming neither the file nor the setting
    import mlflow

    path = write_yaml("name: gpu-only\ndefaults: {dataset: digits, device: cuda}\nmatrix: {model: [ae, vae]}\n")
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: device: 'cuda', in 2 cells to train: device 'cuda' requested but CUDA is not " \
           "available here; use device: auto" in err
    mlflow.set_tracking_uri(f"sqlite:///{path.parent / 'mlruns.db'}")
    assert mlflow.search_runs(experiment_names=["gpu-only"]).empty  # no sweep, no cell run


def test_a_missing_file_is_said_to_be_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: cannot read the experiments file",
                                f"{tmp_path / 'nope.yaml'}: cannot read the file: No such file or directory"]


@pytest.mark.parametrize("flag,value", [("--ray-address", "auto"), ("--ray-gpus", "1"), ("--ray-cpus", "4")])
def test_ray_flags_need_the_ray_executor(tiny_file: Path, capsys: pytest.CaptureFixture, flag: str, value: str) -> None:
    # --ray-cpus alone used to be ignored without a word
    assert main(["run", str(tiny_file), flag, value]) == 2
    assert f"error: {flag} needs --executor ray" in capsys.readouterr().err
    assert not (tiny_file.parent / "mlruns.db").exists()


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "soon"])
def test_a_tune_timeout_that_is_no_time_limit_is_a_usage_error(tiny_file: Path, capsys: pytest.CaptureFixture,
                                                                value: str) -> None:
    # -5 used to start a study that ran no trial, nan one without a limit
    assert main(["tune", str(tiny_file), "--timeout", value]) == 2
    err = capsys.readouterr().err
    assert "argument --timeout:" in err and ("seconds > 0" in err or "is not a number" in err)
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


def console(*args: str, cwd: Path, merged: bool = False) -> subprocess.Popen:
    """`vaebench ARGS` with its output in pipes (`merged`: stderr into stdout's, as `2>&1 | head`)."""
    exe = shutil.which("vaebench", path=os.path.dirname(sys.executable)) or shutil.which("vaebench")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line reaches the pipe when printed
    return subprocess.Popen([exe, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True)


def test_ls_whose_reader_goes_away_stops_quietly(write_yaml) -> None:
    """`vaebench ls big.yaml | head`: no error, no traceback, the exit code of a tool SIGPIPE stopped."""
    path = write_yaml("""
        name: wide
        seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        defaults: {dataset: digits}
        matrix:
          latent_dim: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
          beta: [0.5, 1.0, 2.0, 4.0, 8.0]
        """)  # 1,000 cells: a table far larger than a pipe's buffer
    proc = console("ls", str(path), cwd=path.parent)
    assert proc.stdout.readline().startswith("#")
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == ""


def test_a_sweep_whose_merged_output_closes_exits_as_sigpipe(tiny_file: Path) -> None:
    # `vaebench run ... 2>&1 | head -1`: the message about the closed output cannot be written
    # either; the exit code is still SIGPIPE's (it was 1, from a second BrokenPipeError)
    proc = console("run", str(tiny_file), "--no-progress", cwd=tiny_file.parent, merged=True)
    assert proc.stdout.readline().startswith("experiment 'tiny': 2 cells")
    proc.stdout.close()
    assert proc.wait(timeout=300) == 141


def test_a_sweep_whose_output_closes_stops_and_the_next_run_continues(tiny_file: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    import mlflow

    proc = console("run", str(tiny_file), "--no-progress", cwd=tiny_file.parent)
    assert proc.stdout.readline().startswith("experiment 'tiny': 2 cells, 2 to train")
    proc.stdout.close()  # the first cell's line is the first write that fails
    assert proc.wait(timeout=300) == 141
    err = proc.stderr.read()
    assert "stopped: the output was closed; finished cells are kept" in err and "Traceback" not in err
    mlflow.set_tracking_uri(f"sqlite:///{tiny_file.parent / 'mlruns.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny"])
    parent = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert list(parent["status"]) == ["KILLED"]  # the sweep did not finish
    assert list(runs[runs["tags.mlflow.parentRunId"].notna()]["status"]) == ["FINISHED"]
    assert main(["run", str(tiny_file), "--no-progress"]) == 0
    assert "1 trained (0 resumed), 1 skipped (already finished), 0 failed" in capsys.readouterr().out


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket that process `pid` or any of its descendants listens on
    (Linux: the process tree's socket inodes looked up in /proc/net/tcp and tcp6)."""
    import ipaddress

    tree, grown = {pid}, True
    while grown:
        grown = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                child, parent = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent in tree and child not in tree:
                tree.add(child)
                grown = True
    inodes = set()
    for p in tree:
        for fd in Path(f"/proc/{p}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
            found.add((str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("flags, host", [([], "127.0.0.1"), (["--host", "127.0.0.2"], "127.0.0.2")],
                         ids=["default", "asked"])
def test_ui_serves_the_project_store_on_loopback(tiny_file: Path, flags: list[str], host: str) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vaebench", "ui", str(tiny_file), "--port", str(port), *flags],
                            cwd=tiny_file.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline, body = time.time() + 90, ""
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body.strip() == "OK", f"MLflow UI did not come up: {proc.poll()}"
        assert (tiny_file.parent / "mlruns.db").exists(), "the UI opened the store next to the file"
        # bound to loopback only (by default), or where it was asked to; no other server started
        assert listening(proc.pid) == {(host, port)}
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


def test_ui_on_a_port_in_use_says_so_instead_of_starting(tiny_file: Path) -> None:
    """MLflow's server logs a failed bind among its start-up lines and exits 0; vaebench checks first.
    In a subprocess: were the check missing, `ui` would replace the process it runs in."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "vaebench", "ui", str(tiny_file), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: port {port} on 127.0.0.1 is already in use" in proc.stderr
    assert f"--port {port + 1}" in proc.stderr and "MLflow UI on" not in proc.stdout


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


def test_an_optuna_storage_that_does_not_answer_is_named(tiny_file: Path, capsys: pytest.CaptureFixture) -> None:
    from faultlib import free_port

    path = tiny_file.with_name("tuned.yaml")
    path.write_text(tiny_file.read_text() + "tune:\n  cell: {model: vae}\n  metric: test/elbo\n  direction: maximize\n"
                    "  space: {lr: {low: 1.0e-4, high: 0.01}}\n")
    url = f"postgresql+psycopg://vb:secret@127.0.0.1:{free_port()}/optuna"  # nothing listens there
    assert main(["tune", str(path), "--storage", url]) == 1
    err = capsys.readouterr().err
    assert "error: cannot open the Optuna storage postgresql+psycopg://vb:***@127.0.0.1:" in err, err
    assert "check that its database is running" in err and "secret" not in err and "Traceback" not in err


def test_evaluate_takes_iw_samples_auto_as_the_file_does(tiny_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(tiny_file), "--iw-samples", "auto", "--no-report"]) == 0  # nothing trained yet
    assert "no finished run to evaluate" in capsys.readouterr().out
    assert main(["evaluate", str(tiny_file), "--iw-samples", "0"]) == 2


def test_a_storage_flag_that_is_no_url_is_a_usage_error(tiny_file: Path, capsys: pytest.CaptureFixture) -> None:
    # the same words as tune.storage in the file, not SQLAlchemy's ArgumentError and exit 1
    assert main(["tune", str(tiny_file), "--storage", "foo"]) == 2
    assert "error: --storage: 'foo' is not an Optuna storage URL; e.g. sqlite:///optuna.db" in capsys.readouterr().err
    # a scheme SQLAlchemy has no dialect for (was NoSuchModuleError, exit 1), a SQLite URL with two slashes
    assert main(["tune", str(tiny_file), "--storage", "foo://x"]) == 2
    assert "unsupported scheme 'foo'; allowed: sqlite, postgresql, mysql, mssql, oracle" in capsys.readouterr().err
    assert main(["tune", str(tiny_file), "--storage", "sqlite://optuna.db"]) == 2
    assert "three slashes" in capsys.readouterr().err
    path = tiny_file.with_name("stored.yaml")
    path.write_text(tiny_file.read_text() + "tune:\n  storage: foo://bar\n  cell: {model: vae}\n  space: {lr: {low: 1.0e-4, high: 0.01}}\n")
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and "tune.storage: 'foo://bar': unsupported scheme 'foo'" in err, err
