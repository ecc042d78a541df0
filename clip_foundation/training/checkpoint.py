"""Checkpoints that survive a kill at any moment, and finding the one to resume from.

    runs/<name>/               the best model so far (CLIPModel.from_pretrained reads it)
    runs/<name>/last/          the latest state: a model folder + trainer_state.pt

`last/` is written whole into `last.tmp/` and then swapped in by renames, so at every instant
either the previous or the new checkpoint is complete on disk (`last.old/` covers the moment
between the two renames). The run training in a folder holds an OS lock on its `.lock` file, so
no other run overwrites or resumes it meanwhile (`hold_run`).
"""
from __future__ import annotations

import itertools
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import IO

import torch

from clipModel import CheckpointError, CLIPModel, check

STATE_FILE = "trainer_state.pt"
LOCK_FILE = ".lock"  # locked by the run training in the folder; it holds that run's process id
# A run name is a folder name and the title of its model card: one line of safe characters, never
# hidden, never a path (`--run_name=.. --overwrite` would delete the folder above out_dir).
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


class RunInUse(OSError):
    """Another run is training in this run folder."""


def _try_lock(f: IO) -> None:
    # OSError when another process holds it. The OS drops the lock with its holder's process, even on
    # kill -9, so a crashed run never leaves a stale one (a lock file's mere existence would).
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)


def hold_run(run_dir: str | Path) -> IO:
    """Lock the run folder `run_dir` for this process -> the open lock file: closing it releases
    the lock, and so does the process ending in any way. A folder another run holds raises
    RunInUse naming it (flock locks open files, so a second hold in one process is refused too)."""
    path = Path(run_dir) / LOCK_FILE
    f = open(path, "a+")
    try:
        _try_lock(f)
    except OSError:
        f.seek(0)
        holder = f.read().strip() if fcntl is not None else ""  # Windows: the locked byte is unreadable
        f.close()
        raise RunInUse(f"{run_dir} is in use: another run{f' (process {holder})' if holder else ''} is training "
                       "in it; wait for it to finish, or pick another --run_name") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def check_not_in_use(run_dir: str | Path) -> None:
    """RunInUse if another run holds `run_dir` (an existing folder); holds nothing itself."""
    hold_run(run_dir).close()


def save_last(run_dir: Path, model: CLIPModel, state: dict, extra_config: dict) -> Path:
    """Write the model and the trainer state (optimizer, scheduler, scaler, RNG, position) as `last/`."""
    run_dir = Path(run_dir)
    tmp, last, old = run_dir / "last.tmp", run_dir / "last", run_dir / "last.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, extra_config)
        torch.save(state, tmp / STATE_FILE)
        with open(tmp / STATE_FILE, "rb") as f:
            os.fsync(f.fileno())
    except OSError as e:  # disk full, quota, read-only: the previous last/ is still whole
        shutil.rmtree(tmp, ignore_errors=True)
        previous = last_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
        raise OSError(e.errno, f"could not save the checkpoint {last} ({e.strerror or e}); {kept}. "
                      f"Free some space, then continue with --resume={run_dir}") from None
    if last.exists():
        shutil.rmtree(old, ignore_errors=True)
        last.rename(old)
    tmp.rename(last)
    shutil.rmtree(old, ignore_errors=True)
    return last


def check_run_name_text(run_name: str) -> None:
    """ConfigError (`--run_name=...: must be ...`) unless `run_name` is empty (a timestamp) or
    one line of ASCII letters, digits and . _ - that does not start with a dot."""
    check(not run_name or RUN_NAME.fullmatch(run_name) is not None, "run_name", run_name,
          "ASCII letters, digits and . _ - only, not starting with . (a folder name on one line)")


def check_run_name(out_dir: str, run_name: str, overwrite: bool) -> None:
    """Fail fast, before any data is prepared, when --run_name is no safe folder name, names a
    run another run is training in, or (without `overwrite`) any existing run."""
    check_run_name_text(run_name)
    path = Path(out_dir) / run_name
    if not run_name or not path.is_dir():
        return
    check_not_in_use(path)
    if not overwrite:
        raise FileExistsError(f"{path} already exists: continue it with --resume={path}, replace it "
                              "with --overwrite (its files are deleted), or pick another --run_name")


def new_run_dir(out_dir: str, run_name: str = "", overwrite: bool = False) -> tuple[Path, IO]:
    """Create a fresh run folder and lock it -> (the folder, its held lock: see hold_run).
    mkdir is atomic, so two runs started together never share a folder: a timestamp name that
    is taken gets -2, -3, ...; a taken --run_name is an error unless `overwrite` (then the old
    run is deleted first, unless another run is training in it)."""
    check_run_name_text(run_name)  # before anything is created
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if run_name:
        if overwrite and (out / run_name).is_dir():
            with hold_run(out / run_name):  # RunInUse while its run is alive
                shutil.rmtree(out / run_name, ignore_errors=True)
        check_run_name(out_dir, run_name, overwrite=False)
        (out / run_name).mkdir()
        return out / run_name, hold_run(out / run_name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        path = out / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path, hold_run(path)
        except FileExistsError:
            continue


def _complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / "model.safetensors").is_file()


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint folder, or None."""
    for name in ("last", "last.old"):
        if _complete(Path(run_dir) / name):
            return Path(run_dir) / name
    return None


def find_resume(value: str, out_dir: str, run_name: str = "") -> Path:
    """--resume=VALUE -> a checkpoint folder. VALUE: a run folder, a last/ folder, or `latest`
    (the run named by --run_name, else the most recently saved run under --out_dir)."""
    if value == "latest":
        runs = [Path(out_dir) / run_name] if run_name else sorted(Path(out_dir).glob("*/"))
        found = [c for c in map(last_checkpoint, runs) if c is not None]
        if not found:
            where = Path(out_dir) / run_name if run_name else out_dir
            raise FileNotFoundError(f"--resume=latest: no checkpoint (last/) under {where}")
        return max(found, key=lambda c: (c / STATE_FILE).stat().st_mtime)
    path = Path(value)
    if _complete(path):
        return path
    found = last_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"--resume={value}: not a run folder with a last/ checkpoint, "
                                "nor a checkpoint folder itself")
    return found


def load_last(folder: Path, device) -> tuple[CLIPModel, dict]:
    """-> (the model, the trainer state dict), from a folder written by save_last."""
    model = CLIPModel.from_pretrained(folder, device=device)
    path = Path(folder) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt trainer state ({' '.join(str(e).split())[:300]}); resume from "
                              f"another checkpoint, e.g. {Path(folder).parent / 'last.old'} if it exists") from None
    return model, state
