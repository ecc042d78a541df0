"""Training from WebDataset shards: the run's streaming options (`StreamConfig`, its `stream` section)
and the training inputs streamed from shards (`StreamInputs`, a `inputs.TrainingInputs`). How shards
are read, shuffled and resumed is data/stream.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from clipModel import check, to_model_input

from clip_foundation.data.records import DataError
from clip_foundation.data.splits import absolute_path, token_batch
from clip_foundation.data.stream import ShardStreams, count_samples, shard_urls


def _position(piece) -> tuple[int, int]:
    return tuple(piece["position"])


@dataclass
class StreamConfig:
    """Streaming options: used when --data names shards (see data/stream.py's docstring)."""
    val_data: str = ""  # the val set when --data names shards: a dataset folder or shard set
    test_data: str = ""  # the test set when --data names shards: a dataset folder or shard set
    train_samples: int = 0  # samples per epoch; 0 = the count in the shards' shards.json / img2dataset stats
    workers: int = 2  # DataLoader processes per GPU decoding shards; 0 = in the training process
    streams: int = 0  # shard streams each global batch draws from; 0 = processes x workers (keep it to resume on other hardware)
    shuffle_buffer: int = 1000  # samples each stream shuffles among (more mixes better, costs memory)

    def validate(self) -> None:
        """ConfigError (one line: the key, the value, the allowed range) for a value out of range."""
        for key in ("train_samples", "workers", "streams", "shuffle_buffer"):
            check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")

    def absolute(self) -> "StreamConfig":
        """Local val/test paths made absolute, as a run saves them (see DataConfig.absolute)."""
        return replace(self, val_data=absolute_path(self.val_data), test_data=absolute_path(self.test_data))


class StreamInputs:
    """The training loop's inputs when --data names shards (inputs.TrainingInputs, as the cached
    path's inputs.TrainInputs): `len()` steps per epoch, `batches()` -> (images (b, 3, S, S) uint8,
    tokens (b, 2, T)), `embed()` for the model step, and `state()`/`restore()` for checkpoints."""

    def __init__(self, model, path: str, cfg: StreamConfig, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1):
        self.model, self.cfg, self.seed, self.rank, self.world = model, cfg, seed, rank, world
        self.urls = shard_urls(path)
        workers = max(cfg.workers, 1)
        self.streams = cfg.streams or world * workers
        if self.streams % world or (self.streams // world) % workers:
            raise ValueError(f"--streams={self.streams} must split evenly over {world} processes x {workers} workers")
        if batch_size % self.streams:
            raise ValueError(f"batch_size {batch_size} does not split into {self.streams} equal stream pieces")
        if len(self.urls) < self.streams:
            raise DataError(f"{path}: {len(self.urls)} shards for {self.streams} streams (processes x workers): "
                            "every stream needs a shard; write smaller shards or pass fewer --workers")
        samples = cfg.train_samples or count_samples(self.urls)
        if not samples:
            raise DataError(f"{path}: the number of samples is unknown (no shards.json or *_stats.json "
                            "beside the shards): pass --train_samples=N")
        self.batch_size, self.steps = batch_size, samples // batch_size
        if not self.steps:
            raise DataError(f"{samples} training samples: lower --batch_size below that")
        per_rank = self.streams // world
        self.owned = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.positions = {s: (0, 0) for s in self.owned}
        self.skipped, self.first, self.before = {}, {}, {}  # this process's counts; `before`: a resumed run's
        self.read = {}  # pass -> indices of the shards this rank trained on
        self.iterator, self.start = None, 0

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch: int, start: int = 0):
        """Epochs are sample counts of one endless stream: only the batches left matter."""
        self.start = start

    def move_rows(self, device, mode):  # streamed rows are never resident
        pass

    def refresh_tokens(self, model):  # captions are tokenized per batch, with the model's tokenizer
        pass

    def manifest(self) -> list[str]:
        return list(self.urls)

    def restore(self, state: dict | None):
        """Continue from a checkpoint's `state()`; a stream count that changed is an error."""
        if not state:
            return
        if state["streams"] != self.streams or state["shards"] != len(self.urls):
            raise DataError(f"the run streamed {state['shards']} shards in {state['streams']} streams; now "
                            f"{len(self.urls)} shards in {self.streams}: resume with --streams={state['streams']} "
                            "and the same shards (the saved positions are per stream)")
        self.positions = {s: tuple(state["positions"][str(s)]) for s in self.owned}
        self.before = dict(state.get("skipped", {}))

    def _loader(self):
        dataset = ShardStreams(self.urls, self.streams, self.owned, self.batch_size // self.streams,
                               self.model.config.image.image_size, self.seed, self.cfg.shuffle_buffer,
                               dict(self.positions))
        workers = self.cfg.workers
        return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                prefetch_factor=2 if workers else None,
                                                persistent_workers=workers > 0))

    def batches(self, device: torch.device):
        """This epoch's remaining steps -> (images (b, 3, S, S) uint8, tokens (b, 2, T): ids, mask)."""
        if self.iterator is None:
            self.iterator = self._loader()
        index = {u: i for i, u in enumerate(self.urls)}
        for _ in range(self.start, self.steps):
            pieces = [next(self.iterator) for _ in self.owned]
            assert [p["stream"] for p in pieces] == self.owned, "pieces out of stream order"
            for p in pieces:
                self.positions[p["stream"]] = _position(p)
                self.skipped[p["stream"]], self.first[p["stream"]] = p["skipped"], p["first"]
                for pass_, url in p["read"]:
                    self.read.setdefault(pass_, set()).add(index[url])
            images = torch.cat([p["images"] for p in pieces])  # (b, 3, S, S) uint8, b = B / world
            tokens = self.model.tokenize([c for p in pieces for c in p["captions"]])
            tokens = torch.stack([tokens["input_ids"], tokens["attention_mask"]], 1)  # (b, 2, T)
            yield (images.pin_memory() if device.type == "cuda" else images), tokens
        self.start = 0

    def embed(self, model, image_rows, tokens, augment: bool = False):
        """-> normalised (image embeddings, text embeddings); the cached path's GPU-side
        augmentation and normalisation (clipModel.to_model_input)."""
        device, cfg = model.device, model.config.image
        ids, mask = token_batch({"input_ids": tokens[:, 0], "attention_mask": tokens[:, 1]},
                                torch.arange(len(tokens)))
        image_f = model.encode_image(to_model_input(image_rows.to(device), cfg.mean, cfg.std, augment))
        return image_f, model.encode_text(ids.to(device), mask.to(device))

    def state(self) -> dict:
        """Every rank's stream positions, skip counts and shards read, gathered (a collective
        under torchrun: every rank calls it) -> the dict checkpoints keep."""
        mine = {"positions": {str(s): list(p) for s, p in self.positions.items()}, "skipped": self.skipped,
                "first": self.first, "read": {p: sorted(v) for p, v in self.read.items()}}
        every = [mine]
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, mine)
        skipped = dict(self.before)
        for part in every:
            for counts in part["skipped"].values():
                for kind, n in counts.items():
                    skipped[kind] = skipped.get(kind, 0) + n
        first = {k: m for part in every for f in part["first"].values() for k, m in f.items()}
        return {"streams": self.streams, "shards": len(self.urls), "skipped": skipped, "first": first,
                "positions": {s: p for part in every for s, p in part["positions"].items()},
                "read_by_rank": [part["read"] for part in every]}

    def report(self) -> str:
        """One line on the samples skipped so far (all ranks; a collective); empty if none."""
        state = self.state()
        if not state["skipped"]:
            return ""
        counts = ", ".join(f"{n} {k}" for k, n in sorted(state["skipped"].items()))
        first = "; ".join(sorted(state["first"].values()))[:500]
        return f"streaming skipped {counts} samples (first: {first})"
