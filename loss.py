"""Contrastive losses over (already L2-normalised) image and text features."""
import warnings

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
