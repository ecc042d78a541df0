"""Frozen-tower features: computed once, kept on disk, reused by every run that shares them.

When a tower is frozen its outputs never change, so training only the projection heads (or
the other tower) needs each image and caption encoded once, not once per epoch. The cache
key covers the tower's config (its name, weights file, pooling, input size) and the exact
inputs (image files with sizes and mtimes, or caption texts), so a change to either
computes fresh features. The engine that encodes (`--engine`, see engines/registry.py) is not part
of the key: an ONNX Runtime or OpenVINO graph is used only once its outputs match torch's within
1e-4 (registry.TOLERANCE), so every engine's features are torch's within that. Its precision is:
the bf16 or int8 image features and bf16 text features OpenVINO makes on CPUs with bf16 or int8 units
are kept apart from fp32 ones (int8: calibrated on a seeded sample of the images being encoded).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from clipModel import CLIPModel

from clip_foundation.data.cache import cache_key
from clip_foundation.engines.registry import CALIBRATION_IMAGES, engine_class, resolve, tower_encoder
from clip_foundation.common.files import atomic_write
from clip_foundation.evaluate.metrics import eval_mode, in_length_order


def _tower_id(config) -> str:
    spec = asdict(config)
    for key in ("name", "weights_file"):  # a local file or folder: its contents may change
        path = spec.get(key)
        if path and os.path.exists(path):
            st = os.stat(path)
            spec[key + "_stamp"] = f"{st.st_size}:{st.st_mtime_ns}"
    return json.dumps(spec, sort_keys=True)


def _cached(path: Path | None, compute) -> torch.Tensor:
    from safetensors.torch import load_file, save_file
    if path is not None and path.is_file():
        return load_file(path)["features"]
    features = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"features": features.contiguous()}, tmp))
    return features


@torch.no_grad()
def image_tower_features(model: CLIPModel, records, images: torch.Tensor, cache_dir: str | None,
                         batch_size: int = 32, progress: bool = True, engine: str = "torch",
                         calibration: torch.Tensor | None = None) -> torch.Tensor:
    """Image-encoder outputs (N, d_image) of the decoded uint8 `images` of `records`, encoded by
    `engine` (see `engines`; its graph of the tower is cached under CACHE_DIR/engines). `calibration`:
    uint8 images to quantize the tower on where the engine runs it in int8 (`calibration_sample` of the
    training images, the same for every split, so all are encoded by one int8 graph)."""
    cfg = model.config.image
    precision = engine_class(resolve(engine, model.device)).precision("image", calibrated=calibration is not None)
    if precision == "int8":  # another calibration set makes another int8 graph
        precision += hashlib.sha256(calibration.contiguous().numpy().tobytes()).hexdigest()[:16]
    key = hashlib.sha256((_tower_id(cfg) + cache_key(records, cfg.image_size)
                          + ("" if precision == "fp32" else precision)).encode()).hexdigest()[:24]
    path = Path(cache_dir) / "features" / f"image-{key}.safetensors" if cache_dir else None

    def compute():
        from tqdm.auto import tqdm
        with eval_mode(model.image_encoder):
            encoder = tower_encoder(model, engine, cache_dir, "image", calibration)
            return torch.cat([encoder.encode_images(images[s:s + batch_size], batch_size).cpu()  # (b, d_image)
                              for s in tqdm(range(0, len(images), batch_size), disable=not progress,
                                            desc=f"encoding {len(images)} images (frozen tower)", leave=False)])
    return _cached(path, compute)


def calibration_sample(images: torch.Tensor, n: int = CALIBRATION_IMAGES, seed: int = 0) -> torch.Tensor:
    """A seeded sample of `n` of the uint8 `images` (N, 3, S, S), in their order: what an int8 tower is
    calibrated on (the training split's), the same for the same images."""
    if len(images) <= n:
        return images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n].sort().values]


@torch.no_grad()
def text_tower_features(model: CLIPModel, captions: list[str], cache_dir: str | None,
                        batch_size: int = 256, progress: bool = True, engine: str = "torch") -> torch.Tensor:
    """Text-encoder outputs (M, d_text) of `captions`, encoded by `engine`."""
    precision = engine_class(resolve(engine, model.device)).precision("text", calibrated=True)
    h = hashlib.sha256((_tower_id(model.config.text) + ("" if precision == "fp32" else precision)).encode())
    for caption in captions:
        h.update(caption.encode() + b"\0")
    path = Path(cache_dir) / "features" / f"text-{h.hexdigest()[:24]}.safetensors" if cache_dir else None

    def compute():
        with eval_mode(model.text_encoder):
            encoder = tower_encoder(model, engine, cache_dir, "text")
            return in_length_order(model, captions, lambda batch: encoder.encode_texts(**model.tokenize(batch)),
                                   model.text_encoder.out_dim, batch_size,
                                   desc=f"encoding {len(captions)} captions (frozen tower)" if progress else None)
    return _cached(path, compute)
