"""Evaluate a saved CLIP: recall@K both ways on a dataset split, or zero-shot accuracy.
The command line of `clip_foundation.evaluate.command`, installed as `clip-evaluate` too: `python evaluate.py --help`."""
from clip_foundation.commands import run

if __name__ == "__main__":
    raise SystemExit(run("evaluate"))  # clip_foundation.evaluate.command.main, its warnings and exit status as clip-evaluate's
