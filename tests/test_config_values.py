"""Every training, data and model value out of its range is refused before any work, with one line
naming the key, the value and what it may be (issue #24: nonsense values used to train with exit 0)."""
import pytest

from clip_foundation import training as train
from clip_foundation.data.splits import DataConfig, split_by_image
from clip_foundation.data.records import Record
from clipModel import ConfigError

BAD_VALUES = [
    # the model's values (CLIPConfig.validate)
    "--image.patch_size=0", "--init_temperature=0", "--text.max_length=0", "--image.heads=3",
    "--image.pool_blocks=99",
    # training values (TrainConfig.validate)
    "--lr=-1", "--lr=0", "--lr=nan", "--image_lr=-1", "--text_lr=-1", "--weight_decay=-0.1",
    "--epochs=0", "--epochs=-1", "--batch_size=0", "--batch_size=-4", "--batch_size=1",
    "--accum_steps=0", "--accum_steps=3", "--captions_per_epoch=0", "--schedule=linear",
    "--warmup_steps=-1", "--plateau_factor=0", "--plateau_factor=1.5", "--plateau_patience=-1",
    "--train_image_blocks=-1", "--train_text_blocks=-2", "--grad_clip=-1", "--precision=fp8",
    "--images_on_device=maybe", "--seed=-1", "--device=cuda:99", "--device=tpu", "--log_every=0",
    "--save_every=-1", "--querybank=-5", "--feature_dropout=1", "--feature_dropout=-0.1",
    "--feature_dropout=0.2",  # without cached features (--freeze_image --augment=false) it would do nothing "--run_name=../elsewhere", "--run_name=a/b", "--out_dir=",
    # data values (DataConfig.validate)
    "--val_images=-5", "--test_images=-1", "--val_from_train=-1", "--layout=xml", "--train_samples=-1",
    "--workers=-1", "--streams=-1", "--shuffle_buffer=-1", "--synthetic_dir=",
]


@pytest.mark.parametrize("option", BAD_VALUES)
def test_a_value_out_of_range_is_one_line_before_any_work(tmp_path, option):
    out = tmp_path / "runs"
    places = [f"--data={tmp_path / 'no-data'}"] + ([] if option.startswith("--out_dir") else [f"--out_dir={out}"])
    with pytest.raises(SystemExit) as exc:
        train.main([option, *places, "--progress=false"])
    first = str(exc.value).splitlines()[0]
    key = option[2:].split("=")[0].split(".")[-1]
    assert first.startswith("error: --") and f"{key}=" in first and ": must be " in first, first
    assert "usage:" in str(exc.value) and not out.exists()  # refused before a folder or any data


def test_the_range_is_in_the_message(tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.main(["--lr=-1.0", f"--data={tmp_path / 'no-data'}", f"--out_dir={tmp_path}"])
    assert str(exc.value).splitlines()[0] == "error: --lr=-1.0: must be a finite number > 0"


def test_python_callers_get_the_same_check(tmp_path):
    cfg = train.RunConfig()
    cfg.data.path, cfg.train.out_dir = str(tmp_path / "no-data"), str(tmp_path / "runs")
    cfg.train.querybank = -5
    with pytest.raises(ConfigError, match=r"^--querybank=-5: must be >= 0"):
        train.train(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("queries", [("a red circle", "two\nlines"), ("x" * 1001,), ("\u200b",)])
def test_queries_follow_the_caption_rule(queries):
    cfg = train.RunConfig()
    cfg.train.queries = queries
    with pytest.raises(ConfigError, match=r"^--queries=.*: must be "):
        cfg.validate()


def test_defaults_and_presets_are_valid():
    from clip_foundation.training.presets import PRESETS
    train.RunConfig().validate()
    for name in PRESETS:
        try:
            cfg = train.resolve_config([f"--preset={name}"])  # validates
        except OSError:  # the preset's optional packages are not installed here
            continue
        assert cfg.train.epochs >= 1


@pytest.mark.parametrize("n, val, test", [(10, 0, 0), (10, 3, 0), (10, 0, 9), (10, 4, 5), (7, 1, 1)])
def test_seeded_splits_never_overlap(tmp_path, n, val, test):
    DataConfig(val_images=val, test_images=test).validate()
    records = [Record(tmp_path / f"{i}.png", [f"photo {i}"]) for i in range(n)]
    splits = split_by_image(records, val, test, seed=3)
    images = [r.image for s in splits.values() for r in s]
    assert sorted(images) == sorted(r.image for r in records)  # each image in exactly one split
    assert [len(splits[s]) for s in ("val", "test")] == [val, test]
