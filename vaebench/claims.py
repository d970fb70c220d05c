"""Claims: which runner trains which cell, recorded in the tracking store, so that two `vaebench
run` processes on one SQLite file, machines sharing one tracking server, or the tasks of a
cluster never train the same cell at once, and finish the matrix between them.

The records. MLflow has no compare-and-set, but it has a set of registers that any runner can
write and read back whole: the experiment's tags. Every runner *process* draws a random token
and only ever writes its own tags:

    vaebench.alive.<token>           {"owner": "host:pid:start", "at": unix time}   its heartbeat
    vaebench.claim.<run key>.<token> {"state": "intent" | "held", "owner": ..., "name": cell}

Claiming a cell (`claim`):

1. beat: write the alive tag (so that nobody takes the intent below for a dead runner's);
2. write my claim tag, state `intent`;
3. read all the experiment's tags. The other claim tags of this cell whose owner is alive are
   rivals; an owner is alive while its alive tag is younger than the TTL and, when it is on this
   host, while its process exists. A dead owner's tags are deleted on the way;
4. no rival: set my tag to `held`; the cell is mine. Otherwise delete my tag; if a rival holds
   the cell, it is taken (the runner leaves it out of its unit); if rivals only intend, pause a
   random, growing time and go back to 2.

Why no two runners can both win. Each reads after its own write. If A and B both won, A's read
saw no B and B's read saw no A, so A read before B wrote and B read before A wrote; with each
write before its own read that is a cycle in time (A.write < A.read < B.write < B.read <
A.write). The store is linearizable for this: SQLite serialises writers, and a database behind a
tracking server commits each call before it answers. Two rivals that see each other both back
off, with random pauses, so one soon passes alone.

Why not "create, then the earliest claim wins". An earliest claim needs a clock everyone agrees
on, and the only times MLflow records are the clients' own (a run's start_time is sent by the
client). A runner that stamps its claim first but whose request lands second sees the other's
claim as the later one and takes the cell, while the other, which read before that request
landed, saw itself alone and took it too. Backing off needs no clock to be safe.

The lease. While a runner holds claims, a thread beats every TTL/6 seconds (the TTL is 60 s;
VAEBENCH_CLAIM_TTL sets it). A runner that dies stops beating: after the TTL (at once on the same
host, where its process is seen gone) its claims are dead, and the next runner that claims the
cell takes it over and resumes its run from the last checkpoint. Expiry compares the holder's
clock with the reader's, so machines must agree within a fraction of the TTL (NTP does). Each
beat also reads the tags back: a holder whose claim tag is gone (it stalled past the TTL and
another runner took over) has lost the cell, `lost(key)` says so, and the trainer stops writing
to that run. A claim is released (its tag deleted) once the run's final status is written.

Owns: the claim and alive tags, the heartbeat thread. Never touches runs: what to do with a
claimed cell is vaebench.units' business (with vaebench.attempts).
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from vaebench import tracking

ENV_TTL = "VAEBENCH_CLAIM_TTL"
TTL_S = 60.0  # a claim whose owner has not beaten for this long is dead
CLAIM = "vaebench.claim."
ALIVE = "vaebench.alive."
STALE_ALIVE = 10  # alive tags older than this many TTLs are deleted by whoever reads them
PAUSE_S = (0.05, 2.0)  # a runner that met rivals which only intend waits up to this (doubling)


def ttl() -> float:
    try:
        return max(1.0, float(os.environ.get(ENV_TTL) or TTL_S))
    except ValueError:
        return TTL_S


@dataclass(frozen=True)
class Holder:
    """Another runner's claim on a cell."""

    token: str
    owner: str  # host:pid:start
    state: str  # intent | held
    name: str
    at: float | None  # its owner's last beat (its clock), None: no beat seen

    def __str__(self) -> str:
        host, pid, _ = _split_owner(self.owner)
        return f"{host} pid {pid}"

    @property
    def alive(self) -> bool:
        return owner_alive(self.owner, self.at, time.time())


def _split_owner(owner: str) -> tuple[str, str, str]:
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    return host, pid, start


def _process_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process `pid` (Linux), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def owner_id() -> str:
    stat = _process_stat(os.getpid())
    return f"{platform.node()}:{os.getpid()}:{stat[1] if stat else ''}"


def owner_alive(owner: str, at: float | None, now: float) -> bool:
    if at is None or now - at > ttl():
        return False
    host, pid, start = _split_owner(owner)
    if host != platform.node():
        return True  # another machine: its beats are all we know
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OSError):
        return True  # someone else's process, or no pid: trust the beats
    stat = _process_stat(int(pid))
    if stat is None:
        return True
    state, now_start = stat
    return state != "Z" and (not start or now_start == start)  # not a zombie, not a reused pid


def holders_in(tags: dict[str, str], key: str) -> list[Holder]:
    """The claims on `key` among the experiment's tags, with their owners' last beats."""
    prefix = f"{CLAIM}{key}."
    out = []
    for name, value in tags.items():
        if not name.startswith(prefix):
            continue
        token = name[len(prefix):]
        claim, beat = _parse(value), _parse(tags.get(ALIVE + token, ""))
        at = beat.get("at")
        out.append(Holder(token, str(claim.get("owner", "")), str(claim.get("state", "")),
                          str(claim.get("name", "")), float(at) if isinstance(at, (int, float)) else None))
    return out


def _parse(value: str) -> dict[str, Any]:
    try:
        out = json.loads(value)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


class Claimer:
    """This process's claims in one experiment (one token, one heartbeat thread)."""

    def __init__(self, tracker: tracking.Tracker):
        self.tracker = tracker
        self.token = uuid.uuid4().hex[:12]
        self.owner = owner_id()
        self.held: dict[str, str] = {}  # run key -> cell name
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # --- the tags ---

    def _set(self, key: str, value: dict[str, Any]) -> None:
        self.tracker.client.set_experiment_tag(self.tracker.experiment_id, key, json.dumps(value))

    def _delete(self, key: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.tracker.client.delete_experiment_tag(self.tracker.experiment_id, key)
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise

    def _tags(self) -> dict[str, str]:
        return dict(self.tracker.client.get_experiment(self.tracker.experiment_id).tags)

    def _mine(self, key: str) -> str:
        return f"{CLAIM}{key}.{self.token}"

    def beat(self) -> None:
        self._set(ALIVE + self.token, {"owner": self.owner, "at": time.time()})

    # --- claiming ---

    def claim(self, key: str, name: str) -> Holder | None:
        """Claim the cell `key`: None when it is now this process's, else the claim that holds it."""
        if key in self.held:
            return None
        self.beat()
        mine = self._mine(key)
        pause = PAUSE_S[0]
        while True:
            self._set(mine, {"state": "intent", "owner": self.owner, "name": name})
            tags = self._tags()
            rivals = [h for h in holders_in(tags, key) if h.token != self.token]
            live = [h for h in rivals if h.alive]
            self._collect(tags, key, [h for h in rivals if not h.alive])
            if not live:
                self._set(mine, {"state": "held", "owner": self.owner, "name": name})
                with self._lock:
                    self.held[key] = name
                    self._lost.discard(key)
                self._start_beating()
                return None
            self._delete(mine)
            holding = [h for h in live if h.state == "held"]
            if holding:
                return holding[0]
            time.sleep(random.uniform(0, pause))
            pause = min(pause * 2, PAUSE_S[1])

    def _collect(self, tags: dict[str, str], key: str, dead: list[Holder]) -> None:
        """Delete dead owners' tags for this cell, and alive tags long stale."""
        for h in dead:
            self._delete(f"{CLAIM}{key}.{h.token}")
            if ALIVE + h.token in tags:
                self._delete(ALIVE + h.token)
        now = time.time()
        for name, value in tags.items():
            if name.startswith(ALIVE) and name != ALIVE + self.token:
                at = _parse(value).get("at")
                if not isinstance(at, (int, float)) or now - at > STALE_ALIVE * ttl():
                    self._delete(name)

    def release(self, key: str) -> None:
        """The cell's run has its final status: let others have the cell."""
        with self._lock:
            held = self.held.pop(key, None)
            self._lost.discard(key)
        if held is not None:
            self._delete(self._mine(key))

    def lost(self, key: str) -> bool:
        with self._lock:
            return key in self._lost

    # --- the heartbeat ---

    def _start_beating(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._beat_loop, name="vaebench-claims", daemon=True)
            self._thread.start()

    def _beat_loop(self) -> None:
        while True:
            time.sleep(ttl() / 6)
            with self._lock:
                held = list(self.held)
            if not held:
                continue
            try:
                self.beat()
                tags = self._tags()
            except Exception:  # noqa: BLE001 - the store is away: beat again next time
                continue
            with self._lock:
                self._lost |= {k for k in held if k in self.held and self._mine(k) not in tags}

    def close(self, timeout: float = 5.0) -> None:
        """Whatever is still held goes, and the heartbeat tag: best effort, for at most `timeout`
        seconds (a store that is away must not hold up the exit; the TTL frees the claims then)."""
        with self._lock:
            keys, self.held = list(self.held), {}
        names = [self._mine(k) for k in keys] + [ALIVE + self.token]
        raw = getattr(self.tracker.client, "_client", self.tracker.client)  # one attempt each, no retries

        def delete() -> None:
            for name in names:
                try:
                    raw.delete_experiment_tag(self.tracker.experiment_id, name)
                except Exception:  # noqa: BLE001 - already gone, or the store is away
                    return

        worker = threading.Thread(target=delete, name="vaebench-claims-close", daemon=True)
        worker.start()
        worker.join(timeout)


_CLAIMERS: dict[tuple[int, str, str], Claimer] = {}
_REGISTRY_LOCK = threading.Lock()


def claimer(tracker: tracking.Tracker) -> Claimer:
    """This process's Claimer for the tracker's experiment (a forked child gets its own)."""
    key = (os.getpid(), tracker.uri, tracker.experiment_id)
    with _REGISTRY_LOCK:
        if key not in _CLAIMERS:
            if not _CLAIMERS:
                atexit.register(_close_all)
            _CLAIMERS[key] = Claimer(tracker)
        return _CLAIMERS[key]


def _close_all() -> None:
    for (pid, _, _), c in list(_CLAIMERS.items()):
        if pid == os.getpid() and (c.held or c._thread is not None):  # not a forked parent's
            c.close()


def claim(tracker: tracking.Tracker, key: str, name: str) -> Holder | None:
    return claimer(tracker).claim(key, name)


def release(tracker: tracking.Tracker, key: str) -> None:
    claimer(tracker).release(key)


def lost(tracker: tracking.Tracker, key: str) -> bool:
    return claimer(tracker).lost(key)


def holders(tracker: tracking.Tracker, keys: list[str]) -> dict[str, Holder]:
    """The live claims on these cells by other processes (what a waiting runner looks at)."""
    tags = dict(tracker.client.get_experiment(tracker.experiment_id).tags)
    mine = claimer(tracker).token
    out = {}
    for key in keys:
        live = [h for h in holders_in(tags, key) if h.token != mine and h.alive]
        if live:
            out[key] = next((h for h in live if h.state == "held"), live[0])
    return out
