"""clipModel: encoders of every kind, projection head, temperature, save/load, loss."""
import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clipModel
from clipModel import (CheckpointError, CLIPConfig, CLIPModel, ConfigError, ImageEncoder, ImageEncoderConfig, ProjectionHead,
                       TextEncoderConfig, image_transform)
from clip_foundation.data.splits import decode_images
from clipModel import to_model_input
from clipModel import clip_loss
from clip_foundation.data.records import Record

from conftest import TINY_CAPTIONS as CAPTIONS


def scratch_config(**kw) -> CLIPConfig:
    return CLIPConfig(image=ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=1, heads=2),
                      text=TextEncoderConfig(kind="scratch", width=32, depth=1, heads=2, vocab_size=100,
                                             pooling="mean"), **kw)


def hf_config(root, pooling="cls") -> CLIPConfig:
    return CLIPConfig(image=ImageEncoderConfig(kind="hf", name=str(root / "vit")),
                      text=TextEncoderConfig(kind="hf", name=str(root / "bert"), pooling=pooling))


@pytest.mark.parametrize("batch,scale", [(2, 1.0), (5, 14.3), (16, 100.0)])
def test_clip_loss_matches_transformers_reference(batch, scale):
    from transformers.models.clip import modeling_clip  # the name changed across versions
    reference = getattr(modeling_clip, "clip_loss", None) or modeling_clip.image_text_contrastive_loss
    torch.manual_seed(batch)
    img, txt = F.normalize(torch.randn(batch, 8), dim=-1), F.normalize(torch.randn(batch, 8), dim=-1)
    expected = reference(scale * txt @ img.T)  # transformers takes logits_per_text
    torch.testing.assert_close(clip_loss(img, txt, torch.tensor(scale)), expected)


def test_clip_loss_prefers_matched_pairs():
    feats = F.normalize(torch.randn(8, 16), dim=-1)
    matched = clip_loss(feats, feats, torch.tensor(20.0))
    shuffled = clip_loss(feats, feats.roll(1, 0), torch.tensor(20.0))
    assert matched < 0.1 < shuffled


def test_projection_head_is_the_seed_design():
    torch.manual_seed(0)
    head = ProjectionHead(12, dim=6, dropout=0.5).eval()
    x = torch.randn(4, 12)
    projected = head.projection(x)
    expected = F.layer_norm(head.fc(F.gelu(projected)) + projected, (6,),
                            head.layer_norm.weight, head.layer_norm.bias)
    torch.testing.assert_close(head(x), expected)
    head.train()
    assert not torch.allclose(head(x), head(x))  # dropout active in training


def test_temperature_init_and_clamp():
    model = CLIPModel(scratch_config(), captions=CAPTIONS)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    tokens = model.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) > 100
    _, _, scale = model(torch.randn(2, 3, 32, 32), **tokens)
    assert scale.item() == pytest.approx(100.0)
    scale.backward()
    assert model.logit_scale.grad.item() == 0.0  # clamped: no push further up


@pytest.mark.parametrize("normalize", [True, False])
def test_encoders_give_unit_features_when_normalized(normalize):
    model = CLIPModel(scratch_config(projection_dim=16), captions=CAPTIONS).eval()
    img = model.encode_image(torch.randn(3, 3, 32, 32), normalize=normalize)
    txt = model.encode_text(CAPTIONS, normalize=normalize)
    assert img.shape == txt.shape == (3, 16)
    norms = torch.cat([img.norm(dim=-1), txt.norm(dim=-1)])
    assert torch.allclose(norms, torch.ones(6), atol=1e-5) == normalize


def test_scratch_text_ignores_padding():
    model = CLIPModel(scratch_config(), captions=CAPTIONS).eval()
    alone = model.encode_text(["a red circle"])
    padded = model.encode_text(["a red circle", CAPTIONS[2]])[:1]  # padded to the longer caption
    torch.testing.assert_close(alone, padded)


def test_hf_towers_load_from_local_folders(tiny_hf):
    from transformers import ViTModel
    model = CLIPModel(hf_config(tiny_hf)).eval()
    image_cfg = model.config.image
    assert image_cfg.image_size == 32 and image_cfg.mean == (0.4, 0.5, 0.6)  # the encoder's own
    images = torch.randn(2, 3, 32, 32)
    reference = ViTModel.from_pretrained(tiny_hf / "vit").eval()(pixel_values=images).last_hidden_state[:, 0]
    torch.testing.assert_close(model.image_encoder(images), reference)  # CLS token


def test_mean_pooling_masks_padding(tiny_hf):
    model = CLIPModel(hf_config(tiny_hf, pooling="mean")).eval()
    tokens = model.tokenize(["a red circle", CAPTIONS[0]])
    hidden = model.text_encoder.model(**tokens).last_hidden_state[0]
    expected = hidden[: int(tokens["attention_mask"][0].sum())].mean(0)
    torch.testing.assert_close(model.text_encoder(**tokens)[0], expected)


@pytest.mark.parametrize("kind", ["scratch", "hf", "timm"])
def test_save_load_round_trip_gives_identical_embeddings(kind, tiny_hf, tmp_path):
    if kind == "scratch":
        cfg = scratch_config()
    elif kind == "hf":
        cfg = hf_config(tiny_hf)
    else:
        cfg = scratch_config()
        cfg.image = ImageEncoderConfig(kind="timm", name="resnet18", pretrained=False, image_size=32)
    model = CLIPModel(cfg, captions=CAPTIONS).eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = CLIPModel.from_pretrained(tmp_path / "ckpt")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_text(CAPTIONS), model.encode_text(CAPTIONS), rtol=0, atol=0)
    assert loaded.config == model.config


def test_timm_weights_file_is_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file
    source = timm.create_model("resnet18", pretrained=False)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    cfg = scratch_config()
    cfg.image = ImageEncoderConfig(kind="timm", name="resnet18", weights_file=str(tmp_path / "w.safetensors"))
    model = CLIPModel(cfg, captions=CAPTIONS)
    torch.testing.assert_close(model.image_encoder.model.conv1.weight, source.conv1.weight)
    assert model.config.image.image_size == 224  # timm's own input size
    assert model.config.image.mean == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize("tower", ["image", "text"])
def test_missing_weights_error_names_offline_options(tower):
    cfg = scratch_config()
    if tower == "image":
        cfg.image = ImageEncoderConfig(kind="hf", name="no-such-org/no-such-model")
    else:
        cfg.text = TextEncoderConfig(kind="hf", name="no-such-org/no-such-model")
    with pytest.raises(OSError, match=r"Offline options:.*scratch"):
        CLIPModel(cfg, captions=CAPTIONS)


def test_missing_timm_weights_file_is_a_clear_error(tmp_path):
    cfg = scratch_config()
    cfg.image = ImageEncoderConfig(kind="timm", name="resnet18", weights_file=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        CLIPModel(cfg, captions=CAPTIONS)


def test_from_pretrained_rejects_a_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIPModel.from_pretrained(tmp_path)


def test_cached_and_direct_image_paths_agree(tmp_path):
    from PIL import Image
    path = tmp_path / "photo.png"
    Image.fromarray((torch.rand(40, 60, 3) * 255).byte().numpy()).save(path)
    cfg = ImageEncoderConfig(kind="scratch", image_size=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    with Image.open(path) as im:
        direct = image_transform(cfg, train=False)(im)
    cached, _ = decode_images([Record(path, ["x"])], 32, cache_dir=str(tmp_path / "cache"), progress=False)
    torch.testing.assert_close(to_model_input(cached, cfg.mean, cfg.std)[0], direct, rtol=0, atol=0)


def test_batch_augmentation_is_a_crop():
    images = (torch.rand(4, 3, 16, 16) * 255).byte()
    plain = to_model_input(images, (0.5,) * 3, (0.5,) * 3)
    identity = to_model_input(images, (0.5,) * 3, (0.5,) * 3, augment=True, scale=(1, 1), ratio=(1, 1))
    torch.testing.assert_close(identity, plain, atol=1e-5, rtol=0)  # a full-size crop changes nothing
    torch.manual_seed(0)
    cropped = to_model_input(images, (0.5,) * 3, (0.5,) * 3, augment=True, scale=(0.5, 0.5))
    assert cropped.shape == plain.shape and not torch.allclose(cropped, plain)
    assert cropped.min() >= plain.min() - 1e-5 and cropped.max() <= plain.max() + 1e-5  # interpolation only


# ---------------------------------------------------------------- damaged or hostile checkpoint folders

@pytest.fixture
def saved(tmp_path):
    model = CLIPModel(scratch_config(), captions=CAPTIONS).eval()
    return model.save_pretrained(tmp_path / "ckpt")


def _overwrite_middle(path, data: bytes):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(data)
    assert path.stat().st_size == size


def test_nan_weights_in_a_same_size_file_are_refused(saved):
    _overwrite_middle(saved / "model.safetensors", b"\xff" * 4096)  # 0xffffffff is a float32 NaN
    with pytest.raises(CheckpointError, match=r"ckpt.*model.safetensors.*non-finite"):
        CLIPModel.from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_damaged_weights_file_is_one_clear_error(saved, damage):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "header": b"\x00" * 64 + data[64:],
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"ckpt.*model.safetensors.*(corrupt|truncated)"):
        CLIPModel.from_pretrained(saved)


@pytest.mark.parametrize("change,what", [
    ({"image": {"width": 64}}, "image_encoder"),
    ({"projection_dim": 64}, "projection"),
    ({"image": {"image_size": 48}}, "image_encoder"),
    ({"text": {"kind": "hf", "name": "bert"}}, "text"),
])
def test_config_that_no_longer_matches_the_weights_is_named(saved, change, what):
    path = saved / "config.json"
    config = json.loads(path.read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            config["model"][key].update(value)
        else:
            config["model"][key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"ckpt.*config.json.*(match|mismatch).*{what}|ckpt.*{what}"):
        CLIPModel.from_pretrained(saved)


@pytest.mark.parametrize("text,problem", [("{\n", "not valid JSON"), ('{"data": {}}', 'no "model"'),
                                          ('{"model": {"image": 3}}', "invalid model config")])
def test_broken_config_json_names_the_file(saved, text, problem):
    (saved / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"ckpt.config\.json.*{problem}"):
        CLIPModel.from_pretrained(saved)


def test_checkpoint_folder_cannot_run_code(saved, monkeypatch):
    """A tokenizer_config.json whose auto_map points at a .py beside it must never be imported,
    nor make transformers ask on stdin whether to run it."""
    marker = saved / "ran"
    (saved / "evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('pwned')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTok(PreTrainedTokenizerFast):\n    pass\n")
    path = saved / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTok"]}
    config["tokenizer_class"] = "EvilTok"  # no class transformers knows: it would ask, then import evil.py
    path.write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # a "y" at the prompt ran it before
    try:
        CLIPModel.from_pretrained(saved)
    except (CheckpointError, ValueError):
        pass  # refusing is fine; running the code is not
    assert not marker.exists()


# ---------------------------------------------------------------- the SigLIP option

@pytest.mark.parametrize("batch,scale,bias", [(1, 10.0, -10.0), (4, 3.0, 0.5), (9, 25.0, -4.0)])
def test_siglip_loss_matches_the_per_pair_definition(batch, scale, bias):
    from clipModel import siglip_loss
    g = torch.Generator().manual_seed(batch)
    img = F.normalize(torch.randn(batch, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(batch, 8, generator=g), dim=-1)
    expected = 0.0
    for i in range(batch):
        for j in range(batch):
            z = scale * float(img[i] @ txt[j]) + bias
            expected += math.log1p(math.exp(-z)) if i == j else math.log1p(math.exp(z))  # -log sigmoid(+-z)
    got = siglip_loss(img, txt, torch.tensor(scale), torch.tensor(bias))
    assert got.item() == pytest.approx(expected / batch, rel=1e-5)


def test_siglip_model_has_a_bias_that_round_trips(tmp_path):
    plain = CLIPModel(scratch_config(), captions=CAPTIONS)
    assert not hasattr(plain, "logit_bias")
    model = CLIPModel(scratch_config(loss="siglip"), captions=CAPTIONS)
    assert model.logit_bias.item() == -10.0
    with torch.no_grad():
        model.logit_bias.fill_(-3.5)
    loaded = CLIPModel.from_pretrained(model.save_pretrained(tmp_path / "s"))
    assert loaded.config.loss == "siglip" and loaded.logit_bias.item() == -3.5
    with pytest.raises(ValueError, match="--loss=.hinge.: must be clip or siglip"):
        CLIPModel(scratch_config(loss="hinge"), captions=CAPTIONS)


@pytest.mark.parametrize("name, blocks", [("test_efficientnet", 2), ("resnet18", 1), ("resnet18", 2)])
def test_pool_blocks_appends_the_last_blocks_pooled_outputs(name, blocks):
    import timm
    torch.manual_seed(0)
    cfg = ImageEncoderConfig(kind="timm", name=name, pretrained=False, image_size=64, pool_blocks=blocks)
    encoder = ImageEncoder.build(cfg).eval()
    for bn in (m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert bn.running_var.eq(1).all()  # sizing the output ran in eval mode: no statistic moved
    reference = timm.create_model(name, pretrained=False, num_classes=0).eval()
    reference.load_state_dict(encoder.model.state_dict())
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        taps = []  # the outputs of the last `blocks` blocks, by forward hooks on the reference
        stages = reference.blocks if hasattr(reference, "blocks") else [reference.layer1, reference.layer2,
                                                                        reference.layer3, reference.layer4]
        hooks = [b.register_forward_hook(lambda _m, _i, out: taps.append(out.mean((2, 3))))
                 for b in list(stages)[-blocks:]]
        expected = torch.cat([reference(images), *taps], 1)
        for h in hooks:
            h.remove()
        got = encoder(images)
    assert encoder.out_dim == expected.shape[1] > reference.num_features
    torch.testing.assert_close(got, expected)


SCRATCH = dict(image=ImageEncoderConfig(kind="scratch", width=32, depth=1, heads=2),
               text=TextEncoderConfig(kind="scratch", width=32, depth=1, heads=2, vocab_size=64))


@pytest.mark.parametrize("change, key", [
    ({"projection_dim": 0}, "projection_dim"),  # 0-d embeddings trained to recall 0
    ({"init_temperature": 0.0}, "init_temperature"),  # ZeroDivisionError
    ({"dropout": 1.0}, "dropout"),
    ({"loss": "hinge"}, "loss"),
    ({"text": {"vocab_size": 0}}, "text.vocab_size"),
    ({"text": {"max_length": 0}}, "text.max_length"),  # RuntimeError in the position embedding
    ({"text": {"pooling": "max"}}, "text.pooling"),
    ({"text": {"kind": "rnn"}}, "text.kind"),
    ({"image": {"patch_size": 0}}, "image.patch_size"),  # ZeroDivisionError
    ({"image": {"patch_size": 6}}, "image.patch_size"),  # the conv stem halves the side
    ({"image": {"heads": 3}}, "image.heads"),  # 32 channels do not split into 3 heads
    ({"image": {"merge_after": -1, "depth": 2}}, "image.merge_after"),
    ({"image": {"merge_after": 1, "depth": 2, "image_size": 24}}, "image.merge_after"),  # a 3x3 grid
    ({"image": {"pool_blocks": 99}}, "image.pool_blocks"),  # silently ignored by the scratch ViT
    ({"image": {"std": (0.5, 0.0, 0.5)}}, "image.std"),
    ({"image": {"kind": "timm", "name": "resnet18", "pretrained": False, "pool_blocks": 99}},
     "image.pool_blocks"),  # AssertionError inside timm
])
def test_a_model_value_out_of_range_is_one_line_naming_the_key(change, key):
    parts = {tower: replace(SCRATCH[tower], **change.pop(tower, {})) for tower in ("image", "text")}
    config = CLIPConfig(**parts, **{"projection_dim": 16, **change})
    with pytest.raises(ConfigError, match=rf"^--{re.escape(key)}=.*: must be ") as raised:
        CLIPModel(config, captions=["a red circle", "a blue square"] * 4)
    assert "\n" not in str(raised.value)


def test_every_tower_kind_is_one_adapter_with_the_same_interface():
    # a new kind is one class in these tables: nothing else switches on `kind`
    from clipModel import IMAGE_ENCODERS, TEXT_ENCODERS, ImageEncoder, TextEncoder, tower_adapter
    assert set(IMAGE_ENCODERS) == {"hf", "timm", "scratch"} and set(TEXT_ENCODERS) == {"hf", "scratch"}
    for tower, kinds, base in (("image", IMAGE_ENCODERS, ImageEncoder), ("text", TEXT_ENCODERS, TextEncoder)):
        for kind in list(kinds):  # an adapter in its own file (hf_towers, timm_towers, scratch_towers) is imported when asked for
            adapter = tower_adapter(tower, kind)
            assert issubclass(adapter, base) and adapter.kind == kind and kinds[kind] is adapter
    for name in ("clipModel", "hf_towers", "timm_towers", "scratch_towers"):
        source = (Path(clipModel.__file__).parent / f"{name}.py").read_text()
        assert not re.search(r"\bkind\s*(==|!=)", source), name


@pytest.mark.parametrize("merge_after", [1, 2])
def test_merging_tokens_pools_the_patch_grid_2x2_between_the_blocks(merge_after):
    """--image.merge_after=N: the blocks after N see each 2x2 of patch tokens averaged into one (the
    CLS token kept), by a reference written with avg_pool2d over the (side x side) grid."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    config = replace(SCRATCH["image"], image_size=32, depth=3, merge_after=merge_after)
    tower = CLIPModel(CLIPConfig(image=config, text=SCRATCH["text"], projection_dim=16),
                      captions=["a red circle", "a blue square"] * 4).image_encoder.model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        x = tower.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([tower.cls_token.expand(3, -1, -1), x], dim=1) + tower.pos_embed
        for block in tower.blocks[:merge_after]:
            x = block(x)
        grid = x[:, 1:].transpose(1, 2).reshape(3, -1, 4, 4)  # (B, C, side, side)
        pooled = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (B, 4, C)
        x = torch.cat([x[:, :1], pooled], dim=1)
        for block in tower.blocks[merge_after:]:
            x = block(x)
        torch.testing.assert_close(tower(images), tower.ln(x[:, 0]))
        unmerged = replace(config, merge_after=0)
        plain = CLIPModel(CLIPConfig(image=unmerged, text=SCRATCH["text"], projection_dim=16),
                          captions=["a red circle", "a blue square"] * 4).image_encoder.model.eval()
        plain.load_state_dict(tower.state_dict())  # the same weights: merging adds none
        assert not torch.allclose(plain(images), tower(images))
