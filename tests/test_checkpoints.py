"""Checkpoints are written whole or not at all: a write that fails leaves the last good checkpoint,
which still verifies against the digest recorded with it. Real SQLite stores and artifact folders
in tmp_path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import mlflow
import pytest

from faultlib import checkpoints, runs_of, stop_after_checkpoint, study_file
from vaebench import tracking
from vaebench.config import load_experiment
from vaebench.runner import run_experiment


def quiet(_: str) -> None:
    pass


def interrupted_run(tmp_path: Path, epochs: int = 3) -> tuple[Path, str, Path]:
    """A study whose one cell was interrupted after its first checkpoint: (file, store, checkpoint)."""
    path = study_file(tmp_path, epochs=epochs)
    exp = load_experiment(path)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, progress=False, echo=quiet, should_stop=stop_after_checkpoint(tmp_path))
    (checkpoint,) = checkpoints(tmp_path)
    return path, exp.resolved_tracking_uri(), checkpoint


def damage(checkpoint: Path, how: str) -> None:
    data = checkpoint.read_bytes()
    if how == "cut short":
        checkpoint.write_bytes(data[: len(data) // 2])
    elif how == "overwritten":  # same size, bytes changed inside the tensor data: torch.load does not notice
        middle = len(data) // 2
        checkpoint.write_bytes(data[:middle] + bytes(64) + data[middle + 64:])
    elif how == "not a checkpoint":
        checkpoint.write_bytes(b"garbage " * 100)


def test_a_failed_write_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC (or EROFS, EACCES) while a new checkpoint is written: an error that names the file,
    the old one byte for byte in place, no temporary file left, and the old one still verifies
    although the digest tag already announced the new one."""
    _, uri, checkpoint = interrupted_run(tmp_path)
    (run,) = runs_of(uri)
    tracker = tracking.connect(uri, "faults")
    good = checkpoint.read_bytes()
    before = tracking.load_torch(tracker, run.info.run_id, tracking.CHECKPOINT_PATH)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        tracking.log_torch(tracker, run.info.run_id, tracking.CHECKPOINT_PATH, {**before, "epoch": 99})
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(checkpoint)
    assert checkpoint.read_bytes() == good
    assert [p.name for p in checkpoint.parent.iterdir()] == ["last.pt"]
    tag = mlflow.MlflowClient(uri).get_run(run.info.run_id).data.tags[tracking.DIGEST_TAGS[tracking.CHECKPOINT_PATH]]
    assert len(tag.split(" ")) == 2  # the new digest (never written) and the one on disk
    again = tracking.load_torch(tracking.connect(uri, "faults"), run.info.run_id, tracking.CHECKPOINT_PATH)
    assert again["epoch"] == before["epoch"]

    tracking.log_torch(tracker, run.info.run_id, tracking.CHECKPOINT_PATH, {**before, "epoch": 7})
    fresh = tracking.connect(uri, "faults")  # another process's view: only the tag to go by
    assert tracking.load_torch(fresh, run.info.run_id, tracking.CHECKPOINT_PATH)["epoch"] == 7
