"""Named recipes for train.py: `--preset=NAME` stands for a list of --key=value options."""
from __future__ import annotations

from clip_foundation.common import cli
from clip_foundation.pretrained import require_package, text_model_folder


LITES = ("tf_efficientnet_lite2", "tf_efficientnet_lite1", "tf_efficientnet_lite0")  # 260, 240, 224 px


def _flickr8k_pretrained() -> list[str]:
    # ImageNet EfficientNet-Lite2, -Lite1 and -Lite0 side by side + all-MiniLM-L6-v2, all from pip
    # packages (no download) and all frozen: their features are computed once and only the projection
    # heads and temperature train, which fits a 2-core CPU. The three networks' features together:
    # +3 dev R@1 over Lite2's alone (docs/results.md), for 2.2x its encoding (bf16 where the CPU has it).
    for name in LITES:
        require_package(name)  # else timm would try to download its own copy
    return ["--image.kind=timm", f"--image.name={'+'.join(LITES)}",
            # each one's last 2 blocks' pooled outputs beside its ImageNet head's: +2 dev R@1 (multi-scale)
            "--image.pool_blocks=2",
            "--text.kind=hf", f"--text.name={text_model_folder()}", "--text.pooling=mean",
            "--freeze_image", "--freeze_text", "--augment=false", "--captions_per_epoch=5",
            # large batches of cached features: more negatives per step (batch 2048: dev R@1 21.9 vs 20.5
            # at 256), the epoch picked on 500 images carved from train, never on the reported split
            "--epochs=8", "--batch_size=2048", "--lr=3e-3", "--warmup_steps=5", "--weight_decay=0.1",
            "--projection_dim=512", "--dropout=0.3",  # wider heads, more dropout: +1.5 dev R@1
            # a fifth of the image features dropped each step (their augmentation) and a sharper start
            # (temperature 0.05 for CLIP's 0.07): dev R@1 27.8 -> 28.4, 3 seeds (docs/results.md)
            "--feature_dropout=0.2", "--init_temperature=0.05",
            "--val_from_train=500",
            # querybank normalisation with 10,000 training captions: fewer hub images (+2 dev R@1 t->i)
            "--querybank=10000"]


def _tutorial() -> list[str]:
    # The seed tutorial's recipe on its encoders (ViT + DistilBERT from the Hub, fine-tuned):
    # heads 1e-3, image tower 1e-4, text tower 1e-5, ReduceLROnPlateau(factor 0.8, patience 1).
    return ["--image.kind=hf", "--text.kind=hf", "--text.pooling=cls", "--lr=1e-3", "--image_lr=1e-4",
            "--text_lr=1e-5", "--weight_decay=1e-3", "--schedule=plateau", "--plateau_factor=0.8",
            "--plateau_patience=1", "--epochs=4", "--batch_size=32", "--captions_per_epoch=1"]


PRESETS = {"flickr8k-pretrained": _flickr8k_pretrained, "tutorial": _tutorial}  # name -> the --key=value list it stands for


def expand_preset(argv: list[str]) -> list[str]:
    """Replace --preset=NAME by its options, placed first so later options override them."""
    rest, preset = [], None
    it = iter(argv)
    for arg in it:
        if arg == "--preset":
            preset = next(it, "")
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if preset is None:
        return rest
    if preset not in PRESETS:
        raise cli.ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]() + rest
