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
in the run folder when `--querybank=N`; evaluate.py reports recall with and without it, and the
run's image indexes (gallery.load_or_build_index) rank text queries by the corrected score.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from clipModel import CheckpointError

from clip_foundation.data.splits import all_captions
from clip_foundation.evaluate.metrics import embed_texts, eval_mode, records_metrics

FILE = "querybank.safetensors"
NORM_TOLERANCE = 0.01  # rows are stored in float16 (~1e-3 off unit length)
ALPHA, BETA = 1.0, 10.0  # picked on 500 images carved from Flickr8k's train split (never on dev or test)


def hub_bias(image_features: torch.Tensor, bank: torch.Tensor, alpha: float, beta: float,
             chunk: int = 1024) -> torch.Tensor:
    """(N, D) normalised image embeddings, (K, D) bank of caption embeddings -> (N,) the amount
    to subtract from each image's scores."""
    out = [torch.zeros(0, device=image_features.device)]  # an empty gallery has no bias
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


def bank_metrics(image_features: torch.Tensor, text_features: torch.Tensor, records, querybank) -> dict:
    """`records_metrics` with each image's scores lowered by its hub bias; `querybank` is
    (bank, alpha, beta) as `load_bank` returns it."""
    bank, alpha, beta = querybank
    bias = hub_bias(image_features, bank.to(image_features.device), alpha, beta)  # (N,)
    return records_metrics(normalised_images(image_features, bias), normalised_texts(text_features), records)


def recall_with_bank(image_features: torch.Tensor, text_features: torch.Tensor, records, querybank=None) -> dict:
    """`records_metrics`, and the same with querybank normalisation under "querybank" when a
    bank ((bank, alpha, beta)) is given."""
    metrics = records_metrics(image_features, text_features, records)
    if querybank is not None:
        metrics["querybank"] = bank_metrics(image_features, text_features, records, querybank)
    return metrics


@torch.no_grad()
def caption_bank(model, inputs, size: int, seed: int = 0) -> torch.Tensor:
    """(K, D) embeddings of `size` training captions drawn at random (all when fewer) from a
    split's `Inputs`: projected from cached tower features when the text tower is frozen."""
    captions = all_captions(inputs.records)
    pick = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))[:size]
    if inputs.text_features is not None:
        with eval_mode(model):
            return model.project_text(inputs.text_features[pick].to(model.device)).float().cpu()
    return embed_texts(model, [captions[i] for i in pick.tolist()]).float().cpu()


def save_bank(folder, bank: torch.Tensor, alpha: float, beta: float) -> Path:
    from safetensors.torch import save_file

    from clip_foundation.common.files import atomic_write
    path = Path(folder) / FILE
    atomic_write(path, lambda tmp: save_file({"bank": bank.half().contiguous()}, tmp,
                                             metadata={"alpha": str(alpha), "beta": str(beta)}))
    return path


def load_bank(folder, dim: int | None = None) -> tuple[torch.Tensor, float, float] | None:
    """-> (bank (K, D) float32, alpha, beta) saved in a run folder, or None when it has none.

    The file is checked here, once for every caller (train, evaluate, search, the page): a bank
    that would turn scores into NaN, inf or nonsense (unreadable, no "bank" tensor, not (K, `dim`)
    unit-length rows, alpha not finite, beta not above 0) is a CheckpointError naming the file."""
    from safetensors import SafetensorError, safe_open
    path = Path(folder) / FILE
    if not path.is_file():
        return None

    def fault(message: str) -> CheckpointError:
        return CheckpointError(f"{path}: {message}; delete it to go without querybank normalisation")

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if "bank" not in f.keys():
                raise fault(f'no "bank" tensor (it holds {sorted(f.keys())})')
            bank = f.get_tensor("bank").float()
    except SafetensorError as e:  # 0-byte, truncated, not a safetensors file
        raise fault(f"not a readable safetensors file ({e})") from None
    try:
        alpha, beta = float(meta["alpha"]), float(meta["beta"])
    except (KeyError, ValueError):
        raise fault(f"its metadata must give alpha and beta as numbers, not {meta}") from None
    if bank.dim() != 2 or len(bank) == 0 or bank.shape[1] != (dim or bank.shape[1]):
        raise fault(f"the bank is {tuple(bank.shape)}, not (K, {dim or 'D'}) caption embeddings with K >= 1")
    if not torch.isfinite(bank).all():
        raise fault("non-finite values (NaN or inf) in the bank")
    norms = bank.norm(dim=1)
    worst = int((norms - 1).abs().argmax())
    if abs(float(norms[worst]) - 1) > NORM_TOLERANCE:
        raise fault(f"row {worst} has norm {float(norms[worst]):.3g}: bank rows must be unit-length "
                    "caption embeddings")
    if not math.isfinite(alpha):
        raise fault(f"alpha={alpha}: must be finite")
    if not (math.isfinite(beta) and beta > 0):
        raise fault(f"beta={beta}: must be finite and above 0")
    return bank, alpha, beta
