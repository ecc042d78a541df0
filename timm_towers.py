"""The timm tower kind: any timm image model as CLIP's image encoder (`--image.kind=timm`), classifier
removed; with `pool_blocks`, its last blocks' pooled outputs too. Several models joined by "+"
(`--image.name=tf_efficientnet_lite2+tf_efficientnet_lite0`) run side by side on the same image, at the
first one's input size, their features concatenated: different networks miss different things. An
adapter of `clipModel`'s registry (IMAGE_ENCODERS["timm"]), kept in its own file as open_clip keeps
timm_model.py."""
from __future__ import annotations

import inspect
from dataclasses import replace
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
        names = cfg.name.split("+")
        if len(names) == 1:  # one model: its weights stay `image_encoder.model.*`, as saved runs have them
            self.model = _load_timm(cfg)
        else:
            self.model = SideBySide([_load_timm(replace(cfg, name=n)) for n in names])
        self.pool_blocks = cfg.pool_blocks
        self.out_dim = self._features_dim(cfg)

    @classmethod
    def check_config(cls, cfg: ImageEncoderConfig) -> None:
        check(cfg.pool_blocks >= 0, "image.pool_blocks", cfg.pool_blocks, ">= 0")  # the top: when built
        names = cfg.name.split("+")
        check(all(names), "image.name", cfg.name, "timm model names, several joined by '+'")
        check(len(names) == 1 or not cfg.weights_file, "image.weights_file", cfg.weights_file,
              "empty when --image.name joins several models (each loads its own weights)")

    def _nets(self) -> list:
        return list(self.model.nets) if isinstance(self.model, SideBySide) else [self.model]

    def preprocessing(self, cfg):
        import timm.data  # the first model's input: later ones get it resized to their own
        data_cfg = timm.data.resolve_model_data_config(self._nets()[0])
        return data_cfg["input_size"][-1], data_cfg["mean"], data_cfg["std"]

    def resolve_config(self, cfg: ImageEncoderConfig) -> ImageEncoderConfig:
        cfg = super().resolve_config(cfg)
        if isinstance(self.model, SideBySide):
            self.model.set_input(cfg.mean, cfg.std)
        return cfg

    def blocks(self):
        from timm.models import group_parameters  # timm knows its own stages/blocks
        if isinstance(self.model, SideBySide):
            raise ConfigError("--train_image_blocks needs one timm model, not several side by side")
        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))  # 0: stem; norm joins the last
        named = dict(self.model.named_parameters())
        return [[named[n] for n in groups[k]] for k in sorted(groups) if k > 0], []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for net in self._nets():
            net.set_grad_checkpointing(enable)

    def forward(self, images):
        if isinstance(self.model, SideBySide):
            return self.model(images, lambda net, x: multiscale(net, x, self.pool_blocks))
        return multiscale(self.model, images, self.pool_blocks)

    @torch.no_grad()
    def _features_dim(self, cfg: ImageEncoderConfig) -> int:
        if not cfg.pool_blocks and not isinstance(self.model, SideBySide):
            return self.model.num_features
        for net in self._nets():
            check(not cfg.pool_blocks or hasattr(net, "forward_intermediates"), "image.pool_blocks", cfg.pool_blocks,
                  f"0 for {cfg.name} (a timm model without forward_intermediates)")
        size = self.preprocessing(cfg)[0] if not cfg.image_size else cfg.image_size
        was_training = self.model.training
        self.model.eval()  # BatchNorm statistics must not see the probe image
        try:
            return self(torch.zeros(1, 3, size, size)).shape[1]  # (1, out_dim)
        except AssertionError as e:  # timm: "last-n (99) is out of range (1 to 5)"
            raise ConfigError(f"--image.pool_blocks={cfg.pool_blocks}: must be within {cfg.name}'s "
                              f"blocks ({e})") from None
        finally:
            self.model.train(was_training)


def multiscale(net, images, pool_blocks: int) -> torch.Tensor:
    """(B, features) of timm model `net`: its pooled head, and with `pool_blocks` its last blocks'
    pooled outputs beside it. They keep what the ImageNet head discards (colour, texture, counts,
    layout): +2 text->image R@1 for frozen Lite0 on Flickr8k."""
    if not pool_blocks:
        return net(images)
    extra = {"extra_blocks": True} if "extra_blocks" in inspect.signature(
        net.forward_intermediates).parameters else {}  # every block, not only stage ends
    final, blocks = net.forward_intermediates(images, indices=pool_blocks, **extra)
    pooled = [net.forward_head(final)] + [b.mean((2, 3)) for b in blocks]  # (B, C_i) each
    return torch.cat(pooled, 1)  # (B, out_dim)


class SideBySide(torch.nn.Module):
    """Several timm models on one image, each in its own normalisation, their features concatenated
    (B, sum of each one's features). They all see the image at the tower's input size (the first
    model's): CNNs take any size, and resizing inside the graph is worse either way (bilinear without
    antialiasing cost the Lites 1.5 dev R@1; with it, the graph does not export)."""

    def __init__(self, nets: list):
        super().__init__()
        import timm.data
        self.nets = torch.nn.ModuleList(nets)
        configs = [timm.data.resolve_model_data_config(n) for n in nets]
        for i, c in enumerate(configs):  # each model's own normalisation, as buffers: traced into an export
            self.register_buffer(f"mean{i}", torch.tensor(c["mean"]).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"std{i}", torch.tensor(c["std"]).view(1, 3, 1, 1), persistent=False)
        self.set_input(configs[0]["mean"], configs[0]["std"])

    def set_input(self, mean, std) -> None:
        """The normalisation the images arrive in (the tower's config)."""
        self.register_buffer("in_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images, features) -> torch.Tensor:
        pixels = images * self.in_std + self.in_mean  # (B, 3, S, S) back to [0, 1]
        return torch.cat([features(net, (pixels - getattr(self, f"mean{i}")) / getattr(self, f"std{i}"))
                          for i, net in enumerate(self.nets)], 1)


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
