"""Files written where the user points (`report --out`, `tune --export`): what a path given on the
command line means, checked before any work, and the write itself, whole or not at all.

Owns only that; what goes into the files is the report's and the tuner's business.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """A path given for an output file that cannot be one (a device, a FIFO, ...)."""


def output_path(out: str | os.PathLike, default_name: str, flag: str,
                keep: dict[Path, str] | None = None) -> Path:
    """The file `out` means, as `cp` reads a destination: an existing folder, or a path ending in a
    slash (a folder to be made), gets `default_name` inside it; a link to a file is followed (the
    file is replaced, the link kept). Anything else that exists must be a regular file: writing
    replaces the path, and a device such as /dev/null must never be replaced; nor may the files
    in `keep` (path -> what it is: `tune.storage.study_files`). Relative paths are taken from the working
    directory. `flag` names the option in the error."""
    raw = os.fspath(out)
    path = Path(raw).expanduser()
    if path.is_dir() or raw.endswith(("/", os.sep)):
        path = path / default_name
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{flag} {raw}: {path} exists and is not a regular file or a folder; "
                              f"give a file path or a folder")
    for kept, what in (keep or {}).items() if path.exists() else ():
        if kept.exists() and os.path.samefile(path, kept):
            raise OutputPathError(f"{flag} {raw}: {path} is {what}, which this would overwrite; "
                                  "give another file or a folder")
    return path


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` (its folders made) through a temporary file renamed over it, so a
    reader never sees half a file and a failed write leaves the old one. Returns the absolute path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path.resolve()
