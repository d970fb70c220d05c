"""The claim protocol (vaebench.claims) against a real SQLite store: one winner among rivals that
claim a cell at once, a dead runner's claims taken over, a live one respected, a holder that lost
its claim told so."""

from __future__ import annotations

import json
import platform
import threading
import time
from pathlib import Path

import pytest

from faultlib import wait_for
from vaebench import claims, tracking


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

        def contend(c: claims.Claimer) -> None:
            start.wait()
            outcome[c.token] = c.claim(key, key)

        threads = [threading.Thread(target=contend, args=(c,)) for c in rivals]
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
