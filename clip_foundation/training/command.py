"""Train a CLIP model. With no arguments: the small from-scratch CLIP on the synthetic set.

    python train.py                                   # offline demo, 1-2 minutes on a CPU
    python train.py --epochs=30 --batch_size=256      # any config key as --key=value
    python train.py --help                            # every key, its default and why

What the command adds to `train()`: once the best model is tested, the tested split is indexed for
search and the query grids (matches.png) are drawn, a step composed here, outside the loop.
"""
from __future__ import annotations

import sys
from pathlib import Path

from clip_foundation.common import cli, distributed
from clip_foundation.data.records import DataError, DataWarning
from clip_foundation.data.synthetic import example_queries
from clip_foundation.training.config import USAGE, RunConfig, resolve_config
from clip_foundation.training.loop import train
from clip_foundation.training.step import NonFiniteLoss
from clipModel import CheckpointError, CLIPModel


def run(cfg: RunConfig, on_epoch=None):
    """What `python train.py` does: `train(cfg)`, then the tested split indexed and its query grids drawn."""
    return train(cfg, on_epoch, on_tested=lambda *tested: present(cfg, *tested))


def present(cfg: RunConfig, model: CLIPModel, run_dir: Path, records, inputs) -> None:
    """Index the tested split in RUN/index/ (from its decoded images, or a frozen tower's features:
    no re-encoding), draw the queries' best matches in matches.png, and rewrite the model card."""
    from clip_foundation.evaluate.modelcard import write_model_card
    from clip_foundation.evaluate.plots import query_grids
    from clip_foundation.search.gallery import find_matches, load_or_build_index
    index = load_or_build_index(model, run_dir, records, images=inputs.images, tower_features=inputs.image_features)
    queries = cfg.train.queries or example_queries(cfg.data.path)
    query_grids({q: find_matches(model, index, q, n=6) for q in queries}, path=run_dir / "matches.png")
    write_model_card(run_dir)  # now with the figures
    print(f"saved model, config, metrics.json, log.jsonl, curves.png and matches.png in {run_dir}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(cli.help_text(RunConfig(), USAGE))
        return None
    try:
        cfg = resolve_config(argv)
    except (cli.ConfigError, CheckpointError, OSError) as e:
        sys.exit(f"error: {e}\n{USAGE}")
    try:
        with cli.reported_warnings(DataWarning) as data_issues:
            result = run(cfg)
        if data_issues and distributed.is_main():
            print("data issues in this run (skipped items are counted here):")
            print("\n".join(f"  - {issue}" for issue in data_issues))
        return result
    except (NonFiniteLoss, DataError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    from clip_foundation.commands import run as run_command
    raise SystemExit(run_command("train", main))  # this module's main, not a second copy of it
