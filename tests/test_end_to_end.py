"""The real entry points (train.main, evaluate.main, search.main) on a tiny synthetic set."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from clip_foundation.evaluate import command as evaluate
from clip_foundation.search import command as search
from clip_foundation.data.splits import gallery_records
from clip_foundation.search import gallery
from clip_foundation import training as train
from conftest import TINY_MODEL
from clip_foundation.data.synthetic import SyntheticConfig, generate

def test_training_learns_far_above_chance(tiny_run):
    _, run_dir, metrics = tiny_run
    chance_r5 = 100 * 5 / metrics["images"]  # 60 test images
    assert metrics["split"] == "test" and metrics["images"] == 60 and metrics["captions"] == 300
    assert metrics["text_to_image_R@5"] > 3 * chance_r5
    assert metrics["image_to_text_R@5"] > 3 * chance_r5


def test_run_folder_has_everything(tiny_run):
    _, run_dir, metrics = tiny_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "log.jsonl",
                 "curves.png", "matches.png", "split.json", "querybank.safetensors"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["epochs"] == 12 and config["model"]["image"]["width"] == 64
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert sum(1 for e in log if e.get("epoch_end")) == 12
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_evaluate_cli_reproduces_training_metrics(tiny_run, tmp_path, capsys):
    data, run_dir, metrics = tiny_run
    out = tmp_path / "eval.json"
    result = evaluate.main(["--checkpoint", str(run_dir), "--data", str(data), "--split", "test",
                            "--out", str(out)])
    out_text = capsys.readouterr().out
    assert "text -> image" in out_text and "+ querybank" in out_text  # the run saved a querybank
    for key in ("text_to_image_R@1", "image_to_text_R@5", "text_to_image_median_rank"):
        assert result[key] == pytest.approx(metrics[key], abs=1e-4)
        assert result["querybank"][key] == pytest.approx(metrics["querybank"][key], abs=1e-4)
    assert json.loads(out.read_text())["images"] == 60


def test_search_cli_finds_what_was_asked_and_caches_the_gallery(tiny_run, tmp_path, capsys):
    data, run_dir, _ = tiny_run
    argv = ["a red circle", "--checkpoint", str(run_dir), "--data", str(data), "-n", "5",
            "--out", str(tmp_path / "grid.png")]
    matches = search.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(matches) == 5 and len(lines) == 6 and (tmp_path / "grid.png").is_file()
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    index_files = sorted((run_dir / "index").glob("*.json"))
    stamp = index_files[0].stat().st_mtime_ns
    assert search.main(argv + ["--json"])[0] == matches[0]  # served from the cache
    assert index_files[0].stat().st_mtime_ns == stamp
    assert json.loads(capsys.readouterr().out)["matches"][0]["path"] == matches[0].path


def test_search_index_is_rebuilt_when_the_model_changes(tiny_run, tmp_path):
    from clipModel import CLIPModel
    data, run_dir, _ = tiny_run
    records = gallery_records(run_dir, str(data), "test")
    model = CLIPModel.from_pretrained(run_dir)
    first = gallery.load_or_build_index(model, run_dir, records)
    copy = tmp_path / "copy"
    with __import__("torch").no_grad():
        model.logit_scale.add_(1.0)  # any weight change gives another model identity
    model.save_pretrained(copy)
    (copy / "index").mkdir()
    for f in (run_dir / "index").iterdir():  # a stale index from the other model
        (copy / "index" / f.name).write_bytes(f.read_bytes())
    rebuilt = gallery.load_or_build_index(model, copy, records)
    assert rebuilt.identity != first.identity


@pytest.mark.parametrize("argv,message", [
    (["--epochs=x"], "epochs"), (["--no_such_key=1"], "unknown option"),
    (["--data=/no/such/folder"], "not found"),
])
def test_train_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert message in str(exc.value)


@pytest.mark.slow
def test_train_help_lists_options(capsys):
    assert train.main(["--help"]) is None
    out = capsys.readouterr().out
    assert "--train.epochs" in out and "--model.image.kind" in out


@pytest.mark.parametrize("tool", ["evaluate", "search"])
def test_missing_checkpoint_is_a_clear_error(tool, tmp_path):
    args = ["--checkpoint", str(tmp_path / "nope"), "--data", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        (evaluate.main(args) if tool == "evaluate" else search.main(["a dog", *args]))
    assert "not a saved CLIPModel folder" in str(exc.value)


@pytest.mark.slow
def test_skip_bad_trains_past_a_corrupt_image_and_reports_it(tmp_path, capsys):
    data = generate(tmp_path / "synthetic", SyntheticConfig(n_train=80, n_val=10, n_test=10), progress=False)
    broken = data / "images" / "00003.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated: cannot be decoded
    argv = [f"--data={data}", f"--out_dir={tmp_path / 'runs'}", "--epochs=1", "--batch_size=16",
            "--progress=false", f"--cache_dir={tmp_path / 'cache'}", *TINY_MODEL]
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert "00003.png" in str(exc.value) and "cannot decode" in str(exc.value)
    _, run_dir, _ = train.main(argv + ["--skip-bad"])
    out = capsys.readouterr()
    assert "data issues in this run" in out.out and "skipped 1 images" in out.out
    assert "00003.png" in out.err  # reported as it happened, too
    assert str(broken) not in (run_dir / "split.json").read_text()


@pytest.mark.slow  # two training runs
def test_a_seed_trains_the_same_heads_whether_features_were_cached_or_computed(tmp_path, monkeypatch):
    """Computing frozen-tower features may draw from torch's global random stream (NNCF's int8
    calibration does); the training that follows must not depend on it: the same --seed gives the
    same heads from an empty cache as from a full one."""
    from safetensors.torch import load_file
    from clip_foundation.training import inputs as inputs_module
    data = generate(tmp_path / "synthetic", SyntheticConfig(n_train=40, n_val=10, n_test=10), progress=False)
    argv = [f"--data={data}", f"--out_dir={tmp_path / 'runs'}", "--epochs=2", "--batch_size=20",
            "--progress=false", f"--cache_dir={tmp_path / 'cache'}", "--freeze_image", "--freeze_text",
            "--augment=false", "--dropout=0.3", "--feature_dropout=0.2", "--tensorboard=false", *TINY_MODEL]
    computed = inputs_module.image_tower_features

    def drawing(*args, **kwargs):  # an engine that draws random numbers while it encodes
        torch.rand(100)
        return computed(*args, **kwargs)
    monkeypatch.setattr(inputs_module, "image_tower_features", drawing)
    _, cold, _ = train.main(argv + ["--run_name=cold"])  # features computed (and random numbers drawn)
    monkeypatch.setattr(inputs_module, "image_tower_features", computed)
    _, warm, _ = train.main(argv + ["--run_name=warm"])  # features read from the cache
    a, b = load_file(cold / "model.safetensors"), load_file(warm / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_frozen_towers_train_only_the_heads_from_cached_features(tmp_path):
    from safetensors.torch import load_file
    data = generate(tmp_path / "synthetic", SyntheticConfig(n_train=120, n_val=20, n_test=30), progress=False)
    argv = [f"--data={data}", f"--out_dir={tmp_path / 'runs'}", "--epochs=3", "--batch_size=30",
            "--progress=false", f"--cache_dir={tmp_path / 'cache'}", "--freeze_image", "--freeze_text",
            "--augment=false", "--captions_per_epoch=2", "--seed=5", *TINY_MODEL]
    from clipModel import CLIPConfig, CLIPModel
    model, run_dir, metrics = train.main(argv + ["--run_name=a"])
    saved = load_file(run_dir / "model.safetensors")
    torch.manual_seed(5)  # the towers were initialised from this seed and never trained:
    config = CLIPConfig.from_dict(json.loads((run_dir / "config.json").read_text())["model"])
    fresh = CLIPModel(config, tokenizer=model.tokenizer)
    for name, value in fresh.state_dict().items():
        if name.startswith(("image_encoder.", "text_encoder.")) and "num_batches" not in name:
            torch.testing.assert_close(saved[name], value, msg=name)
    features = sorted((tmp_path / "cache" / "features").glob("*.safetensors"))
    assert len(features) == 6  # image + text features of train, val and test
    stamps = [f.stat().st_mtime_ns for f in features]
    _, run_b, metrics_b = train.main(argv + ["--run_name=b", "--querybank=100"])  # reuses the cached features
    assert [f.stat().st_mtime_ns for f in features] == stamps
    assert metrics_b["text_to_image_R@1"] == pytest.approx(metrics["text_to_image_R@1"])
    # metrics from cached features equal a full evaluation of the saved model
    full = evaluate.main(["--checkpoint", str(run_dir), "--data", str(data), "--split", "test"])
    for key in ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1", "image_to_text_mean_rank"):
        assert full[key] == pytest.approx(metrics[key], abs=1e-4), key
    # and with run b's querybank; this barely trained model's scores nearly tie and the bias moves them
    # closer still, so the float noise between cached (batch 32) and fresh features flips a few ranks
    full_b = evaluate.main(["--checkpoint", str(run_b), "--data", str(data), "--split", "test"])
    for key in ("text_to_image_R@1", "text_to_image_R@5", "text_to_image_mean_rank"):
        assert full_b["querybank"][key] == pytest.approx(metrics_b["querybank"][key], abs=100 * 3 / 150), key
    # resumed for one more epoch without a querybank: the earlier model's bank goes, not reused
    _, run_b, resumed = train.main([f"--resume={run_b}", "--epochs=4", "--querybank=0", "--progress=false"])
    assert "querybank" not in resumed and not (run_b / "querybank.safetensors").exists()


def test_tensorboard_gets_the_logged_scalars(tiny_run):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (requirements-dev.txt installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, run_dir, _ = tiny_run
    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    assert {"loss", "lr", "temperature", "pairs_per_s", "val/mean_recall"} <= set(board.Tags()["scalars"])
    logged = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    assert [s.value for s in board.Scalars("loss")] == pytest.approx([e["loss"] for e in logged if "loss" in e])


@pytest.mark.slow
def test_siglip_loss_trains_far_above_chance(tmp_path):
    """--loss=siglip on the same set and schedule as the session's clip-loss run (tiny_run)."""
    data = generate(tmp_path / "synthetic", SyntheticConfig(n_train=400, n_val=40, n_test=60), progress=False)
    argv = [f"--data={data}", f"--out_dir={tmp_path / 'runs'}", "--epochs=12", "--batch_size=50",
            "--lr=2e-3", "--warmup_steps=10", "--progress=false", f"--cache_dir={tmp_path / 'cache'}",
            "--loss=siglip", "--init_temperature=0.1", *TINY_MODEL]
    model, run_dir, metrics = train.main(argv)
    assert model.config.loss == "siglip" and model.logit_bias.item() != -10.0  # the bias trained
    chance_r5 = 100 * 5 / metrics["images"]
    assert metrics["text_to_image_R@5"] > 3 * chance_r5 and metrics["image_to_text_R@5"] > 3 * chance_r5


def test_a_moved_run_folder_evaluates_from_another_directory(tiny_run, tmp_path, monkeypatch, capsys):
    data, run_dir, _ = tiny_run
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, moved)  # a copy: tiny_run is shared by other tests
    saved = json.loads((moved / "config.json").read_text())["data"]
    assert Path(saved["path"]).is_absolute() and Path(saved["cache_dir"]).is_absolute()
    monkeypatch.chdir(tmp_path)  # neither the project nor the run's parent
    metrics = evaluate.main([f"--checkpoint={moved}", "--split=test"])
    assert metrics["text_to_image_R@1"] >= 0 and "R@1" in capsys.readouterr().out


def test_a_run_whose_dataset_is_gone_names_it_and_the_data_option(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as stop:
        evaluate.main([f"--checkpoint={moved}"])
    message = str(stop.value.code)
    assert str(tmp_path / "gone") in message and "--data=" in message and "\n" not in message.strip()


def test_a_run_saves_its_local_data_paths_absolute(tmp_path, monkeypatch):
    from clip_foundation.data.splits import DataConfig
    from clip_foundation.training.streaming import StreamConfig
    monkeypatch.chdir(tmp_path)
    saved = DataConfig(path="data/photos", cache_dir="~/cache").absolute()
    assert saved.path == str(tmp_path / "data" / "photos") and saved.synthetic_dir == str(tmp_path / "data" / "synthetic")
    assert saved.cache_dir == os.path.expanduser("~/cache")
    streamed = StreamConfig(val_data="shards/{000..009}.tar", test_data="hf:user/set").absolute()
    assert streamed.val_data == str(tmp_path / "shards/{000..009}.tar")
    assert streamed.test_data == "hf:user/set"  # not a local path: kept as typed
