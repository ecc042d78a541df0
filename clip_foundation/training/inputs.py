"""What the model consumes: a split's decoded images or a frozen image tower's cached
features, and its pre-tokenized captions or a frozen text tower's cached features.

The training loop reads its training inputs only through `TrainingInputs`, which the cached
path (`TrainInputs` here) and the streamed path (`streaming.StreamInputs`) both implement."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F

from clipModel import CLIPModel, to_model_input

from clip_foundation.data.splits import UniqueImageBatchSampler, all_captions, batch_indices, prefetch, token_batch
from clip_foundation.training.features import image_tower_features, text_tower_features
from clip_foundation.evaluate.querybank import recall_with_bank
from clip_foundation.evaluate.metrics import embed_images, embed_texts, embed_tokens, eval_mode


class TrainingInputs(Protocol):
    """What the training loop asks of its training inputs, cached or streamed."""

    def __len__(self) -> int:
        """Optimizer steps per epoch."""

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Begin `epoch`, skipping its first `start` batches (a resumed run did them)."""

    def batches(self, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's remaining batches: (image rows, captions), as `embed` takes them."""

    def embed(self, model: CLIPModel, image_rows, captions, augment: bool = False):
        """-> normalised (image embeddings, text embeddings) of a batch, on the model's device."""

    def move_rows(self, device: torch.device, mode: str) -> None:
        """Keep the image rows on the device when asked (`mode`: auto | on | off) and they fit."""

    def refresh_tokens(self, model: CLIPModel) -> None:
        """Tokenize the captions again: the tokenizer was replaced (rank 0's, under torchrun)."""

    def manifest(self) -> list[str]:
        """What the training split is, for the run's split.json (image paths or shard URLs)."""

    def state(self) -> dict | None:
        """What a checkpoint must keep to resume mid-data (a collective under torchrun)."""

    def restore(self, state: dict | None) -> None:
        """Continue from a checkpoint's `state()`."""

    def report(self) -> str:
        """One line on the samples skipped while training, or "" (a collective under torchrun)."""


def tower_trains(frozen: bool, trained_blocks: int) -> bool:
    """Whether any of a tower's weights train: not frozen, or frozen but for its last blocks."""
    return not frozen or trained_blocks > 0


class Inputs:
    """A split's inputs, ready for the model: decoded images or a frozen image tower's
    features, and pre-tokenized captions or a frozen text tower's features."""

    def __init__(self, model: CLIPModel, records, images, *, image_trains: bool = True,
                 text_trains: bool = True, augment: bool = False, cache_dir: str = "", progress: bool = True,
                 engine: str = "torch", calibration: torch.Tensor | None = None):
        self.records, self.images = records, images
        self.image_features = self.text_features = self.tokens = None
        self.feature_dropout = 0.0  # set on the training split alone (TrainInputs)
        if not image_trains and not augment:  # frozen and never augmented: encode once
            self.image_features = image_tower_features(model, records, images, cache_dir, progress=progress,
                                                       engine=engine, calibration=calibration)
        if not text_trains:
            self.text_features = text_tower_features(model, all_captions(records), cache_dir, progress=progress,
                                                     engine=engine)
        else:
            self.tokens = model.tokenize(all_captions(records))

    def move_rows(self, device: torch.device, mode: str):
        """Keep the per-image rows on the GPU when asked or when they fit: no host copies per batch."""
        rows = self.image_rows()
        if device.type != "cuda" or mode == "off":
            return
        if mode == "auto" and rows.numel() * rows.element_size() > 0.5 * torch.cuda.mem_get_info(device)[0]:
            return
        rows = rows.to(device)
        if self.image_features is None:
            self.images = rows
        else:
            self.image_features = rows

    def image_rows(self) -> torch.Tensor:
        return self.images if self.image_features is None else self.image_features

    def batch_rows(self, image_index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The batch's image rows (B, 3, S, S) uint8 or (B, d) features, gathered where they live
        (pinned for a fast copy when that is the host and the model is on a GPU)."""
        rows = self.image_rows()
        rows = rows[image_index.to(rows.device)]
        if rows.device.type == "cpu" and device.type == "cuda":
            rows = rows.pin_memory()
        return rows

    def gather(self, indices, device: torch.device):
        """(image index, caption index) batches -> (image rows, caption index); host gathers run
        one batch ahead in a thread, device-resident rows are gathered on the device."""
        gathered = ((self.batch_rows(i, device), c) for i, c in indices)
        return gathered if self.image_rows().device == device else prefetch(gathered)

    def refresh_tokens(self, model: CLIPModel) -> None:
        if self.tokens is not None:  # frozen text features do not depend on token numbering
            self.tokens = model.tokenize(all_captions(self.records))

    def embed(self, model: CLIPModel, image_rows, caption_index, augment: bool = False):
        """-> normalised (image embeddings, text embeddings) of a batch, on the model's device."""
        device, cfg = model.device, model.config.image
        if self.image_features is not None:
            rows = image_rows.to(device)
            if self.feature_dropout and model.training:  # cached features cannot be augmented; drop some instead
                rows = F.dropout(rows, self.feature_dropout)
            image_f = model.project_image(rows)
        else:
            image_f = model.encode_image(to_model_input(image_rows.to(device), cfg.mean, cfg.std, augment))
        if self.text_features is not None:
            text_f = model.project_text(self.text_features[caption_index].to(device))
        else:
            ids, mask = token_batch(self.tokens, caption_index)
            text_f = model.encode_text(ids.to(device), mask.to(device))
        return image_f, text_f



class TrainInputs(Inputs):
    """The cached training split, drawn by the unique-image sampler: the `TrainingInputs` of
    decoded images and cached features."""

    def __init__(self, model: CLIPModel, records, images, sampler: UniqueImageBatchSampler,
                 feature_dropout: float = 0.0, **kwargs):
        super().__init__(model, records, images, **kwargs)
        self.sampler, self.feature_dropout = sampler, feature_dropout

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

    def batches(self, device: torch.device):
        return self.gather(batch_indices(self.sampler, self.records), device)

    def manifest(self) -> list[str]:
        return [str(r.image) for r in self.records]

    def state(self) -> None:
        return None  # the sampler's order follows from the seed and the epoch

    def restore(self, state) -> None:
        pass

    def report(self) -> str:
        return ""  # bad images were dropped (and reported) when the split was decoded


@torch.no_grad()
def split_recall(model: CLIPModel, inputs: Inputs, querybank=None) -> dict:
    """Recall metrics of a split; cheap when both towers' features are cached. With `querybank`
    ((bank, alpha, beta), see querybank.py) also those with querybank normalisation. The captions
    are encoded from the split's tokens (tokenized once, not every epoch), in `embed_texts`' batches."""
    with eval_mode(model):
        if inputs.image_features is not None and inputs.text_features is not None:
            image_f = model.project_image(inputs.image_features.to(model.device)).float()
            text_f = model.project_text(inputs.text_features.to(model.device)).float()
        else:
            image_f = embed_images(model, inputs.images, batch_size=256)
            text_f = (embed_texts(model, all_captions(inputs.records)) if inputs.tokens is None
                      else embed_tokens(model, inputs.tokens))
    return recall_with_bank(image_f, text_f, inputs.records, querybank)


class Embedder(torch.nn.Module):
    """The model step as one module, so DDP (which hooks a module's forward) can wrap it."""

    def __init__(self, model: CLIPModel, inputs: TrainingInputs, augment: bool):
        super().__init__()
        self.model, self.inputs, self.augment = model, inputs, augment

    def forward(self, image_rows, caption_index):
        return self.inputs.embed(self.model, image_rows, caption_index, self.augment)


def set_train_mode(model: CLIPModel, image_trains: bool, text_trains: bool):
    """Training mode, except fully frozen towers (their BatchNorm / dropout stay in eval mode)."""
    model.train()
    model.image_encoder.train(image_trains)
    model.text_encoder.train(text_trains)
