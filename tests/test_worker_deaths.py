"""Worker processes that die under a sweep (killed, or taken by the OOM killer): a dead evaluation
worker or `--jobs` worker costs its pool, not the sweep, and no cell is left failed for it; and
the workers of a sweep that was itself killed do not outlive it; an interrupt keeps what the
workers finished, and says so. Real processes, real signals,
real SQLite stores in tmp_path."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from faultlib import Output, runs_of, study_file, vaebench, wait_for
from vaebench import tracking
from vaebench.attempts import ENVIRONMENT, failure_kind
from vaebench.config import load_experiment
from vaebench.runner import run_experiment

pytestmark = pytest.mark.slow


def test_a_worker_that_died_is_an_environment_failure_that_the_next_run_resumes() -> None:
    assert failure_kind(BrokenProcessPool("A child process terminated abruptly")) == ENVIRONMENT


def _pool_workers() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("SpawnProcess")]


def _killing_at_first_result(lines: list[str]):
    """An echo that records the lines and, at the first cell's result, kills every pool worker."""
    killed: list[int] = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("[1/") and not killed:
            for worker in _pool_workers():
                os.kill(worker.pid, signal.SIGKILL)
                killed.append(worker.pid)
            assert killed, "no pool worker to kill"

    return echo, killed


def _one_finished_run_per_cell(uri: str, cells: int) -> list:
    runs = runs_of(uri)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags[tracking.TAG_RUN_KEY] for r in finished) == \
        sorted({r.data.tags[tracking.TAG_RUN_KEY] for r in runs})
    # a run the dead worker had opened before its first checkpoint is closed and trained anew
    failed = [r.data.tags.get(tracking.TAG_ERROR) for r in runs if r.info.status == "FAILED" and
              not r.data.tags.get(tracking.TAG_ERROR, "").startswith("ended before its first checkpoint")]
    assert len(finished) == cells and not failed, failed
    assert all("test/elbo" in r.data.metrics for r in finished)
    return finished


def test_a_dead_evaluation_worker_is_replaced_and_its_evaluations_run_again(tmp_path: Path) -> None:
    betas = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    path = study_file(tmp_path, epochs=30, betas=betas, samples=320, figures=True)
    path.write_text(path.read_text().replace("clustering: false", "clustering: true"))
    exp = load_experiment(path)
    lines: list[str] = []
    echo, killed = _killing_at_first_result(lines)
    # one cell a unit: a cell's result comes out right after the next cell's evaluation was sent
    # to the pool, so the pool's one worker dies with an evaluation in hand or queued
    summary = run_experiment(exp, pack="off", eval_workers=1, progress=False, echo=echo)
    assert killed
    assert summary.exit_code == 0 and len(summary.of("trained")) == len(betas), lines
    assert any("an evaluation worker process died" in line for line in lines), lines
    finished = _one_finished_run_per_cell(exp.resolved_tracking_uri(), len(betas))
    assert all("test/kmeans_acc" in r.data.metrics for r in finished)


def test_a_dead_training_worker_costs_no_other_unit(tmp_path: Path) -> None:
    path = study_file(tmp_path, epochs=4, betas=[0.5, 1.0, 2.0, 4.0], samples=320)
    exp = load_experiment(path)
    lines: list[str] = []
    echo, killed = _killing_at_first_result(lines)
    summary = run_experiment(exp, jobs=2, progress=False, echo=echo)
    assert killed
    assert summary.exit_code == 0, lines
    assert len(summary.of("trained", "resumed")) == 4
    assert any("a worker process died" in line for line in lines)
    _one_finished_run_per_cell(exp.resolved_tracking_uri(), 4)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # ended; only its parent's reaping is left


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc (Linux)")
@pytest.mark.parametrize("flags", [["--jobs", "2"], ["--eval-workers", "1"]], ids=["jobs", "eval-workers"])
def test_the_workers_of_a_killed_sweep_end_with_it(tmp_path: Path, flags: list[str]) -> None:
    path = study_file(tmp_path, epochs=30, betas=[0.5, 1.0, 2.0, 4.0], samples=320)
    path.write_text(path.read_text().replace("clustering: false", "clustering: true"))
    proc = vaebench(["run", str(path), "--no-progress", "--no-report", *flags], tmp_path)
    out = Output(proc)
    workers: list[int] = []
    try:
        workers = wait_for(lambda: [c for c in _children(proc.pid) if "spawn_main" in
                                    Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")],
                           120, "the sweep's worker processes")
        wait_for(lambda: "unit" in out.text, 120, "the sweep's first line")
        time.sleep(2)  # the workers are at work (or waiting for it)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: all(_gone(w) for w in workers), 20, f"workers {workers} to end after their sweep")
    finally:
        for pid in [proc.pid, *_children(proc.pid), *workers]:  # none are left behind, whatever failed
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_an_interrupt_lets_the_evaluations_in_hand_finish_their_cells(tmp_path: Path) -> None:
    path = study_file(tmp_path, epochs=3, betas=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0], samples=320, figures=True)
    exp = load_experiment(path)
    uri = exp.resolved_tracking_uri()
    calls = 0

    def two_cells_trained() -> bool:  # Ctrl-C in the third cell: the first two went to the pool
        nonlocal calls
        calls += 1
        return calls % 10 == 0 and len(runs_of(uri)) >= 3

    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, pack="off", eval_workers=1, progress=False, echo=lambda _: None,
                       should_stop=two_cells_trained)
    assert len(runs_of(uri)) < 6  # it stopped early
    runs = runs_of(uri)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert finished, "the evaluation the worker had in hand finished its cell"
    assert all("test/elbo" in r.data.metrics for r in finished)
    assert not [r.info.run_name for r in killed if "test/elbo" in r.data.metrics]  # evaluated, yet KILLED
    assert len(finished) + len(killed) == len(runs)
    # the rerun evaluates only the cells that were not: each cell ends with one FINISHED run
    assert run_experiment(exp, eval_workers=1, progress=False, echo=lambda _: None).exit_code == 0
    _one_finished_run_per_cell(uri, 6)


def test_an_interrupt_with_worker_processes_reports_every_cell_that_finished(tmp_path: Path) -> None:
    path = study_file(tmp_path, epochs=20, betas=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0], samples=320)
    exp = load_experiment(path)
    uri = exp.resolved_tracking_uri()
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C once two cells are through
        run_experiment(exp, jobs=2, progress=False, echo=lines.append,
                       should_stop=lambda: sum(line.startswith("[") for line in lines) >= 2)
    finished = {r.info.run_name for r in runs_of(uri) if r.info.status == "FINISHED"}
    shown = {line.split("] ", 1)[1].split(":", 1)[0] for line in lines if ": trained in" in line}
    assert len(finished) >= 2 and finished == shown, lines
    assert "RUNNING" not in {r.info.status for r in runs_of(uri)}
