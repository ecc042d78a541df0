"""Files written whole or not at all: the one atomic-write helper every module uses."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it into place, so a
    kill or a full disk mid-write leaves the previous file whole (or none), never half a file.
    The temporary file is removed when `write` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
