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

# ---------------------------------------------------------------- 9. a Hub id as --checkpoint


@pytest.fixture
def hub_repo(tiny_run, offline_hub, tmp_path, monkeypatch):
    """tiny_run as Hub repo user/tiny-clip in the (offline) Hub cache, and an empty working directory."""
    _, run_dir, _ = tiny_run
    repo = hub_cache(offline_hub, "user/tiny-clip", run_dir, hub.files_to_push(run_dir))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return repo / "snapshots" / REV


def _images(tiny_run, tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    for image in sorted((tiny_run[0] / "images").glob("*.png"))[:6]:
        shutil.copy(image, folder)
    return folder


HUB_COMMANDS = {  # what -> a call with the Hub id as the checkpoint
    "evaluate": lambda run, tmp: evaluate.main(["--checkpoint=user/tiny-clip", "--engine=torch"]),
    "evaluate clip_benchmark": lambda run, tmp: evaluate.main(["--checkpoint=user/tiny-clip", "--engine=torch",
                                                               "--format=clip_benchmark"]),
    "search": lambda run, tmp: search.main(["a red circle", "--checkpoint=user/tiny-clip", "-n", "3",
                                            "--engine=torch"]),
    "search --build_index": lambda run, tmp: search.main(["--build_index", "--checkpoint=user/tiny-clip",
                                                          f"--data={_images(run, tmp)}", f"--out={tmp / 'ix'}"]),
    "embed": lambda run, tmp: embed.main(["--checkpoint=user/tiny-clip", f"--data={_images(run, tmp)}",
                                          f"--out={tmp / 'emb'}", "--progress=false", "--engine=torch"]),
    "export": lambda run, tmp: export.main(["user/tiny-clip"]),
    "Gallery.from_run": lambda run, tmp: Gallery.from_run("user/tiny-clip").find_matches("a red circle", n=3),
}


@pytest.mark.parametrize("what", sorted(HUB_COMMANDS))
def test_a_hub_id_loads_everywhere_and_writes_nothing_into_the_working_directory(what, hub_repo, tiny_run, tmp_path):
    for _ in range(2):  # the second run would find a ./user/tiny-clip the first one left
        assert HUB_COMMANDS[what](tiny_run, tmp_path)
        assert not list(Path.cwd().iterdir()), list(Path.cwd().iterdir())


@pytest.mark.parametrize("fmt,written", [("clip_foundation", "eval_test.json"),
                                         ("clip_benchmark", "eval_test_clip_benchmark.json")])
def test_a_hub_models_evaluation_goes_beside_it_in_the_cache(fmt, written, hub_repo):
    result = evaluate.main(["--checkpoint=user/tiny-clip", "--engine=torch", f"--format={fmt}"])
    saved = json.loads((hub_repo / written).read_text())
    assert saved == result
    assert saved.get("checkpoint", saved.get("pretrained")) == "user/tiny-clip"  # named as the user named it


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


# ---------------------------------------------------------------- 14. checked before anything is allocated


ALLOCATION_PROBE = """
import json, resource, sys
import torch
from clipModel import CheckpointError, CLIPModel
torch.set_num_threads(1)
CLIPModel.from_pretrained(sys.argv[1])  # everything imported and warmed up with the model as saved
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
limit = size + (512 << 20)  # 512 MiB more: far less than a {dim} x {dim} projection
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    CLIPModel.from_pretrained(sys.argv[2])
except CheckpointError as e:
    print("refused:", e)
"""


@pytest.mark.slow
@pytest.mark.parametrize("dim", [20000, 10**9])
def test_a_config_that_does_not_fit_the_weights_is_refused_before_allocating(dim, tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("last", "index", "engines", "tensorboard"))
    config = json.loads((damaged / "config.json").read_text())
    config["model"]["projection_dim"] = dim
    (damaged / "config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-c", ALLOCATION_PROBE.format(dim=dim), str(run_dir), str(damaged)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("refused:"), done.stderr[-2000:]
    assert "does not match model.safetensors" in done.stdout and done.stdout.count("\n") == 1


def test_a_header_that_does_not_fit_the_config_is_one_line(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("last", "index", "engines", "tensorboard"))
    config = json.loads((damaged / "config.json").read_text())
    config["model"]["text"]["depth"] += 1  # a block the weights file does not have
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match model.safetensors") as caught:
        CLIPModel.from_pretrained(damaged)
    assert "\n" not in str(caught.value)
