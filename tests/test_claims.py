"""Concurrent runners (vaebench.claims): one winner among rivals that claim a cell at once, a dead
runner's claims taken over, a cell claimed elsewhere left out of its unit and taken over when that
claim expires, a holder that lost its claim told so; and end to end, two real `vaebench run`
processes on one SQLite file and on one `mlflow server`, and a runner killed mid-cell whose cell
the other finishes, every cell FINISHED exactly once."""

from __future__ import annotations

import json
import os
import platform
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest

from faultlib import MlflowServer, Output, checkpoints, runs_of, study_file, vaebench, wait_for
from vaebench import claims, tracking
from vaebench.config import load_experiment
from vaebench.runner import run_experiment


def store(tmp_path: Path) -> tracking.Tracker:
    return tracking.connect(f"sqlite:///{tmp_path / 'mlruns.db'}", "faults")


def fake_claim(tracker: tracking.Tracker, key: str, *, host: str, pid: int, beat_age: float,
               state: str = "held", token: str = "0123456789ab") -> None:
    """The tags another runner (`host`, `pid`) leaves when it claims `key` and beats `beat_age` s ago."""
    client, exp = tracker.client, tracker.experiment_id
    client.set_experiment_tag(exp, f"{claims.ALIVE}{token}",
                              json.dumps({"owner": f"{host}:{pid}:", "at": time.time() - beat_age}))
    client.set_experiment_tag(exp, f"{claims.CLAIM}{key}.{token}",
                              json.dumps({"state": state, "owner": f"{host}:{pid}:", "name": "a cell"}))


def tags(tracker: tracking.Tracker) -> dict[str, str]:
    return tracker.client.get_experiment(tracker.experiment_id).tags


def test_of_rivals_claiming_one_cell_at_once_exactly_one_wins(tmp_path: Path) -> None:
    rivals = [claims.Claimer(store(tmp_path)) for _ in range(4)]
    for round_ in range(3):
        key = f"cell{round_}"
        start = threading.Barrier(len(rivals))
        outcome: dict[str, claims.Holder | None] = {}

        def contend(c: claims.Claimer, key: str, start: threading.Barrier, outcome: dict) -> None:
            start.wait()
            outcome[c.token] = c.claim(key, key)

        threads = [threading.Thread(target=contend, args=(c, key, start, outcome)) for c in rivals]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        winners = [token for token, holder in outcome.items() if holder is None]
        assert len(outcome) == len(rivals) and len(winners) == 1, outcome
        assert {h.token for h in outcome.values() if h is not None} == set(winners)
        held = [k for k in tags(rivals[0].tracker) if k.startswith(f"{claims.CLAIM}{key}.")]
        assert held == [f"{claims.CLAIM}{key}.{winners[0]}"]  # the losers withdrew their intents
        winner = next(c for c in rivals if c.token == winners[0])
        winner.release(key)
        assert not [k for k in tags(rivals[0].tracker) if k.startswith(f"{claims.CLAIM}{key}.")]
    for c in rivals:
        c.close()


@pytest.mark.parametrize("owner", ["another host, silent past the TTL", "this host, its process gone"])
def test_a_dead_runners_claim_is_taken_over_and_cleaned_up(tmp_path: Path, owner: str) -> None:
    tracker = store(tmp_path)
    if owner.startswith("another"):
        fake_claim(tracker, "k", host="elsewhere", pid=1, beat_age=claims.ttl() + 5)
    else:
        fake_claim(tracker, "k", host=platform.node(), pid=2 ** 22 + 7, beat_age=0)  # no such pid
    c = claims.Claimer(tracker)
    assert c.claim("k", "a cell") is None
    assert [k for k in tags(tracker) if "0123456789ab" in k] == []
    c.close()


def test_a_claim_of_a_zombie_or_of_a_reused_pid_is_dead(tmp_path: Path) -> None:
    import subprocess

    zombie = subprocess.Popen(["true"])  # exits at once, not reaped until wait()
    wait_for(lambda: claims._process_stat(zombie.pid) is None or claims._process_stat(zombie.pid)[0] == "Z", 10,
             "the child to exit")
    now = time.time()
    assert not claims.owner_alive(f"{platform.node()}:{zombie.pid}:", now, now)
    zombie.wait()
    assert claims.owner_alive(claims.owner_id(), now, now)
    assert not claims.owner_alive(f"{platform.node()}:{os.getpid()}:1", now, now)  # same pid, another start


def test_a_live_claim_elsewhere_is_respected(tmp_path: Path) -> None:
    tracker = store(tmp_path)
    fake_claim(tracker, "k", host="elsewhere", pid=1, beat_age=0)
    holder = claims.Claimer(tracker).claim("k", "a cell")
    assert holder is not None and holder.state == "held" and str(holder) == "elsewhere pid 1"


def test_a_holder_that_lost_its_claim_is_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(claims.ENV_TTL, "1.2")  # a beat every 0.2 s
    tracker = store(tmp_path)
    c = claims.Claimer(tracker)
    assert c.claim("k", "a cell") is None and not c.lost("k")
    tracker.client.delete_experiment_tag(tracker.experiment_id, f"{claims.CLAIM}k.{c.token}")  # taken over
    wait_for(lambda: c.lost("k"), 10, "the heartbeat to notice")
    c.close()


def test_a_cell_claimed_elsewhere_is_left_out_of_its_unit_then_taken_over_when_the_claim_expires(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(claims.ENV_TTL, "2")
    path = study_file(tmp_path, betas=[1.0, 2.0, 4.0], epochs=2)
    exp = load_experiment(path)
    tracker = tracking.connect(exp.resolved_tracking_uri(), "faults")
    from vaebench.matrix import expand

    first, second, third = expand(exp)
    # The rival beats until our runner says it waits for it (however long the two other cells
    # take on a loaded machine), then falls silent: its claim expires 2 s later and is taken over.
    lines: list[str] = []
    waiting = threading.Event()

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("waiting for"):
            waiting.set()

    def rival() -> None:
        while not waiting.is_set():
            fake_claim(tracker, first.key, host="elsewhere", pid=1, beat_age=0)
            waiting.wait(0.3)

    fake_claim(tracker, first.key, host="elsewhere", pid=1, beat_age=0)
    beating = threading.Thread(target=rival, daemon=True)
    beating.start()
    try:
        summary = run_experiment(exp, pack=3, progress=False, echo=echo)  # one unit of the three cells
    finally:
        waiting.set()
        beating.join(timeout=30)
    assert summary.exit_code == 0 and len(summary.of("trained")) == 3 and not summary.of("claimed")
    text = "\n".join(lines)
    assert f"{first.name}: left out, being trained by elsewhere pid 1" in text
    assert "waiting for 1 cell that other runners are training (elsewhere pid 1)" in text
    cells = runs_of(exp.resolved_tracking_uri())
    assert sorted(r.data.tags["vaebench.run_key"] for r in cells) == sorted([first.key, second.key, third.key])
    assert {r.info.status for r in cells} == {"FINISHED"}
    # the unit trained the two others as a pack of 2; the first came later, alone (the plain loop)
    packs = {r.data.tags["vaebench.run_key"]: r.data.tags.get("vaebench.pack.size") for r in cells}
    assert packs == {first.key: None, second.key: "2", third.key: "2"}
    assert not [k for k in tags(tracker) if k.startswith(claims.CLAIM)]  # all released


# --- real processes ---------------------------------------------------------------------------------


def _two_runners(path: Path, cwd: Path, **env: str) -> list[tuple[int, str, str]]:
    procs = [vaebench(["run", str(path), "--no-progress", "--no-report"], cwd, **env) for _ in range(2)]
    return [(p.wait(timeout=600), *p.communicate()) for p in procs]


def _each_cell_finished_once(uri: str, n: int) -> None:
    cells = runs_of(uri)
    assert len(cells) == n, [(r.info.run_name, r.info.status) for r in cells]
    assert len({r.data.tags["vaebench.run_key"] for r in cells}) == n
    assert {r.info.status for r in cells} == {"FINISHED"}
    client = mlflow.MlflowClient(uri)
    for r in cells:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
        assert sorted(steps) == [0, 1, 2]


@pytest.mark.slow
def test_two_runners_on_one_sqlite_file_train_every_cell_exactly_once(tmp_path: Path) -> None:
    path = study_file(tmp_path, betas=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0], epochs=3, samples=320)
    outcomes = _two_runners(path, tmp_path)
    assert [code for code, _, _ in outcomes] == [0, 0], outcomes
    assert all("Traceback" not in err and "database is locked" not in err for _, _, err in outcomes)
    trained = [int(out.split(" trained (")[0].rsplit("\n", 1)[-1]) for _, out, _ in outcomes]
    assert sum(trained) == 6  # between them; no cell twice
    _each_cell_finished_once(load_experiment(path).resolved_tracking_uri(), 6)


@pytest.mark.slow
def test_two_runners_on_one_tracking_server_train_every_cell_exactly_once(tmp_path: Path) -> None:
    path = study_file(tmp_path, betas=[0.5, 1.0, 2.0, 4.0], epochs=3, samples=320)
    with MlflowServer(tmp_path) as server:
        outcomes = _two_runners(path, tmp_path, MLFLOW_TRACKING_URI=server.url)
        assert [code for code, _, _ in outcomes] == [0, 0], outcomes
        trained = [int(out.split(" trained (")[0].rsplit("\n", 1)[-1]) for _, out, _ in outcomes]
        assert sum(trained) == 4
        _each_cell_finished_once(server.url, 4)


@pytest.mark.slow
def test_a_killed_runners_cell_is_taken_over_and_resumed_by_the_other(tmp_path: Path) -> None:
    # a long cell first, a short one after it: the first runner is still on the long one when the
    # second has done the short one and waits
    path = study_file(tmp_path, betas=[1.0], epochs=600, samples=160,
                      extra="include:\n  - {beta: 2.0, epochs: 2}\n")
    uri = load_experiment(path).resolved_tracking_uri()
    first = vaebench(["run", str(path), "--no-progress", "--no-report"], tmp_path)
    wait_for(lambda: checkpoints(tmp_path), 120, "the first runner's first checkpoint")
    second = Output(vaebench(["run", str(path), "--no-progress", "--no-report"], tmp_path))
    wait_for(lambda: "waiting for 1 cell " in second.text, 120, "the second runner to wait for the first's cell")
    assert first.poll() is None, "the long cell ended too soon for this test"
    os.killpg(first.pid, signal.SIGKILL)  # no chance to clean up: its run stays RUNNING, its claim stays
    first.wait(timeout=30)
    code, out, err = second.wait(timeout=600)
    assert code == 0, out + err
    assert "left out, being trained by" in out and "1 trained (1 resumed)" not in out
    cells = runs_of(uri)
    assert len(cells) == 2 and {r.info.status for r in cells} == {"FINISHED"}
    (taken,) = [r for r in cells if r.data.tags["beta"] == "1.0"]
    assert int(taken.data.tags["vaebench.resumed_from_epoch"]) >= 0  # continued from its checkpoint, same run
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(taken.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(600)), "every epoch logged exactly once"
