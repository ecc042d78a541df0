"""CLIP model: image encoder + text encoder + projection heads + learnable temperature.

Encoders are chosen by config: Hugging Face models (ViT / DistilBERT by default, any
`AutoModel`; their adapters in hf_towers.py), any `timm` image model (timm_towers.py), or the
small from-scratch transformers (scratch_towers.py), which need no downloaded weights. Each kind is
one adapter class in the registry below. `CLIPModel.save_pretrained` / `from_pretrained` round-trip a
model through a folder (config JSON + safetensors + tokenizer) with no network and no pickle.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CLIPModel", "CLIPConfig", "ImageEncoderConfig", "TextEncoderConfig", "ProjectionHead", "tower_adapter",
           "CheckpointError", "ConfigError", "clip_loss", "gathered_clip_loss", "siglip_loss", "image_transform",
           "resize_crop", "to_model_input", "default_device", "model_folder",
           # helpers the model itself uses, which the library shares rather than copies
           "check", "atomic_write", "public_path"]

OFFLINE_HINT = ("Offline options: a local folder saved with save_pretrained (--{tower}.name=PATH), "
                "--{tower}.pretrained=false to build from a local config with random weights, "
                "or the from-scratch encoder (--{tower}.kind=scratch).")
SCRATCH_IMAGE_SIZE = 64  # the scratch ViT's input side when image_size is left at 0


def atomic_write(path, write) -> Path:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it into place, so a
    kill or a full disk mid-write leaves the previous file whole (or none), never half a file.
    The temporary file is removed when `write` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class ConfigError(ValueError):
    """A config value out of its allowed range: one line naming the key, the value and the range."""


def check(ok: bool, key: str, value, allowed: str) -> None:
    """Raise `ConfigError("--key=value: must be allowed")` unless `ok`: every config's
    `validate()` states its ranges with this, so every message has the same shape."""
    if not ok:
        raise ConfigError(f"--{key}={value!r}: must be {allowed}")


@dataclass
class ImageEncoderConfig:
    kind: str = "hf"  # "hf" (transformers AutoModel), "timm" (any timm model) or "scratch"
    name: str = "google/vit-base-patch16-224-in21k"  # HF id or local folder, or timm model name
    pretrained: bool = True  # False: same architecture, random weights (no download)
    weights_file: str = ""  # timm only: local weights file used instead of a download
    pool_blocks: int = 0  # timm only: also average-pool the last N blocks' outputs and append them (multi-scale features)
    image_size: int = 0  # input side in pixels; 0 = the encoder's own
    mean: tuple[float, ...] = ()  # normalisation; empty = the encoder's own statistics
    std: tuple[float, ...] = ()
    patch_size: int = 8  # scratch ViT: pixels per patch side
    stem: str = "conv"  # scratch ViT patch embedding: "conv" (3x3 conv stack) or "linear" (one strided conv)
    width: int = 128  # scratch ViT: transformer width
    depth: int = 4  # scratch ViT: number of blocks
    heads: int = 4  # scratch ViT: attention heads
    merge_after: int = 0  # scratch ViT: after this many blocks (if more follow), average each 2x2 of patch tokens: 4x fewer; 0 = never


@dataclass
class TextEncoderConfig:
    kind: str = "hf"  # "hf" (transformers AutoModel) or "scratch"
    name: str = "distilbert-base-uncased"  # HF id or local folder
    pretrained: bool = True  # False: same architecture, random weights (no download)
    pooling: str = "cls"  # "cls": first token (DistilBERT); "mean": masked mean (MiniLM)
    max_length: int = 64  # captions are truncated to this many tokens
    vocab_size: int = 2000  # scratch: WordPiece vocabulary built from the training captions
    width: int = 128  # scratch transformer width
    depth: int = 3  # scratch transformer blocks
    heads: int = 4  # scratch attention heads


@dataclass
class CLIPConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    projection_dim: int = 256  # shared embedding size of both projection heads
    dropout: float = 0.1  # dropout inside the projection heads
    init_temperature: float = 0.07  # CLIP's initial softmax temperature
    max_logit_scale: float = 100.0  # clamp on exp(logit_scale), as in CLIP, for stability
    loss: str = "clip"  # clip (softmax over the batch) | siglip (a sigmoid per pair with a learnt bias, Zhai et al. 2023)

    def validate(self) -> "CLIPConfig":
        """ConfigError for the first value out of its range, which the message states. Ranges
        that depend on the tower kind are the adapters' (`check_config`)."""
        check(self.projection_dim >= 1, "projection_dim", self.projection_dim, ">= 1")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        check(math.isfinite(self.init_temperature) and self.init_temperature > 0, "init_temperature",
              self.init_temperature, "a finite number > 0")
        check(math.isfinite(self.max_logit_scale) and self.max_logit_scale >= 1, "max_logit_scale",
              self.max_logit_scale, "a finite number >= 1")
        check(self.loss in ("clip", "siglip"), "loss", self.loss, "clip or siglip")
        image, text = self.image, self.text
        check(image.image_size >= 0, "image.image_size", image.image_size, ">= 0 (0 = the tower's own)")
        for key in ("mean", "std"):
            value = getattr(image, key)
            check(len(value) in (0, 3) and all(math.isfinite(v) for v in value), f"image.{key}", value,
                  "3 finite numbers (R,G,B), or empty for the tower's own")
        check(all(v > 0 for v in image.std), "image.std", image.std, "> 0 each")
        check(text.max_length >= 2, "text.max_length", text.max_length, ">= 2 (a caption's start and end tokens)")
        check(text.pooling in ("cls", "mean"), "text.pooling", text.pooling, "cls or mean")
        _adapter(IMAGE_ENCODERS, image, "image").check_config(image)
        _adapter(TEXT_ENCODERS, text, "text").check_config(text)
        return self

    @classmethod
    def from_pretrained(cls, folder) -> "CLIPConfig":
        """The config saved in FOLDER/config.json (by `CLIPModel.save_pretrained`), or CheckpointError
        naming the file: no weights are read."""
        return _read_model_config(folder)

    @staticmethod
    def saved(folder) -> dict:
        """FOLDER/config.json whole: the model's config under "model", a run's data and training
        configs beside it; CheckpointError naming the file when it is not one save_pretrained wrote."""
        return _read_saved_config(folder)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        d = dict(d)
        image = ImageEncoderConfig(**_known(ImageEncoderConfig, d.pop("image", {})))
        text = TextEncoderConfig(**_known(TextEncoderConfig, d.pop("text", {})))
        cfg = cls(image=image, text=text, **_known(cls, d))
        cfg.image.mean, cfg.image.std = tuple(cfg.image.mean), tuple(cfg.image.std)
        return cfg


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return d


def default_device() -> torch.device:
    """CUDA if available, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------- tower adapters
# What differs between tower kinds lives in one class per kind, as open_clip's timm_model.py and
# hf_model.py do: build and load, forward to features, output width, preprocessing defaults,
# trainable blocks, gradient checkpointing, memory format and the files a save needs. A new kind
# is one subclass added to IMAGE_ENCODERS or TEXT_ENCODERS (by "module:Class" when it lives in a
# file of its own, as the transformers and timm wrappers do: imported only when a model asks for it). Every adapter keeps its network in
# `self.model`, so the weights' names (`image_encoder.model.*`) are the same for every kind.

def public_path(name: str) -> str:
    """`name` as a model card or a published config.json shows it: a path of this machine (absolute,
    under ~, or a file or folder that exists here) by its last part only, so nothing published tells
    where its author keeps their files; anything else (a Hub id, a timm name) as it is."""
    path = Path(name)
    try:
        here = path.is_absolute() or name.startswith("~") or path.exists()
    except OSError:  # too long to name a file: text, not a path
        here = False
    return path.name if here else name


def _origin(tower: str, source: str, licence: str | None = None, base_model: str | None = None,
            trained_here: bool = False) -> dict:
    return {"tower": tower, "source": source, "licence": licence, "base_model": base_model,
            "trained_here": trained_here}


class Tower(nn.Module):
    """What training, saving and encoding ask of a tower, whatever its kind."""
    kind = ""    # the config's `kind` that picks this adapter
    tower = ""   # "image" or "text": names its config keys and its saved folder
    memory_format = torch.contiguous_format  # the input layout its forward runs fastest in

    @classmethod
    def check_config(cls, cfg) -> None:
        """ConfigError for a value of `cfg` this kind cannot use (before anything is built)."""

    @classmethod
    def offline_config(cls, cfg, folder: Path):
        """The config that rebuilds this tower from a saved folder with no download; the
        weights then come from the folder's model.safetensors."""
        return replace(cfg, pretrained=False)

    def save_config(self, folder: Path) -> None:
        """Write what `offline_config` needs beside the weights (nothing for most kinds)."""

    @classmethod
    def weights_origin(cls, cfg: dict) -> dict:
        """Where the starting weights of a tower saved with config `cfg` (its config.json entry)
        came from, for a model card: {tower, source, licence (a Hub licence id or None), base_model
        (a Hub id or None), trained_here (random initialisation: no one else's weights)}."""
        name = public_path(cfg.get("name", ""))
        if not cfg.get("pretrained", True):
            return _origin(f"{cls.kind} {name}", f"none: {name}'s architecture, initialised at random",
                           trained_here=True)
        return _origin(f"{cls.kind} {name}", "see the tower's own documentation")

    @classmethod
    def describe(cls, cfg) -> str:
        """What a tower of this kind and config is, in a few words for people (the search page shows it;
        a class method, so no tower is loaded to say it)."""
        return f"{cls.kind} {cfg.name}"

    def blocks(self) -> tuple[list[list[nn.Parameter]], list[nn.Parameter]]:
        """-> (the tower's blocks in order, each a list of its parameters; the parameters after
        the last block, such as a final norm): lets training unfreeze only the last N blocks."""
        stack = max((m for m in self.model.modules() if isinstance(m, nn.ModuleList)), key=len)  # the layers
        named = list(self.model.named_parameters())
        prefix = next(n for n, m in self.model.named_modules() if m is stack) + "."
        last = max(i for i, (n, _) in enumerate(named) if n.startswith(prefix))
        return [list(block.parameters()) for block in stack], [p for _, p in named[last + 1:]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations during backward: less memory, ~30% more compute."""
        self.model.checkpointing = enable  # the scratch transformers; other kinds override


class ImageEncoder(Tower):
    """Maps normalised images (B, 3, S, S) to one feature vector each (B, out_dim).
    `ImageEncoder.build(cfg)` makes the adapter of `cfg.kind`."""
    tower = "image"

    @staticmethod
    def build(cfg: ImageEncoderConfig) -> "ImageEncoder":
        return _adapter(IMAGE_ENCODERS, cfg, "image")(cfg)

    @classmethod
    def check_config(cls, cfg: ImageEncoderConfig) -> None:
        check(cfg.pool_blocks == 0, "image.pool_blocks", cfg.pool_blocks,
              f"0 for a {cls.kind} tower (multi-scale features need --image.kind=timm)")

    @classmethod
    def offline_config(cls, cfg, folder: Path):
        return replace(super().offline_config(cfg, folder), weights_file="")

    export_axes = {"images": {0: "batch"}}  # the forward's inputs and their dynamic axes, for an exported graph

    def example_inputs(self, cfg: ImageEncoderConfig, batch: int = 2) -> tuple[torch.Tensor]:
        """Normalised-looking images (batch, 3, S, S) to trace or check an exported graph with."""
        return (torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0)),)

    def preprocessing(self, cfg: ImageEncoderConfig) -> tuple[int, tuple, tuple]:
        """-> (input side, mean, std) this tower expects when the config leaves them empty."""
        return SCRATCH_IMAGE_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def resolve_config(self, cfg: ImageEncoderConfig) -> ImageEncoderConfig:
        """`cfg` with image_size/mean/std left empty filled with this tower's own expectations."""
        size, mean, std = self.preprocessing(cfg)
        return replace(cfg, image_size=cfg.image_size or int(size),
                       mean=tuple(float(m) for m in (cfg.mean or mean)),
                       std=tuple(float(s) for s in (cfg.std or std)))


class TextEncoder(Tower):
    """Maps token ids (B, T) + attention mask to one feature vector each (B, out_dim):
    the tower's hidden states, pooled by `cfg.pooling`. `TextEncoder.build(cfg, vocab_size)`
    makes the adapter of `cfg.kind`."""
    tower = "text"

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.pooling = cfg.pooling

    @staticmethod
    def build(cfg: TextEncoderConfig, vocab_size: int) -> "TextEncoder":
        return _adapter(TEXT_ENCODERS, cfg, "text")(cfg, vocab_size)

    @classmethod
    def build_tokenizer(cls, cfg: TextEncoderConfig, captions=None):
        """The tokenizer this tower reads (a trained or a saved one)."""
        raise NotImplementedError

    def hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        """-> (B, T, C) per-token outputs."""
        raise NotImplementedError

    export_axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}

    def example_inputs(self, cfg: TextEncoderConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, attention mask) (batch, T) with padding in the later rows, to trace or check
        an exported graph with."""
        vocab = next(m for m in self.modules() if isinstance(m, nn.Embedding)).num_embeddings
        T = min(7, cfg.max_length)
        ids = torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(0))
        mask = (torch.arange(T) < torch.linspace(T, 2, batch).round()[:, None]).long()
        return ids * mask, mask

    def forward(self, input_ids, attention_mask):
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, C)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def tower_adapter(tower: str, kind: str) -> type:
    """The adapter class of tower kind `kind` ("hf", "timm", "scratch") for `tower` ("image" or "text"):
    what the library asks of a kind without building one (where its weights came from, for a card)."""
    kinds = IMAGE_ENCODERS if tower == "image" else TEXT_ENCODERS
    if kind not in kinds:
        raise ConfigError(f"--{tower}.kind={kind!r}: must be one of {', '.join(kinds)}")
    if isinstance(kinds[kind], str):  # an adapter in its own file: imported once, on first use
        module, name = kinds[kind].split(":")
        kinds[kind] = getattr(importlib.import_module(module), name)
    return kinds[kind]


def _adapter(kinds: dict, cfg, tower: str):
    return tower_adapter(tower, cfg.kind)


# The registry of tower kinds: kind -> its adapter class, or "module:Class" of an adapter kept in a file of
# its own beside this one (the wrappers of transformers and timm, the from-scratch transformers), imported when
# first asked for.
IMAGE_ENCODERS: dict = {"hf": "hf_towers:HFImageEncoder", "timm": "timm_towers:TimmImageEncoder",
                        "scratch": "scratch_towers:ScratchImageEncoder"}
TEXT_ENCODERS: dict = {"hf": "hf_towers:HFTextEncoder", "scratch": "scratch_towers:ScratchTextEncoder"}


# ---------------------------------------------------------------- tokenizer and transforms

def train_tokenizer(captions, vocab_size: int = 2000, max_length: int = 64):
    """Train a lowercase WordPiece tokenizer on captions (for the scratch text encoder)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(list(captions), trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_max_length=max_length)


def build_tokenizer(cfg: TextEncoderConfig, captions=None):
    """The HF model's own tokenizer, or a WordPiece trained on `captions` for scratch."""
    return _adapter(TEXT_ENCODERS, cfg, "text").build_tokenizer(cfg, captions)


def resize_crop(image_size: int):
    """PIL image or uint8 tensor -> uint8 (3, S, S): resize the short side to S, center-crop S x S.

    The one resize both data paths share: the decoded-image cache stores its output, and
    `image_transform` starts with it (a no-op on an S x S image), so cached and direct inputs
    are identical. No `Image.draft`: it would change pixels."""
    from torchvision.transforms import v2
    return v2.Compose([v2.ToImage(), v2.RGB(), v2.Resize(image_size, antialias=True),
                       v2.CenterCrop(image_size)])


def to_model_input(images: torch.Tensor, mean, std, augment: bool = False,
                   scale=(0.8, 1.0), ratio=(0.9, 1.1)) -> torch.Tensor:
    """Decoded uint8 images (B, 3, S, S) -> normalised float batch, on their own device.

    With `augment`, a random resized crop per image done as one batched affine resample
    (the batch equivalent of `image_transform(train=True)`), so augmentation costs nothing
    next to the model step, on the GPU too. No flips: "left of" must stay left.
    """
    x = images.float().mul_(1.0 / 255)  # exactly torchvision's ToDtype(scale=True)
    if augment:
        B, dev = len(x), x.device
        area = torch.empty(B, device=dev).uniform_(*scale)
        aspect = torch.empty(B, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
        # crop width and height as fractions of the image side
        w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
        theta = torch.zeros(B, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 1, 1] = w, h
        theta[:, 0, 2] = (torch.rand(B, device=dev) * 2 - 1) * (1 - w)  # crop centre, in [-1, 1] units
        theta[:, 1, 2] = (torch.rand(B, device=dev) * 2 - 1) * (1 - h)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def image_transform(cfg: ImageEncoderConfig, train: bool = False):
    """One PIL image or uint8 tensor -> normalised float tensor (3, S, S) for this encoder:
    `resize_crop`, then (with `train`) a random resized crop, then `to_model_input`'s scaling."""
    from torchvision.transforms import v2
    size = cfg.image_size
    steps = [resize_crop(size)]
    if train:  # light augmentation; no flips, which would break "left of" captions
        steps.append(v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
    return v2.Compose(steps)


# ---------------------------------------------------------------- the model

class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear -> Dropout -> + residual -> LayerNorm."""

    def __init__(self, in_dim: int, dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x):
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)


class CLIPModel(nn.Module):
    """Two towers, two projection heads and a learnable temperature.

    `CLIPModel(config, captions=train_captions)` builds a model (captions train the scratch
    tokenizer); `CLIPModel.from_pretrained(folder)` loads a saved one offline.
    """

    def __init__(self, config: CLIPConfig, tokenizer=None, captions=None, *, _saved_folder=None,
                 _towers=("image", "text")):  # from_pretrained(towers=...): the others are None, no tokenizer without text
        super().__init__()
        config.validate()
        self.tokenizer = (tokenizer if tokenizer is not None or "text" not in _towers
                          else build_tokenizer(config.text, captions))
        build = config
        if _saved_folder is not None:  # architectures from the folder; weights from its safetensors
            build = replace(config, image=_adapter(IMAGE_ENCODERS, config.image, "image").offline_config(
                config.image, Path(_saved_folder)), text=_adapter(TEXT_ENCODERS, config.text, "text").offline_config(
                config.text, Path(_saved_folder)))
        image = ImageEncoder.build(build.image) if "image" in _towers else None
        text = TextEncoder.build(build.text, len(self.tokenizer)) if "text" in _towers else None
        self.add_module("image_encoder", image)  # a tower left out is a submodule None (nn.Module skips those)
        self.add_module("text_encoder", text)
        self.config = replace(config, image=image.resolve_config(config.image)) if image is not None else config
        dim, dropout = config.projection_dim, config.dropout
        self.add_module("image_projection", None if image is None else ProjectionHead(image.out_dim, dim, dropout))
        self.add_module("text_projection", None if text is None else ProjectionHead(text.out_dim, dim, dropout))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))
        if config.loss == "siglip":  # SigLIP's bias starts at -10: most pairs in a batch are negatives
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def tokenize(self, texts) -> dict[str, torch.Tensor]:
        """Captions -> {"input_ids", "attention_mask"} (B, T), padded to the longest."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.tokenizer(texts, padding=True, truncation=True,
                               max_length=self.config.text.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def image_transform(self, train: bool = False):
        return image_transform(self.config.image, train)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.project_image(self.image_encoder(images), normalize)

    def project_image(self, tower_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image-encoder outputs (B, d_image) -> embeddings (B, D); lets a frozen tower's
        features be computed once and reused."""
        features = self.image_projection(tower_features)
        return F.normalize(features, dim=-1) if normalize else features

    def project_text(self, tower_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text-encoder outputs (B, d_text) -> embeddings (B, D)."""
        features = self.text_projection(tower_features)
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at max_logit_scale as in CLIP."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def encode_text(self, text, attention_mask=None, normalize: bool = True) -> torch.Tensor:
        """`text`: a caption, a list of captions, or token ids (B, T) with `attention_mask`."""
        if isinstance(text, (str, list, tuple)):
            tokens = self.tokenize(text)
            text, attention_mask = tokens["input_ids"], tokens["attention_mask"]
        text = text.to(self.device)
        attention_mask = torch.ones_like(text) if attention_mask is None else attention_mask.to(self.device)
        return self.project_text(self.text_encoder(text, attention_mask), normalize)

    def forward(self, images, input_ids, attention_mask=None):
        """-> (image_features, text_features, logit_scale): normalised (B, D) each, scalar."""
        return self.encode_image(images), self.encode_text(input_ids, attention_mask), self.scale()

    def save_pretrained(self, folder, extra_config: dict | None = None) -> Path:
        """Write config.json, model.safetensors, tokenizer files and HF tower configs.

        `extra_config` (e.g. the run's data and training configs) is stored in config.json too.
        """
        from safetensors.torch import save_model
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {**(extra_config or {}), "model": asdict(self.config)}
        atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        for encoder in (self.image_encoder, self.text_encoder):
            encoder.save_config(folder)  # so from_pretrained rebuilds the architecture offline
        self.tokenizer.save_pretrained(folder)
        atomic_write(folder / "model.safetensors", lambda tmp: save_model(self, str(tmp)))
        return folder

    @classmethod
    def from_pretrained(cls, folder, device=None, *, towers=("image", "text"), revision: str | None = None,
                        cache_dir=None) -> "CLIPModel":
        """Load a folder written by `save_pretrained` (no pickle, no code from the folder), or a
        Hugging Face Hub repo holding one: `from_pretrained("user/repo", revision="v1")`. Only `towers` are
        built and read (`towers=("text",)`: image_encoder and image_projection are None; without text, the tokenizer).

        A local folder is always tried first. A repo id goes through `huggingface_hub`'s cache
        (`cache_dir`, default HF_HUB_CACHE): downloaded once, then read offline, and never asked
        for when HF_HUB_OFFLINE=1. A damaged folder raises `CheckpointError` naming the file and
        what is wrong: invalid config.json, a weights file that is truncated, corrupt or holds
        NaN/inf, or a config that no longer matches the weights."""
        check(set(towers) <= {"image", "text"}, "towers", towers, "a tuple of image and/or text")
        folder = model_folder(folder, revision, cache_dir)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder} is not a saved CLIPModel folder "
                                    "(expected config.json and model.safetensors)")
        config = _read_model_config(folder)
        try:
            tokenizer = None
            if "text" in towers:  # transformers' AutoTokenizer: imported for it alone
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            with torch.device("meta"):  # shapes only, nothing allocated: a config.json is as untrusted as the weights
                skeleton = cls(config, tokenizer=tokenizer, _saved_folder=folder, _towers=towers)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, OverflowError) as e:
            raise CheckpointError(f"{folder}: config.json and the saved files do not make a model "
                                  f"({_brief(e)})") from None
        _check_shapes(skeleton, folder / "model.safetensors")  # before the real model takes any memory
        model = cls(config, tokenizer=tokenizer, _saved_folder=folder, _towers=towers)
        _load_weights(model, folder / "model.safetensors", device)
        return model.to(device or "cpu").eval()


class CheckpointError(ValueError):
    """A saved model folder that cannot be loaded: the message names the file and the fault."""


HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "user/repo", as the Hub names repos


def model_folder(name, revision: str | None = None, cache_dir=None) -> Path:
    """The folder a saved model is read from, as `from_pretrained` finds it: `name` as a local path
    when it is a folder or cannot be a repo id; else the snapshot folder of Hub repo `name` in the
    Hub cache (downloaded unless cached, or FileNotFoundError in one line)."""
    folder = Path(name)
    if folder.is_dir() or not HUB_REPO_ID.fullmatch(str(name)):
        return folder
    from huggingface_hub import constants, snapshot_download
    try:
        return Path(snapshot_download(str(name), revision=revision, cache_dir=cache_dir))
    except (OSError, ValueError) as e:  # not on the Hub, not cached while offline, no network, a bad revision
        at = f" at revision {revision!r}" if revision else ""
        why = ("HF_HUB_OFFLINE=1, so the Hub is not asked: load it once online, or unset HF_HUB_OFFLINE"
               if constants.HF_HUB_OFFLINE else f"{type(e).__name__}: {_brief(e, 200)}")
        raise FileNotFoundError(f"{name} is not a local folder, and Hub repo {name}{at} could not be loaded "
                                f"into the cache {cache_dir or constants.HF_HUB_CACHE} ({why})") from None


def _brief(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _read_saved_config(folder) -> dict:
    """FOLDER/config.json as written by save_pretrained (the model's config under "model", a
    run's data and training configs beside it), or CheckpointError naming the file."""
    path = Path(folder) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise CheckpointError(f'{path}: no "model" entry, so not a config written by save_pretrained')
    return saved


def _read_model_config(folder) -> CLIPConfig:
    """The `CLIPConfig` in FOLDER/config.json, or CheckpointError naming the file."""
    saved = _read_saved_config(folder)
    try:
        return CLIPConfig.from_dict(saved["model"])
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: invalid model config ({_brief(e)})") from None


def _mismatch(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path.parent}: config.json does not match model.safetensors: the "
                           f"config describes another architecture ({_brief(detail)})")


def _check_shapes(skeleton: CLIPModel, path: Path) -> None:
    """CheckpointError unless the weights file holds every tensor of `skeleton` (a model built on
    the meta device) in its shape, and nothing else: read from the file's header alone, so a
    config.json asking for a huge model is refused before that model is allocated."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt or truncated weights file ({e})") from None
    tied = {}  # a tensor shared under several names is saved under one of them (safetensors' save_model)
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        tied.setdefault(id(tensor), (tensor, []))[1].append(name)
    faults = [f"{name}: {tuple(tensor.shape)} in the config, {saved[name]} in the file"
              for tensor, names in tied.values() for name in names
              if name in saved and saved[name] != tuple(tensor.shape)][:3]
    missing = [names[0] for _, names in tied.values() if not set(names) & set(saved)]
    left_out = tuple(f"{name}." for name, module in skeleton._modules.items() if module is None)  # towers not read
    unexpected = sorted(name for name in set(saved) - {n for _, names in tied.values() for n in names}
                        if not name.startswith(left_out))
    if missing:
        faults.append("not in the file: " + ", ".join(missing[:5]))
    if unexpected:
        faults.append("not in the config: " + ", ".join(unexpected[:5]))
    if faults:
        raise _mismatch(path, "; ".join(faults))


def _load_weights(model: CLIPModel, path: Path, device) -> None:
    from safetensors import SafetensorError, safe_open
    try:  # the tensors of the towers built, each shared one read under the name saved (_check_shapes vouched for them)
        with safe_open(str(path), "pt", device=str(device or "cpu")) as f:
            saved = set(f.keys())
            model.load_state_dict({name: f.get_tensor(name) for name in model.state_dict() if name in saved}, strict=False)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt or truncated weights file ({e})") from None
    except RuntimeError as e:  # shape mismatches
        raise _mismatch(path, str(e)) from None
    for name, tensor in model.state_dict().items():  # a same-size overwrite shows up as NaN/inf
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: non-finite weights (NaN or inf) in {name}: the file is corrupt")


# ---------------------------------------------------------------- the contrastive loss

def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy: pair i of the batch is the only positive for row/column i.

    Two captions of one image in a batch would be false negatives; the training sampler
    (data.UniqueImageBatchSampler) never puts two captions of one image in a batch.
    """
    logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def gathered_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                       logit_scale: torch.Tensor) -> torch.Tensor:
    """clip_loss over the global batch of all DDP ranks, computed for this rank's rows.

    Features are all-gathered *with* gradients, so every negative on every rank trains every
    tower; each rank scores its own B rows against all W*B columns (and back), which costs
    B x WB instead of WB x WB. DDP averages the ranks' gradients, and the mean of the ranks'
    losses is exactly clip_loss on the concatenated batch.
    """
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather
    rank, B = dist.get_rank(), len(image_features)
    with warnings.catch_warnings():  # torch >= 2.12 points to a private API instead; this one is public
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather", FutureWarning)
        all_images = torch.cat(all_gather(image_features))  # (W*B, D)
        all_texts = torch.cat(all_gather(text_features))  # (W*B, D)
    labels = torch.arange(rank * B, (rank + 1) * B, device=image_features.device)  # this rank's pairs
    logits_per_image = logit_scale * image_features @ all_texts.T  # (B, W*B)
    logits_per_text = logit_scale * text_features @ all_images.T  # (B, W*B)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """Sigmoid loss (SigLIP, Zhai et al. 2023): every (image, text) pair of the batch is its own
    binary question, "do these match?", so no softmax couples the batch; mean over images."""
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (B, B)
    labels = 2 * torch.eye(len(logits), device=logits.device) - 1  # +1 on the diagonal, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / len(logits)
