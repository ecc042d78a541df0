"""Several timm models side by side as one image tower (`--image.name=A+B`): each sees the image in its
own normalisation, their features are concatenated, and the tower saves, loads, exports and describes
itself as one."""
import json

import pytest
import torch

from clipModel import CLIPConfig, CLIPModel, ConfigError, ImageEncoder, ImageEncoderConfig, TextEncoderConfig

TEXT = TextEncoderConfig(kind="scratch", width=16, depth=1, heads=2, vocab_size=40, max_length=16, pooling="mean")
CAPTIONS = ["a red circle", "a blue square", "a green star"] * 3


def side_by_side(pool_blocks: int = 1, **kwargs) -> ImageEncoderConfig:
    return ImageEncoderConfig(kind="timm", name="test_efficientnet+test_resnet", pretrained=False, image_size=64,
                              pool_blocks=pool_blocks, **kwargs)


@pytest.mark.slow  # builds and loads two timm models
@pytest.mark.parametrize("pool_blocks", [0, 1])
def test_each_model_sees_the_image_in_its_own_normalisation_and_their_features_are_concatenated(pool_blocks):
    import timm
    import timm.data
    from timm_towers import multiscale
    torch.manual_seed(0)
    cfg = side_by_side(pool_blocks)
    encoder = ImageEncoder.build(cfg).eval()
    cfg = encoder.resolve_config(cfg)
    images = torch.randn(2, 3, 64, 64)
    pixels = images * torch.tensor(cfg.std).view(1, 3, 1, 1) + torch.tensor(cfg.mean).view(1, 3, 1, 1)
    expected = []
    for net, name in zip(encoder.model.nets, cfg.name.split("+")):
        reference = timm.create_model(name, pretrained=False, num_classes=0).eval()
        reference.load_state_dict(net.state_dict())
        own = timm.data.resolve_model_data_config(reference)
        x = (pixels - torch.tensor(own["mean"]).view(1, 3, 1, 1)) / torch.tensor(own["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            expected.append(multiscale(reference, x, pool_blocks))
    with torch.no_grad():
        got = encoder(images)
    torch.testing.assert_close(got, torch.cat(expected, 1))
    assert encoder.out_dim == got.shape[1] == sum(e.shape[1] for e in expected)


@pytest.mark.slow
def test_a_side_by_side_model_saves_and_loads_with_the_same_embeddings(tmp_path):
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(image=side_by_side(), text=TEXT, projection_dim=16), captions=CAPTIONS).eval()
    loaded = CLIPModel.from_pretrained(model.save_pretrained(tmp_path / "run"))
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]["image"]
    assert saved["name"] == "test_efficientnet+test_resnet"


def test_side_by_side_refuses_what_needs_one_model():
    with pytest.raises(ConfigError, match="image.weights_file.*several models"):
        CLIPConfig(image=side_by_side(weights_file="/x/w.pth"), text=TEXT).validate()
    with pytest.raises(ConfigError, match="image.name"):
        CLIPConfig(image=ImageEncoderConfig(kind="timm", name="resnet18+", pretrained=False), text=TEXT).validate()
    encoder = ImageEncoder.build(side_by_side())
    with pytest.raises(ConfigError, match="train_image_blocks needs one timm model"):
        encoder.blocks()

