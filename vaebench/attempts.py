"""What to do with a cell given its runs (its attempts): skip it, resume its last attempt, train it
afresh, or leave it failed. The retry policy, in one place: the runner plans with it, and
vaebench.units decides with it again once the cell is claimed (another runner may have moved the
cell on meanwhile).

The policy, newest attempt first:

- a FINISHED run: the cell is done (with `--force`, runs that started before this sweep do not
  count);
- the last attempt was interrupted (KILLED: Ctrl-C, `--fail-fast`; or still RUNNING with no live
  claim: its runner was killed, or its machine lost): resume it from its last good checkpoint, in
  the same run. It did not fail; it was stopped;
- it FAILED because of its environment (the tracking store, the disk, memory, missing data, a
  worker process that died under it):
  resume it from its last good checkpoint too. The computation was not at fault, and the
  checkpoint holds it exactly;
- its checkpoint turned out damaged: train afresh in a new run (the damaged run is FAILED with
  that reason);
- it FAILED deterministically (diverged to NaN/inf, settings the model rejects, an error in the
  code): resuming would replay the same steps to the same failure (training is exactly
  reproducible, vaebench.step), so by default the cell is left failed and reported with its
  reason, and costs nothing. `--retry-failed` trains it afresh in a new run: worth it once
  something changed that the run key does not hold (the code, the device, library versions).
  The failed run stays as the record of what happened.

Nothing is retried within one invocation: every retry is a rerun that someone asked for, so a
sweep's outcome does not depend on how often it was started. (A worker process that dies is
replaced within the invocation, vaebench.executors / results.PoolEvaluator: its cells did not
fail, and they continue from their checkpoints.)

Owns: the failure classes (the `vaebench.failure` tag) and the decision. Never touches the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vaebench import tracking

ENVIRONMENT, DIVERGED, DAMAGED, ERROR = "environment", "diverged", "damaged_checkpoint", "error"
FAILURE_KINDS = (ENVIRONMENT, DIVERGED, DAMAGED, ERROR)
INTERRUPTED = ("RUNNING", "SCHEDULED", "KILLED")


def failure_kind(error: BaseException) -> str:
    """The class of a failure, recorded on the run (tag `vaebench.failure`)."""
    from concurrent.futures import BrokenExecutor

    from mlflow.exceptions import MlflowException

    from vaebench.data import DatasetUnavailable

    names = {c.__name__ for c in type(error).__mro__}
    if "TrainingDiverged" in names:
        return DIVERGED
    if isinstance(error, tracking.ArtifactDamaged):
        return DAMAGED
    # BrokenExecutor: a worker process died under the cell (killed, or out of memory)
    if isinstance(error, (OSError, MemoryError, MlflowException, tracking.StoreUnavailable,
                          tracking.TrackingUnavailable, DatasetUnavailable, BrokenExecutor)) \
            or "OutOfMemoryError" in names:
        return ENVIRONMENT
    return ERROR


def kind_of_run(run: Any) -> str:
    """A failed run's class: its tag, or (runs from before the tag) from its error's type."""
    tags = run.data.tags
    if tags.get(tracking.TAG_FAILURE) in FAILURE_KINDS:
        return tags[tracking.TAG_FAILURE]
    return DIVERGED if tags.get(tracking.TAG_ERROR, "").startswith("TrainingDiverged") else ENVIRONMENT


@dataclass
class Decision:
    action: str  # skip | resume | fresh | give_up
    run: Any = None  # the run to skip for (finished) or to resume, or the failed one
    reason: str = ""

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else None


def decide(runs: list[Any], *, force_since: int | None = None, retry_failed: bool = False) -> Decision:
    """What to do with a cell whose runs are `runs` (newest first). `force_since`: with --force,
    the sweep's start (ms): earlier runs do not count."""
    if force_since is not None:
        runs = [r for r in runs if (r.info.start_time or 0) >= force_since]
    finished = next((r for r in runs if r.info.status == "FINISHED"), None)
    if finished is not None:
        return Decision("skip", finished)
    if not runs:
        return Decision("fresh")
    latest = runs[0]
    if latest.info.status in INTERRUPTED:
        return Decision("resume", latest)
    kind = kind_of_run(latest)
    if kind == ENVIRONMENT:
        return Decision("resume", latest, "its environment failed")
    if kind == DAMAGED:
        return Decision("fresh", latest, "its checkpoint was damaged")
    error = latest.data.tags.get(tracking.TAG_ERROR, "no error recorded")
    if retry_failed:
        return Decision("fresh", latest, f"--retry-failed after: {error}")
    return Decision("give_up", latest, f"failed earlier in run {latest.info.run_id} ({kind}): {error}; "
                                       "not retried (add --retry-failed to train it afresh)")
