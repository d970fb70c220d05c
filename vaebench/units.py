"""Runs one unit of work (vaebench.plan.Unit: a pack of cells, or one cell): opens or resumes the
MLflow run of each cell, trains them (the packed engine for a pack or a captured step, the plain
loop otherwise), logs every epoch's metrics and the checkpoints, and hands each trained cell to the
evaluator (vaebench.results) as soon as it leaves training.

Every call to the tracking store goes through a `tracking.Background` thread, so the trainer
never waits for it. Checkpoints are written after a cell's first epoch, then at most every
CHECKPOINT_EVERY_S seconds, and always after its last epoch; metrics after every epoch. A resumed
cell retrains the epochs after its last checkpoint, exactly (vaebench.step), and does not log them
twice.

A failed cell never stops the others; a Ctrl-C (KeyboardInterrupt) marks the unit's unfinished
runs KILLED and propagates.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from vaebench import tracking
from vaebench.config import Experiment
from vaebench.plan import Unit, memory_cap
from vaebench.results import CellResult, Evaluator

if TYPE_CHECKING:
    from vaebench.data import Dataset
    from vaebench.matrix import RunSpec

CHECKPOINT_EVERY_S = 30.0


@dataclass
class Cell:
    """A cell to train, and the run to continue (its last unfinished attempt), if any."""

    spec: RunSpec
    resume_run_id: str | None = None


@dataclass
class _Open:
    """A cell whose MLflow run is open in this unit."""

    spec: RunSpec
    run_id: str
    resume: dict[str, Any] | None  # the checkpoint it continues from
    logged: set[int] = field(default_factory=set)  # epochs whose metrics the run already has
    checkpoint: dict[str, Any] | None = None  # the last one written (an out-of-memory retry resumes from it)
    checkpoint_at: float | None = None
    done: bool = False


def run_unit(exp: Experiment, unit: Unit, tracker: tracking.Tracker, parent_id: str | None, evaluator: Evaluator,
             background: tracking.Background, *, progress: bool = True,
             should_stop: Callable[[], bool] | None = None) -> list[CellResult]:
    """Train the cells of `unit` (a list of `Cell`s); trained cells go to `evaluator`, and the cells
    that failed before that are returned."""
    from vaebench.train import dataset_for

    started = time.perf_counter()
    failed: list[CellResult] = []
    opened: list[_Open] = []
    for cell in unit.items:
        run_id = None
        try:
            run_id, resume = _open_run(exp, cell, tracker, parent_id)
            opened.append(_Open(cell.spec, run_id, resume))
            if resume is not None:
                opened[-1].logged = tracking.logged_steps(tracker, run_id, "train/loss")
                _log_missing_epochs(opened[-1], tracker)
        except KeyboardInterrupt:
            _stop(opened, tracker, background)
            raise
        except Exception as e:  # noqa: BLE001 - this cell fails, the others go on
            failed.append(evaluator.failed(cell.spec, run_id, e, started))
    if not opened:
        return failed
    s = opened[0].spec.settings
    try:
        data = dataset_for(s, exp.resolved_data_dir())
        for o in opened:
            if o.resume is None:
                background.submit(tracking.set_tags, tracker, o.run_id, {tracking.TAG_SOURCE: data.source})
        _train(exp, opened, data, tracker, evaluator, background, failed, started, progress, should_stop)
    except KeyboardInterrupt:
        _stop([o for o in opened if not o.done], tracker, background)
        raise
    except Exception as e:  # noqa: BLE001 - the unit as a whole failed (its data, its device, ...)
        failed += [evaluator.failed(o.spec, o.run_id, e, started) for o in opened if not o.done]
    return failed


def _open_run(exp: Experiment, cell: Cell, tracker: tracking.Tracker,
              parent_id: str | None) -> tuple[str, dict[str, Any] | None]:
    """Continue the cell's unfinished run from its last checkpoint, or start a new run."""
    spec, run_id, resume = cell.spec, cell.resume_run_id, None
    if run_id is not None:
        resume = tracking.load_torch(tracker, run_id, tracking.CHECKPOINT_PATH)
        if resume is None:  # interrupted before its first checkpoint: nothing to continue
            tracking.finish(tracker, run_id, "FAILED")
            run_id = None
    if run_id is not None:
        tracker.client.update_run(run_id, status="RUNNING")
        tracking.set_tags(tracker, run_id, {"vaebench.resumed_from_epoch": resume["epoch"]})
        return run_id, resume
    run_id = tracking.start_run(tracker, spec.name, {
        tracking.TAG_KIND: "cell", tracking.TAG_RUN_KEY: spec.key,
        **{axis: tracking.tag_value(v) for axis, v in spec.axes.items()}}, parent_id)
    try:
        tracking.log_params(tracker, run_id, spec.params())
        tracking.log_json(tracker, run_id, "config/cell.json", {
            "name": spec.name, "run_key": spec.key, "axes": spec.axes, "settings": spec.settings.model_dump(mode="json"),
            "experiment": exp.name, "file": str(exp.path)})
    except BaseException:
        tracking.finish(tracker, run_id, "FAILED")
        raise
    return run_id, None


def _log_missing_epochs(o: _Open, tracker: tracking.Tracker) -> None:
    """An epoch whose checkpoint landed but whose metrics did not (a crash in between)."""
    for epoch, metrics in enumerate(o.resume["history"]):
        if epoch not in o.logged:
            tracking.log_metrics(tracker, o.run_id, metrics, step=epoch)
            o.logged.add(epoch)


def _train(exp: Experiment, opened: list[_Open], data: Dataset, tracker: tracking.Tracker, evaluator: Evaluator,
           background: tracking.Background, failed: list[CellResult], started: float, progress: bool,
           should_stop: Callable[[], bool] | None) -> None:
    import torch

    from vaebench.packed import resolve_compile, train_packed
    from vaebench.train import TrainingDiverged, resolve_device, train

    def on_epoch_end(i: int, epoch: int, metrics: dict[str, float], make_checkpoint: Callable[[], dict],
                     final: bool) -> None:
        o = members[i]
        now = time.monotonic()
        if final or o.checkpoint_at is None or now - o.checkpoint_at >= CHECKPOINT_EVERY_S:
            o.checkpoint, o.checkpoint_at = make_checkpoint(), now  # on the CPU: training goes on
            # checkpoint first, then metrics: a crash in between re-logs nothing twice on resume
            background.submit(tracking.log_torch, tracker, o.run_id, tracking.CHECKPOINT_PATH, o.checkpoint)
        if epoch not in o.logged:
            background.submit(tracking.log_metrics, tracker, o.run_id, metrics, epoch)
            o.logged.add(epoch)

    def on_done(i: int, outcome: Any) -> None:
        o = members[i]
        o.done = True
        if isinstance(outcome, Exception):
            failed.append(evaluator.failed(o.spec, o.run_id, outcome, started))
            return
        outcome.how.update(how)
        evaluator.submit(o.spec, o.run_id, outcome, data, "resumed" if o.resume else "trained", started)

    members = opened
    settings = [o.spec.settings for o in opened]
    device = resolve_device(settings[0].device)
    how: dict[str, str] = {}
    if len(opened) == 1 and resolve_compile(settings[0].compile, device) == "off":
        (o,) = opened
        s = settings[0]

        def plain_epoch(epoch: int, metrics: dict[str, float], checkpoint: dict) -> None:
            on_epoch_end(0, epoch, metrics, lambda: checkpoint, checkpoint["stopped_early"] or epoch + 1 >= s.epochs)

        try:
            result = train(s, data, resume=o.resume, on_epoch_end=plain_epoch, progress=progress,
                           should_stop=should_stop)
        except TrainingDiverged as e:
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
    """An interrupt: the unit's unfinished runs end KILLED (resumable), after what was queued for them."""
    for o in opened:
        background.submit(tracking.finish, tracker, o.run_id, "KILLED")
