"""Runs one unit of work (vaebench.plan.Unit: a pack of cells, or one cell): claims each cell
(vaebench.claims), decides what to do with it now that it is this runner's (vaebench.attempts:
skip it, resume its last attempt, train it afresh, leave it failed), opens or resumes its MLflow
run, trains the cells (the packed engine for a pack or a captured step, the plain loop
otherwise), logs every epoch's metrics and the checkpoints, and hands each trained cell to the
evaluator (vaebench.results) as soon as it leaves training.

Claiming happens here, wherever a unit runs (this process, a worker process, a cluster task), so
every executor gets it: a cell another runner holds is left out of the unit (a "claimed"
result), and the claim is released by the evaluator once the run's final status is written.

Every call to the tracking store goes through a `tracking.Background` thread, so the trainer
never waits for it. Checkpoints are written after a cell's first epoch, then at most every
CHECKPOINT_EVERY_S seconds, and always after its last epoch; the epochs' metrics with each
checkpoint and in between at most every METRICS_EVERY_S seconds, several epochs in one write (a
write holds the interpreter for milliseconds, which a host-bound loop pays for:
benchmarks/bench_overhead.py). A resumed cell retrains the epochs after its last checkpoint,
exactly (vaebench.step), and does not log them twice. A checkpoint that turns out damaged when a
run is resumed (tracking.ArtifactDamaged) ends that run FAILED with the reason, and the cell
starts again from scratch in a new run. A cell whose checkpoint or metrics the store did not
take (a full disk, a store that stayed away) fails with that error; one that lost its claim (it
stalled past the lease) stops writing to its run.

A failed cell never stops the others; a Ctrl-C (KeyboardInterrupt) marks the unit's unfinished
runs KILLED and propagates.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from vaebench import attempts, claims, tracking
from vaebench.config import Experiment
from vaebench.plan import Unit, memory_cap
from vaebench.results import CellResult, Evaluator

if TYPE_CHECKING:
    from vaebench.data import Dataset
    from vaebench.matrix import RunSpec

CHECKPOINT_EVERY_S = 30.0
METRICS_EVERY_S = 5.0
POLL_EVERY_S = 1.0  # how often, between epochs, the evaluator's finished work is looked at


@dataclass
class Cell:
    """A cell to train, with what the runner planned for it (decided again once it is claimed)."""

    spec: RunSpec
    resume_run_id: str | None = None  # the run the runner expected to continue
    force_since: int | None = None  # --force: the sweep's start (ms); runs before it do not count
    retry_failed: bool = False  # --retry-failed: a deterministic failure is trained afresh


class ClaimLost(RuntimeError):
    """Another runner took the cell over (this one stalled past the lease)."""


@dataclass
class _Open:
    """A cell whose MLflow run is open in this unit."""

    spec: RunSpec
    run_id: str
    resume: dict[str, Any] | None  # the checkpoint it continues from
    note: str | None = None
    logged: set[int] = field(default_factory=set)  # epochs whose metrics the run already has
    checkpoint: dict[str, Any] | None = None  # the last one written (an out-of-memory retry resumes from it)
    checkpoint_at: float | None = None
    done: bool = False
    error: BaseException | None = None  # the store did not take a write for it: it fails
    lost: bool = False  # its claim went to another runner: nothing more is written for it
    # (epoch, metrics, its end in ms) not yet sent to the background thread
    pending: list[tuple[int, dict[str, float], int]] = field(default_factory=list)
    sent_at: float | None = None  # when metrics were last sent to the background thread

    def send_metrics(self, tracker: tracking.Tracker, background: tracking.Background) -> None:
        """The epochs' metrics held so far, in one write."""
        if self.pending and self.error is None and not self.lost:
            background.submit(tracking.log_epochs, tracker, self.run_id, self.pending)
        self.pending, self.sent_at = [], time.monotonic()


def run_unit(exp: Experiment, unit: Unit, tracker: tracking.Tracker, parent_id: str | None, evaluator: Evaluator,
             background: tracking.Background, *, progress: bool = True,
             should_stop: Callable[[], bool] | None = None) -> list[CellResult]:
    """Train the cells of `unit` (a list of `Cell`s). Cells that reach the evaluator, trained or
    failed, come out of it; returned are the others: skipped (finished meanwhile), left failed
    (vaebench.attempts), or claimed by another runner."""
    from vaebench.train import dataset_for

    started = time.perf_counter()
    out: list[CellResult] = []
    opened: list[_Open] = []
    for cell in unit.items:
        spec, run_id = cell.spec, None
        try:
            holder = claims.claim(tracker, spec.key, spec.name)
            if holder is not None:
                out.append(CellResult(spec, "claimed", note=f"being trained by {holder}"))
                continue
            decision = attempts.decide(tracking.runs_by_key(tracker, spec.key).get(spec.key, []),
                                       force_since=cell.force_since, retry_failed=cell.retry_failed)
            if decision.action in ("skip", "give_up"):
                claims.release(tracker, spec.key)
                if decision.action == "skip":
                    out.append(CellResult(spec, "skipped", decision.run_id,
                                          note="finished meanwhile by another runner"))
                else:
                    out.append(CellResult(spec, "failed", decision.run_id, error=decision.reason, earlier=True))
                continue
            run_id, resume, note = _open_run(exp, spec, decision, tracker, parent_id)
            opened.append(_Open(spec, run_id, resume, note))
            if resume is not None:
                opened[-1].logged = tracking.logged_steps(tracker, run_id, "train/loss")
                _log_missing_epochs(opened[-1], tracker)
        except KeyboardInterrupt:
            claims.release(tracker, spec.key)
            _stop(opened, tracker, background)
            raise
        except Exception as e:  # noqa: BLE001 - this cell fails, the others go on
            evaluator.failed(spec, run_id, e, started)
    if not opened:
        return out
    s = opened[0].spec.settings
    try:
        data = dataset_for(s, exp.resolved_data_dir(), exp.base_dir)
        for o in opened:
            if o.resume is None:
                background.submit(tracking.set_tags, tracker, o.run_id, {tracking.TAG_SOURCE: data.source})
        _train(exp, opened, data, tracker, evaluator, background, out, started, progress, should_stop)
    except KeyboardInterrupt:
        _stop([o for o in opened if not o.done], tracker, background)
        raise
    except Exception as e:  # noqa: BLE001 - the unit as a whole failed (its data, its device, ...)
        for o in opened:
            if not o.done:
                evaluator.failed(o.spec, o.run_id, e, started, o.note)
    return out


def _open_run(exp: Experiment, spec: RunSpec, decision: attempts.Decision, tracker: tracking.Tracker,
              parent_id: str | None) -> tuple[str, dict[str, Any] | None, str | None]:
    """Continue the cell's last attempt from its checkpoint, or start a new run; with a note when
    the user should hear why (a damaged checkpoint)."""
    run_id, resume, note = None, None, None
    if decision.action == "resume":
        run_id = decision.run_id
        try:
            resume = tracking.load_torch(tracker, run_id, tracking.CHECKPOINT_PATH)
        except tracking.ArtifactDamaged as e:
            tracking.mark_failed(tracker, run_id, {tracking.TAG_ERROR: f"ArtifactDamaged: {e}",
                                                   tracking.TAG_FAILURE: attempts.DAMAGED})
            note = f"{e}; that run is marked FAILED and the cell trains from scratch in a new run"
            run_id = None
        else:
            if resume is None:  # stopped before its first checkpoint: nothing to continue
                if decision.run.info.status != "FAILED":  # (a failed one keeps its own reason)
                    tracking.mark_failed(tracker, run_id, {
                        tracking.TAG_ERROR: "ended before its first checkpoint; trained again in a new run"})
                run_id = None
    if run_id is not None:
        tracker.client.update_run(run_id, status="RUNNING")
        tags: dict[str, Any] = {"vaebench.resumed_from_epoch": resume["epoch"]}
        previous = decision.run.data.tags.get(tracking.TAG_ERROR)
        if decision.run.info.status == "FAILED" and previous:  # an environment failure, retried
            tags["vaebench.retried_after"] = previous
            for stale in (tracking.TAG_ERROR, tracking.TAG_FAILURE, "vaebench.traceback"):
                if stale in decision.run.data.tags:
                    tracker.client.delete_tag(run_id, stale)
        tracking.set_tags(tracker, run_id, tags)
        return run_id, resume, note
    tags = {tracking.TAG_KIND: "cell", tracking.TAG_RUN_KEY: spec.key,
            **{axis: tracking.tag_value(v) for axis, v in spec.axes.items()}}
    if decision.run_id is not None:
        tags["vaebench.previous_attempt"] = decision.run_id
    run_id = tracking.start_run(tracker, spec.name, tags, parent_id)
    try:
        tracking.log_params(tracker, run_id, spec.params())
        tracking.log_json(tracker, run_id, "config/cell.json", {
            "name": spec.name, "run_key": spec.key, "axes": spec.axes, "settings": spec.settings.model_dump(mode="json"),
            "experiment": exp.name, "file": str(exp.path)})
    except BaseException:
        tracking.finish(tracker, run_id, "FAILED")
        raise
    return run_id, None, note


def _log_missing_epochs(o: _Open, tracker: tracking.Tracker) -> None:
    """An epoch whose checkpoint landed but whose metrics did not (a crash in between)."""
    for epoch, metrics in enumerate(o.resume["history"]):
        if epoch not in o.logged:
            tracking.log_metrics(tracker, o.run_id, metrics, step=epoch)
            o.logged.add(epoch)


def _train(exp: Experiment, opened: list[_Open], data: Dataset, tracker: tracking.Tracker, evaluator: Evaluator,
           background: tracking.Background, out: list[CellResult], started: float, progress: bool,
           should_stop: Callable[[], bool] | None) -> None:
    import torch

    from vaebench.packed import captured, train_packed
    from vaebench.train import TrainingDiverged, resolve_device, train

    polled = time.monotonic()

    def on_epoch_end(i: int, epoch: int, metrics: dict[str, float], make_checkpoint: Callable[[], dict],
                     final: bool) -> None:
        nonlocal polled
        if time.monotonic() - polled >= POLL_EVERY_S:  # the cells of earlier units end while this one trains
            evaluator.poll()
            polled = time.monotonic()
        o = members[i]
        if o.error is None and not o.lost:
            o.error = background.error(o.run_id)
            o.lost = claims.lost(tracker, o.spec.key)
        if o.error is not None or o.lost:
            return  # it fails (or is another runner's) at its end; nothing more is written for it
        now = time.monotonic()
        checkpoint = final or o.checkpoint_at is None or now - o.checkpoint_at >= CHECKPOINT_EVERY_S
        if checkpoint:
            o.checkpoint, o.checkpoint_at = make_checkpoint(), now  # on the CPU: training goes on
            background.submit(tracking.log_torch, tracker, o.run_id, tracking.CHECKPOINT_PATH, o.checkpoint,
                              coalesce=(o.run_id, tracking.CHECKPOINT_PATH))
        if epoch not in o.logged:
            # stamped with the epoch's end, not the write's: the UI's time axis is training time
            o.pending.append((epoch, metrics, int(time.time() * 1000)))
            o.logged.add(epoch)
        # with every checkpoint, after it (a crash in between re-logs nothing twice on resume: the
        # checkpoint's history has them), and in between at most every METRICS_EVERY_S
        if checkpoint or o.sent_at is None or now - o.sent_at >= METRICS_EVERY_S:
            o.send_metrics(tracker, background)

    def on_done(i: int, outcome: Any) -> None:
        o = members[i]
        o.done = True
        o.send_metrics(tracker, background)  # a diverged member's earlier epochs
        if o.lost or isinstance(outcome, ClaimLost):
            o.lost = True
            out.append(CellResult(o.spec, "claimed", o.run_id, note="another runner took it over (this one "
                                  "stalled past its lease); its run is left to that runner"))
            return
        if o.error is not None and not isinstance(outcome, Exception):
            outcome = o.error
        if isinstance(outcome, Exception):
            evaluator.failed(o.spec, o.run_id, outcome, started, o.note)
            return
        if outcome.how:  # trained here (a member resumed after its last epoch was not: no tags)
            outcome.how.update(how)
        evaluator.submit(o.spec, o.run_id, outcome, data, "resumed" if o.resume else "trained", started, o.note)

    members = opened
    settings = [o.spec.settings for o in opened]
    device = resolve_device(settings[0].device)
    how: dict[str, str] = {}
    if len(opened) == 1 and not captured(settings[0]):
        (o,) = opened
        s = settings[0]

        def plain_epoch(epoch: int, metrics: dict[str, float], checkpoint: dict) -> None:
            on_epoch_end(0, epoch, metrics, lambda: checkpoint, checkpoint["stopped_early"] or epoch + 1 >= s.epochs)
            if o.error is not None:  # the plain loop can stop here: nothing else trains with it
                raise o.error
            if o.lost:
                raise ClaimLost(o.spec.key)

        try:
            result = train(s, data, resume=o.resume, on_epoch_end=plain_epoch, progress=progress,
                           should_stop=should_stop)
        except (TrainingDiverged, ClaimLost) as e:
            on_done(0, e)
            return
        except Exception as e:  # noqa: BLE001 - a write the store did not take
            if e is not o.error:
                raise
            on_done(0, e)
            return
        on_done(0, result)
        return

    # at most as many members as the device's memory holds (estimated), halved when it does not (checked)
    cap = memory_cap(settings[0], data, device) if device.type == "cuda" else len(opened)
    queue = list(opened)
    while queue:
        members, queue = queue[:cap], queue[cap:]
        how["vaebench.pack.id"] = uuid.uuid4().hex[:8]
        try:
            train_packed([o.spec.settings for o in members], data, resumes=[o.checkpoint or o.resume for o in members],
                         on_epoch_end=on_epoch_end, on_done=on_done, progress=progress, should_stop=should_stop,
                         names=[o.spec.name for o in members])
        except torch.cuda.OutOfMemoryError:
            left = [o for o in members if not o.done]
            if len(left) <= 1:
                raise
            torch.cuda.empty_cache()
            cap = max(1, len(left) // 2)
            how["vaebench.pack.split"] = f"out of GPU memory with {len(left)} members: packs of {cap}"
            queue = left + queue


def _stop(opened: list[_Open], tracker: tracking.Tracker, background: tracking.Background) -> None:
    """An interrupt: the unit's unfinished runs end KILLED (resumable), after what was queued for
    them; then their claims go."""
    for o in opened:
        o.send_metrics(tracker, background)
        if not o.lost:
            background.submit(tracking.finish, tracker, o.run_id, "KILLED")
            background.submit(claims.release, tracker, o.spec.key)
