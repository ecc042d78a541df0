"""The from-scratch tower kinds (`--image.kind=scratch`, `--text.kind=scratch`, the default run's): a small
ViT and a small bidirectional text transformer, pre-norm blocks over `F.scaled_dot_product_attention`, that
need no downloaded weights. Adapters of `clipModel`'s registry (IMAGE_ENCODERS["scratch"],
TEXT_ENCODERS["scratch"]), kept in their own file as open_clip keeps its transformer.py beside model.py."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import clipModel  # clipModel.train_tokenizer by attribute: tests pin it there
from clipModel import (SCRATCH_IMAGE_SIZE, ImageEncoder, ImageEncoderConfig, TextEncoder, TextEncoderConfig, _origin,
                       check)

# ---------------------------------------------------------------- the networks

class Block(nn.Module):
    """Pre-norm transformer block using fused scaled-dot-product attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, attn_mask)  # (B, H, T, C/H)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


def attention(q, k, v, attn_mask=None):
    """`F.scaled_dot_product_attention`, written out under a CPU's autocast: two bf16 matmuls around an
    fp32 softmax. There SDPA's bf16 kernel runs its backward ~5x slower than its fp32 one, and the fp32
    flash kernel gains nothing from a second thread (measured on 2 cores: the default run's step 1.1-1.2x
    faster than with fp32 SDPA)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # (B, H, T, T)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(-1).to(v.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """Stride-2 3x3 convolutions down to one vector per patch (Xiao et al., 2021: "Early
    convolutions help transformers see better"): far better shape features from little data."""
    layers, channels = [], 3
    for i in range(int(math.log2(patch_size))):
        out = width // 2 ** (int(math.log2(patch_size)) - i)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(out), nn.GELU()]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, width, 1))


def run_blocks(blocks, x, checkpointing: bool, **kwargs):
    """Apply blocks in turn; with checkpointing, recompute their activations in backward."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False, **kwargs) if checkpointing else block(x, **kwargs)
    return x


class ScratchViT(nn.Module):
    """A small ViT: patch embedding, CLS token, learned positions, pre-norm blocks."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        size = cfg.image_size or SCRATCH_IMAGE_SIZE
        n_patches = (size // cfg.patch_size) ** 2
        self.patch_embed = conv_stem(cfg.width, cfg.patch_size) if cfg.stem == "conv" else \
            nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.width)
        self.out_dim, self.checkpointing = cfg.width, False
        self.side, self.merge_after = size // cfg.patch_size, min(cfg.merge_after or cfg.depth, cfg.depth)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # shape[0]: traceable
        checkpointing = self.checkpointing and self.training
        x = run_blocks(self.blocks[:self.merge_after], x, checkpointing)
        if self.merge_after < len(self.blocks):  # pool the token grid 2x2, as PiT does (Heo et al., 2021)
            half, C = self.side // 2, x.shape[-1]
            grid = x[:, 1:].reshape(-1, half, 2, half, 2, C).mean((2, 4)).flatten(1, 2)  # (B, N/4, C)
            x = run_blocks(self.blocks[self.merge_after:], torch.cat([x[:, :1], grid], dim=1), checkpointing)
        return self.ln(x[:, 0])


class ScratchTextTransformer(nn.Module):
    """A small bidirectional text transformer over the WordPiece ids of `train_tokenizer`."""

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.max_length, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.width)
        self.out_dim, self.checkpointing = cfg.width, False

    def forward(self, input_ids, attention_mask):
        x = self.token_embed(input_ids) + self.pos_embed[:, : input_ids.shape[1]]
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padding is never attended to
        x = run_blocks(self.blocks, x, self.checkpointing and self.training, attn_mask=keep)
        return self.ln(x)  # (B, T, C)


# ---------------------------------------------------------------- their adapters

class _ScratchTower:
    """Shared by both scratch adapters: the width/depth/heads a transformer can be built with."""
    kind = "scratch"

    @classmethod
    def describe(cls, cfg) -> str:
        return "scratch (trained from nothing)"

    @classmethod
    def weights_origin(cls, cfg: dict) -> dict:
        return _origin(f"scratch transformer ({cfg['depth']} blocks × {cfg['width']} wide)",
                       "none: initialised at random and trained in this run", trained_here=True)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        for key in ("width", "depth", "heads"):
            check(getattr(cfg, key) >= 1, f"{cls.tower}.{key}", getattr(cfg, key), ">= 1")
        check(cfg.width % cfg.heads == 0, f"{cls.tower}.heads", cfg.heads,
              f"a divisor of {cls.tower}.width={cfg.width} (each head takes width/heads channels)")


class ScratchImageEncoder(_ScratchTower, ImageEncoder):
    """The small from-scratch ViT: needs no downloaded weights."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.model = ScratchViT(cfg)
        self.out_dim = self.model.out_dim

    @classmethod
    def check_config(cls, cfg: ImageEncoderConfig) -> None:
        super().check_config(cfg)
        check(cfg.stem in ("conv", "linear"), "image.stem", cfg.stem, "conv or linear")
        p = cfg.patch_size
        if cfg.stem == "conv":  # stride-2 convolutions halve the side down to one pixel per patch
            check(p >= 2 and not p & (p - 1), "image.patch_size", p, "a power of two >= 2 with --image.stem=conv")
            check(cfg.width >= p, "image.width", cfg.width, f">= image.patch_size={p} (the conv stem's "
                  "first layer has width/patch_size channels)")
        check(p >= 1, "image.patch_size", p, ">= 1")
        size = cfg.image_size or SCRATCH_IMAGE_SIZE
        check(size % p == 0, "image.patch_size", p, f"a divisor of the image side {size}")
        check(cfg.merge_after >= 0, "image.merge_after", cfg.merge_after, ">= 0")
        if 0 < cfg.merge_after < cfg.depth:  # a grid that halves must split into 2x2 groups
            check((size // p) % 2 == 0, "image.merge_after", cfg.merge_after,
                  f"0: a {size // p}x{size // p} patch grid has no 2x2 groups to merge")

    def forward(self, images):
        return self.model(images)


class ScratchTextEncoder(_ScratchTower, TextEncoder):
    """The small from-scratch text transformer over a WordPiece vocabulary trained on the captions."""

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int):
        super().__init__(cfg)
        self.model = ScratchTextTransformer(cfg, vocab_size)
        self.out_dim = self.model.out_dim

    @classmethod
    def check_config(cls, cfg: TextEncoderConfig) -> None:
        super().check_config(cfg)
        check(cfg.vocab_size >= 32, "text.vocab_size", cfg.vocab_size,
              ">= 32 (4 special tokens, then the captions' characters and word pieces)")

    @classmethod
    def build_tokenizer(cls, cfg: TextEncoderConfig, captions=None):
        if captions is None:
            raise ValueError("the scratch text encoder trains its tokenizer on captions: pass captions=")
        return clipModel.train_tokenizer(captions, cfg.vocab_size, cfg.max_length)

    def hidden_states(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask)
