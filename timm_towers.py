"""The timm tower kind: any timm image model as CLIP's image encoder (`--image.kind=timm`), classifier
removed; with `pool_blocks`, its last blocks' pooled outputs too. An adapter of `clipModel`'s registry
(IMAGE_ENCODERS["timm"]), kept in its own file as open_clip keeps timm_model.py."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from clipModel import OFFLINE_HINT, ConfigError, ImageEncoder, ImageEncoderConfig, _origin, check

# timm model name -> a function giving a local weights file for it (or None): pretrained timm
# towers load from it instead of the hub. clip_foundation.pretrained registers the ImageNet
# weights shipped in pip packages through `TimmImageEncoder.register_offline_weights`.
OFFLINE_WEIGHTS: dict = {}


class TimmImageEncoder(ImageEncoder):
    """Any timm model, classifier removed; with `pool_blocks`, its last blocks' pooled outputs too."""
    kind = "timm"
    memory_format = torch.channels_last  # convolutional towers: ~1.5x faster on a CPU (measured)

    @classmethod
    def register_offline_weights(cls, name: str, weights_file) -> None:
        """Make pretrained timm model `name` load from `weights_file()` (a path, or None to download)."""
        OFFLINE_WEIGHTS[name] = weights_file

    @classmethod
    def weights_origin(cls, cfg: dict) -> dict:
        name = cfg["name"]
        if cfg.get("weights_file"):
            return _origin(f"timm {name}", f"a local weights file ({Path(cfg['weights_file']).name})")
        if not cfg["pretrained"]:
            return super().weights_origin(cfg)
        from timm.models import get_pretrained_cfg
        registry = get_pretrained_cfg(name)  # timm's registry knows each model's weights and licence
        hub_id, licence = (registry.hf_hub_id, registry.license) if registry else (None, None)
        return _origin(f"timm {name}", f"{name}'s default pretrained weights in timm" + (f" ({hub_id})" if hub_id else ""),
                       licence, hub_id)

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.model = _load_timm(cfg)
        self.pool_blocks = cfg.pool_blocks
        self.out_dim = self._multiscale_dim(cfg) if cfg.pool_blocks else self.model.num_features

    @classmethod
    def check_config(cls, cfg: ImageEncoderConfig) -> None:
        check(cfg.pool_blocks >= 0, "image.pool_blocks", cfg.pool_blocks, ">= 0")  # the top: when built

    def preprocessing(self, cfg):
        import timm.data
        data_cfg = timm.data.resolve_model_data_config(self.model)
        return data_cfg["input_size"][-1], data_cfg["mean"], data_cfg["std"]

    def blocks(self):
        from timm.models import group_parameters  # timm knows its own stages/blocks
        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))  # 0: stem; norm joins the last
        named = dict(self.model.named_parameters())
        return [[named[n] for n in groups[k]] for k in sorted(groups) if k > 0], []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, images):
        return self._multiscale(images) if self.pool_blocks else self.model(images)

    def _multiscale(self, images):
        # The last blocks keep what the ImageNet head discards (colour, texture, counts, layout):
        # their pooled outputs beside the head's add ~2 text->image R@1 for frozen Lite0 on Flickr8k.
        extra = {"extra_blocks": True} if "extra_blocks" in inspect.signature(
            self.model.forward_intermediates).parameters else {}  # every block, not only stage ends
        final, blocks = self.model.forward_intermediates(images, indices=self.pool_blocks, **extra)
        pooled = [self.model.forward_head(final)] + [b.mean((2, 3)) for b in blocks]  # (B, C_i) each
        return torch.cat(pooled, 1)  # (B, out_dim)

    @torch.no_grad()
    def _multiscale_dim(self, cfg: ImageEncoderConfig) -> int:
        check(hasattr(self.model, "forward_intermediates"), "image.pool_blocks", cfg.pool_blocks,
              f"0 for {cfg.name} (a timm model without forward_intermediates)")
        size = self.preprocessing(cfg)[0] if not cfg.image_size else cfg.image_size
        was_training = self.model.training
        self.model.eval()  # BatchNorm statistics must not see the probe image
        try:
            return self._multiscale(torch.zeros(1, 3, size, size)).shape[1]  # (1, out_dim)
        except AssertionError as e:  # timm: "last-n (99) is out of range (1 to 5)"
            raise ConfigError(f"--image.pool_blocks={cfg.pool_blocks}: must be within {cfg.name}'s "
                              f"blocks ({e})") from None
        finally:
            self.model.train(was_training)


def _load_timm(cfg: ImageEncoderConfig):
    import timm
    kwargs = {"num_classes": 0}  # drop the classifier: pooled features out
    weights_file = cfg.weights_file
    if cfg.pretrained and not weights_file and cfg.name in OFFLINE_WEIGHTS:  # e.g. from a pip package
        weights_file = str(OFFLINE_WEIGHTS[cfg.name]() or "")
    if weights_file:
        if not Path(weights_file).is_file():
            raise FileNotFoundError(f"timm weights file not found: {weights_file}")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights_file))
    try:
        return timm.create_model(cfg.name, pretrained=cfg.pretrained or bool(weights_file), **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"timm has no model {cfg.name!r} (see timm.list_models())") from e
        raise
    except Exception as e:  # hub download failures come in many exception types
        raise OSError(f"Could not download timm weights for {cfg.name!r} ({type(e).__name__}). "
                      "Offline options: --image.weights_file=PATH to a local weights file, "
                      + OFFLINE_HINT.format(tower="image")) from e
