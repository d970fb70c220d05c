"""How a worker process of vaebench's own pools ends (the evaluation pool, the `--jobs` pool):
within a grace period after SIGTERM, and on its own once the process that started it is gone.

Owns: those two watches, each a daemon thread or timer in the worker. Never touches runs or the
store: what a stopping worker records is its unit's business.
"""

from __future__ import annotations

import os
import threading
import time

WORKER_GRACE = 60.0  # seconds a pool worker has, after SIGTERM, to end its batch and mark its runs
PARENT_POLL_S = 1.0  # how often a worker looks whether its parent is still there


def exit_after_grace(signum: int, seconds: float = WORKER_GRACE) -> None:
    """SIGTERM in a pool worker: exit within `seconds` however it is busy. A worker that took
    SIGTERM only as a request to stop would keep a pool that terminates its workers (a broken pool:
    another worker was killed) waiting for it forever; this one ends its batch and its runs' marks
    first when it can, and its pool shuts it down earlier when the sweep stops."""
    timer = threading.Timer(seconds, os._exit, (128 + signum,))
    timer.daemon = True
    timer.start()


def exit_with_parent(poll: float = PARENT_POLL_S) -> None:
    """Exit (status 1) within `poll` seconds of the parent process's end. A spawned pool worker
    waits for its next task on a queue that a killed parent (kill -9, the OOM killer) never
    closes: without this it would sit there, holding its memory, or go on training a unit and
    writing to the store for a sweep that is over. Its runs stay RUNNING with a dead owner, and
    the next `vaebench run` resumes them (vaebench.attempts)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # re-parented (to init or a subreaper) once the parent is gone
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="vaebench-parent-watch", daemon=True).start()
