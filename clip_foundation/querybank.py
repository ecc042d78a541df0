"""Querybank normalisation: fewer "hub" images at the top of unrelated text queries.

In a shared embedding space some gallery images (hubs) sit close to many captions and crowd
the top of queries they do not match. Querybank normalisation (Bogolin et al., CVPR 2022; the
inverted softmax of Smith et al., ICLR 2017) lowers each gallery image's scores by how strongly
a bank of *training* captions, taken together, matches it:

    score(q, g) = cos(q, g) - (alpha / beta) * log sum_b exp(beta * cos(b, g))

The correction is one number per image, so it travels as one extra coordinate: images get
[e, -bias], queries [q, 1], and every inner-product search (exact, faiss) ranks by the corrected
score unchanged. Image -> text rankings do not change (the bias is constant per image query).
train.py saves the bank (the projected embeddings of training captions) as querybank.safetensors
in the run folder when `--querybank=N`; evaluate.py reports recall with and without it.
"""
from __future__ import annotations

from pathlib import Path

import torch

FILE = "querybank.safetensors"


def hub_bias(image_features: torch.Tensor, bank: torch.Tensor, alpha: float, beta: float,
             chunk: int = 1024) -> torch.Tensor:
    """(N, D) normalised image embeddings, (K, D) bank of caption embeddings -> (N,) the amount
    to subtract from each image's scores."""
    out = []
    for s in range(0, len(image_features), chunk):
        sims = image_features[s:s + chunk].float() @ bank.float().T  # (n, K)
        out.append(alpha / beta * torch.logsumexp(beta * sims, dim=1))  # (n,)
    return torch.cat(out)


def normalised_images(image_features: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D + 1): the last coordinate carries -bias."""
    return torch.cat([image_features, -bias[:, None].to(image_features.dtype)], dim=1)


def normalised_texts(text_features: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M, D + 1): the last coordinate is 1, so q . [e, -bias] = cos - bias."""
    return torch.cat([text_features, text_features.new_ones(len(text_features), 1)], dim=1)


def save_bank(folder, bank: torch.Tensor, alpha: float, beta: float) -> Path:
    from safetensors.torch import save_file

    from .files import atomic_write
    path = Path(folder) / FILE
    atomic_write(path, lambda tmp: save_file({"bank": bank.half().contiguous()}, tmp,
                                             metadata={"alpha": str(alpha), "beta": str(beta)}))
    return path


def load_bank(folder) -> tuple[torch.Tensor, float, float] | None:
    """-> (bank (K, D) float32, alpha, beta) saved in a run folder, or None when it has none."""
    from safetensors import safe_open
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        return f.get_tensor("bank").float(), float(meta["alpha"]), float(meta["beta"])
