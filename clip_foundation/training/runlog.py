"""What a training run shows and writes as it goes: log.jsonl (and TensorBoard scalars when it is
installed), progress bars, and the loss / recall curves, redrawn as epochs end."""
from __future__ import annotations

import json
import time
from pathlib import Path


class RunLogger:
    """One JSON line per entry in log.jsonl, and TensorBoard scalars when it is installed.

    A resumed run starts from the checkpoint's history: lines logged after that checkpoint
    are dropped from both, since those steps are about to be run again."""

    def __init__(self, run_dir: Path, history: list[dict], tensorboard: bool):
        self.file = open(run_dir / "log.jsonl", "w")
        self.file.writelines(json.dumps(entry) + "\n" for entry in history)
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                step = max((e["step"] for e in history), default=0)
                self.board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if history else None)
            except ImportError:  # tensorboard is optional
                pass

    def log(self, entry: dict):
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in entry.items():
                if key not in ("step", "epoch", "epoch_end") and isinstance(value, (int, float)):
                    self.board.add_scalar(key.replace("val_", "val/"), value, entry["step"])

    def close(self):
        self.file.close()
        if self.board is not None:
            self.board.close()


def progress_bar(iterable, enabled: bool, desc: str, total: int, initial: int = 0):
    """`iterable` behind a tqdm bar (with rate and time left), or as it is when not `enabled`."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False, total=total, initial=initial)


class CurvesFile:
    """curves.png, redrawn after the first epoch a run (or a resumed run) does, then after an epoch that
    ends at least `every` seconds after the last drawing, and after the last epoch: a drawing costs ~0.5 s,
    a default run's epoch ~5 s on 2 CPU cores, so drawing every epoch cost ~8% of its time."""

    def __init__(self, path: Path, every: float = 60.0, clock=time.monotonic):
        self.path, self.every, self.clock, self.drawn = path, every, clock, None

    def epoch_end(self, history: list[dict], last: bool) -> bool:
        """Redraw if due (always when `last`); -> whether it was drawn."""
        if not last and self.drawn is not None and self.clock() - self.drawn < self.every:
            return False
        draw_curves(history, self.path)
        self.drawn = self.clock()
        return True


def draw_curves(history, path):
    """Loss, learning rate, temperature and val recall of `history` (log.jsonl's entries) -> `path`."""
    from clip_foundation.evaluate.plots import training_curves
    training_curves(history, path)
