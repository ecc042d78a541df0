"""Issue #29, "nothing read from outside the dataset, nothing stale served": a push publishes no
path of this machine, a Hub id works as --checkpoint everywhere and writes nothing into the working
directory, run names are one line of safe characters, a push never overwrites a card someone wrote
(nor pushes to an invalid id), a config that does not fit its weights is refused before anything is
allocated, and metrics.json values that are not finite numbers never reach the model-index."""
import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from clip_foundation import embed, evaluate, export, hub, search, train
from clip_foundation.checkpoint import new_run_dir
from clip_foundation.gallery import Gallery
from clip_foundation.modelcard import CARD, write_model_card
from clipModel import CheckpointError, CLIPConfig, CLIPModel, ConfigError, ImageEncoderConfig, TextEncoderConfig
from test_hub import REV, card_metadata, embeddings, hub_cache, offline_hub, recorded_hub, run_copy  # noqa: F401

# ---------------------------------------------------------------- 10. run names


BAD_NAMES = ["inj\n---\nlicense: evil\n<img src=x onerror=alert(1)>", ".hidden", "two words", "tab\tname",
             "a<b", "x;rm", "café", "~home"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_run_name_is_one_line_of_safe_characters(name, tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exc:
        train.main([f"--run_name={name}", f"--data={tmp_path / 'no-data'}", f"--out_dir={out}", "--progress=false"])
    error, usage = str(exc.value).split("\n", 1)
    assert error.startswith("error: --run_name=") and "must be" in error and usage == train.USAGE
    assert not out.exists()  # refused before any work
    with pytest.raises(ConfigError):  # the library's own writer refuses it too
        new_run_dir(str(out), name)
    assert not out.exists() or not list(out.iterdir())


def test_safe_run_names_are_accepted(tmp_path):
    for name in ("run-1.v2_x", "A", "0", "tiny"):
        cfg = train.RunConfig()
        cfg.train.run_name = name
        cfg.validate()
    folder, lock = new_run_dir(str(tmp_path), "run-1.v2_x")
    lock.close()
    assert folder.name == "run-1.v2_x"
