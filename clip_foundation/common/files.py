"""Files written whole or not at all: the one atomic-write helper every module uses (defined
with the model, which saves checkpoints with it, and shared from here by the library); and the
checks of a folder a command is about to write into."""
import re
from pathlib import Path

from clipModel import atomic_write

from clip_foundation.data.records import DataError

__all__ = ["atomic_write", "folder_to_write", "unlisted"]


def folder_to_write(path, option: str) -> Path:
    """`path` as a folder a command writes into; DataError (one line naming `--option`) when it
    is an existing file, which mkdir would only answer with "[Errno 17] File exists"."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"--{option}={path} is a file: it must be a folder (a new one, or one this command wrote)")
    return path


def unlisted(folder: Path, listed) -> list[Path]:
    """The entries of `folder` that are not files named in `listed`, nor atomic_write's temporary
    names of them (".NAME.tmpPID", and the "NAME.tmp" of older versions): what a command that
    writes there did not write."""
    return [e for e in sorted(Path(folder).iterdir())
            if re.sub(r"^\.|\.tmp\d*$", "", e.name) not in listed or not e.is_file()]
