"""Contrastive losses over (already L2-normalised) image and text features."""
import torch
import torch.nn.functional as F


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy: pair i of the batch is the only positive for row/column i.

    Two captions of one image in a batch would be false negatives; the training sampler
    (data.UniqueImageBatchSampler) never puts two captions of one image in a batch.
    """
    logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2
