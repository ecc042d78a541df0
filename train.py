"""Train a CLIP model. With no arguments: the small from-scratch CLIP on the synthetic set.

    python train.py                                   # offline demo, 1-2 minutes on a CPU
    python train.py --epochs=30 --batch_size=256      # any config key as --key=value
    python train.py --help                            # every key, its default and why

The command line of `clip_foundation.training.command`, installed as `clip-train` too."""
from clip_foundation.commands import run

if __name__ == "__main__":
    raise SystemExit(run("train"))  # clip_foundation.training.command.main, its warnings and exit status as clip-train's
