"""Damaged checkpoints: a `checkpoints/last.pt` cut short, overwritten or replaced is detected
when a run would resume from it, said in one line that names the run and the file, and the cell
trains again from scratch in a new run while the damaged one ends FAILED with the reason. Writes
are whole or nothing: a write that fails leaves the last good checkpoint, which still verifies.
Real SQLite stores and artifact folders in tmp_path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import mlflow
import pytest

from faultlib import interrupted_run, runs_of
from vaebench import cli, tracking


def damage(checkpoint: Path, how: str) -> None:
    data = checkpoint.read_bytes()
    if how == "cut short":
        checkpoint.write_bytes(data[: len(data) // 2])
    elif how == "overwritten":  # same size, bytes changed inside the tensor data: torch.load does not notice
        middle = len(data) // 2
        checkpoint.write_bytes(data[:middle] + bytes(64) + data[middle + 64:])
    elif how == "not a checkpoint":
        checkpoint.write_bytes(b"garbage " * 100)


@pytest.mark.parametrize("how, digest", [("cut short", True), ("overwritten", True), ("not a checkpoint", True),
                                         ("cut short", False)])
def test_a_damaged_checkpoint_is_one_line_and_the_cell_trains_again_in_a_new_run(
        tmp_path: Path, capsys: pytest.CaptureFixture, how: str, digest: bool) -> None:
    path, _, uri, checkpoint = interrupted_run(tmp_path)
    (killed,) = runs_of(uri)
    assert killed.info.status == "KILLED"
    assert tracking.DIGEST_TAGS[tracking.CHECKPOINT_PATH] in killed.data.tags
    if not digest:  # a run written before checkpoints carried their digest: the load check alone
        mlflow.MlflowClient(uri).delete_tag(killed.info.run_id, tracking.DIGEST_TAGS[tracking.CHECKPOINT_PATH])
    damage(checkpoint, how)
    capsys.readouterr()

    assert cli.main(["run", str(path), "--no-progress", "--no-report"]) == 0
    out, err = capsys.readouterr()
    said = [line for line in (out + err).splitlines() if " is damaged" in line]
    assert len(said) == 1, out + err
    assert killed.info.run_id in said[0] and str(checkpoint) in said[0]
    assert "trains from scratch in a new run" in said[0]
    assert "weights_only" not in out + err and "Traceback" not in out + err and "Unpickling" not in out + err

    old, new = runs_of(uri)
    assert old.info.run_id == killed.info.run_id and old.info.status == "FAILED"
    assert old.data.tags[tracking.TAG_FAILURE] == "damaged_checkpoint"
    assert "damaged" in old.data.tags[tracking.TAG_ERROR]
    assert new.info.status == "FINISHED" and new.data.tags["vaebench.previous_attempt"] == old.info.run_id
    assert "vaebench.resumed_from_epoch" not in new.data.tags  # from scratch, not from the damaged file
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(new.info.run_id, "train/loss")]
    assert sorted(steps) == [0, 1, 2]

    assert cli.main(["run", str(path), "--no-progress", "--no-report"]) == 0  # and then it is done
    assert "skipped" in capsys.readouterr().out
    assert len(runs_of(uri)) == 2


def test_a_failed_write_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC (or EROFS, EACCES) while a new checkpoint is written: an error that names the file,
    the old one byte for byte in place, no temporary file left, and the old one still verifies
    although the digest tag already announced the new one."""
    _, _, uri, checkpoint = interrupted_run(tmp_path)
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
