"""Records -> splits by image -> decoded uint8 images (once) -> batches for training/eval."""
from __future__ import annotations

import os
import random
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Sampler

from clipModel import CLIPConfig, check

from clip_foundation.data.cache import load_images
from clip_foundation.data.records import IMAGE_SUFFIXES, DataError, DataWarning, Record, SkippableError, image_files
from clip_foundation.data.sources import detect_layout, layout_names, load_records, source_of

SPLITS = ("train", "val", "test")


@dataclass
class DataConfig:
    path: str = ""  # dataset folder; empty = the built-in synthetic set (generated on first use)
    layout: str = "auto"  # auto (detected), or a layout of data/sources.py's SOURCES (an unknown one is refused, listing them)
    image_column: str = ""  # csv / hf layouts: the image column; empty = the layout's default
    caption_column: str = ""  # csv / hf layouts: the caption column; empty = the layout's default
    synthetic_dir: str = "data/synthetic"  # where the synthetic set lives when path is empty
    val_images: int = 1000  # seeded split sizes, used only when the dataset ships no split
    test_images: int = 1000
    split_seed: int = 0  # seed of that split, so every run of a dataset sees the same split
    cache_dir: str = "data/cache"  # decoded images kept here across runs; empty = in memory only
    skip_bad: bool = False  # skip (count and report) bad rows and undecodable images instead of failing
    restval: bool = True  # Karpathy split files: train on their restval images too (COCO's 30,504, as papers do); false leaves them out
    val_from_train: int = 0  # carve this many training images as val (picks the epoch); the dataset's val then scores as test if it has none

    def validate(self) -> None:
        """Raise ConfigError (one line: the key, the value, the allowed range) for a value out of range."""
        check(self.layout in ("auto", *layout_names()), "layout", self.layout, " | ".join(("auto", *layout_names())))
        check(bool(self.synthetic_dir), "synthetic_dir", self.synthetic_dir, "a folder path")
        # negative sizes would slice the shuffled order from its end: splits that overlap
        for key in ("val_images", "test_images", "val_from_train"):
            check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")

    def absolute(self) -> "DataConfig":
        """This config with its local paths made absolute, as a run saves it: the run folder then
        evaluates and searches from any directory and after a `mv` (URLs and `hf:` names stay)."""
        return replace(self, **{k: absolute_path(getattr(self, k)) for k in ("path", "synthetic_dir", "cache_dir")})


def absolute_path(path: str) -> str:
    """A local path made absolute; URLs, `hf:` names and empty paths as they are."""
    # "hf:NAME", "pipe:cmd", "https://..." name no local file; "C:\\..." (one letter) does
    if not path or re.match(r"^[A-Za-z][\w+.-]+:", path):
        return path
    return os.path.abspath(os.path.expanduser(path))  # not resolve(): keeps {000..009} and symlinks as typed


def split_by_image(records: list[Record], val_images: int, test_images: int,
                   seed: int = 0) -> dict[str, list[Record]]:
    """Use the dataset's own split when it ships one; else a seeded split by image."""
    if any(r.split in SPLITS for r in records):
        unlisted = sum(r.split not in (*SPLITS, "restval") for r in records)  # restval: left out as asked
        if unlisted:
            warnings.warn(f"{unlisted} images are in none of the dataset's split lists; left out",
                          DataWarning, stacklevel=2)
        return {s: [r for r in records if r.split == s] for s in SPLITS}
    if val_images + test_images >= len(records):
        raise DataError(f"only {len(records)} images: too few for {val_images} val + "
                        f"{test_images} test images; lower --val_images/--test_images")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen = {"val": order[:val_images], "test": order[val_images:val_images + test_images],
              "train": order[val_images + test_images:]}
    return {s: [records[i] for i in sorted(idx)] for s, idx in chosen.items()}


def load_all(cfg: DataConfig) -> list[Record]:
    """Every record of the dataset at `cfg.path`, unsplit."""
    source = source_of(cfg.path, cfg.layout)
    if any(getattr(cfg, k) and k not in source.options for k in ("image_column", "caption_column")):
        raise DataError(f"--image_column/--caption_column apply to {' and '.join(layout_names('image_column'))} "
                        f"datasets, not {source.name}")
    # the options its reader takes; an empty column name is the layout's default
    options = {k: getattr(cfg, k) for k in source.options if getattr(cfg, k) != ""}
    return load_records(cfg.path, source.name, skip_bad=cfg.skip_bad, **options)


def load_splits(cfg: DataConfig) -> dict[str, list[Record]]:
    """The dataset split by image: its own split when it ships one, else a seeded one (then,
    with `val_from_train`, the validation images carved from train)."""
    return carve_val_from_train(_own_splits(cfg), cfg.val_from_train, cfg.split_seed)


def _own_splits(cfg: DataConfig) -> dict[str, list[Record]]:
    return split_by_image(load_all(cfg), cfg.val_images, cfg.test_images, cfg.split_seed)


def carve_val_from_train(splits: dict[str, list[Record]], n: int, seed: int = 0) -> dict[str, list[Record]]:
    """Move `n` seeded training images into val, so the epoch and recipe are chosen on images
    carved from train; the dataset's own val then becomes the test split when it has none."""
    if n <= 0:
        return splits
    train = splits["train"]
    if n >= len(train):
        raise DataError(f"--val_from_train={n} leaves no training images (the train split has {len(train)})")
    chosen = set(random.Random(seed).sample(range(len(train)), n))
    return {"train": [r for i, r in enumerate(train) if i not in chosen],
            "val": [r for i, r in enumerate(train) if i in chosen],
            "test": _carved_test(splits, n)}


def _carved_test(splits: dict[str, list[Record]], n: int) -> list[Record]:
    """The test split `carve_val_from_train(splits, n)` leaves, which no training image is part of."""
    return (splits["test"] or splits["val"]) if n > 0 else splits["test"]


def load_split(cfg: DataConfig, split: str) -> list[Record]:
    """One split as `load_splits` makes it, or "all": every record, never split, so any folder
    of any size can be scored or searched as a whole. The test split needs no training images:
    a folder holding only the published test images scores under a run that carved its val from train."""
    if split == "all":
        return load_all(cfg)
    if split == "test":
        return _carved_test(_own_splits(cfg), cfg.val_from_train)
    return load_splits(cfg)[split]


def check_captions(records: list[Record], tokenizer, skip_bad: bool = False) -> list[Record]:
    """Reject captions the tokenizer reads as nothing but unknown tokens (e.g. a script its
    vocabulary lacks): an error naming the image and its source line, or with `skip_bad` a
    counted skip (an image left with no caption is dropped too)."""
    if not records:  # e.g. a dataset that ships no test split
        return records
    ids = tokenizer(all_captions(records), add_special_tokens=False)["input_ids"]
    unknown = tokenizer.unk_token_id
    kept, bad, first, k = [], 0, "", 0
    for rec in records:
        good = []
        for caption in rec.captions:
            if ids[k] and any(t != unknown for t in ids[k]):
                good.append(caption)
            else:
                where = f"{rec.image} (source line {rec.line})" if rec.line else str(rec.image)
                message = f"{where}: caption {caption!r} has only unknown tokens for this tokenizer"
                if not skip_bad:
                    raise SkippableError(message + "; fix it or pass --skip_bad")
                bad, first = bad + 1, first or message
            k += 1
        if good:
            kept.append(replace(rec, captions=good))
    if bad:
        warnings.warn(f"skipped {bad} captions with only unknown tokens "
                      f"({len(records) - len(kept)} images left with none); first: {first}", DataWarning)
    return kept


def run_data_config(run_dir, path: str | None = None, layout: str = "auto", skip_bad: bool = False) -> DataConfig:
    """The DataConfig a run was trained with, so its "test" split names the same images;
    `path` points it at another copy of the data (its split settings are kept), `skip_bad` skips
    bad rows and images of it (as the run may have). A saved dataset folder that is no longer
    there is a DataError naming it and the `--data=` way out."""
    saved = CLIPConfig.saved(run_dir).get("data", {}) if (Path(run_dir) / "config.json").is_file() else {}
    cfg = DataConfig(**{k: v for k, v in saved.items() if k in DataConfig.__dataclass_fields__})
    cfg.skip_bad = cfg.skip_bad or skip_bad
    if path:
        return replace(cfg, path=str(path), layout=layout)
    cfg.path = cfg.path or cfg.synthetic_dir
    if absolute_path(cfg.path) == cfg.path and not Path(cfg.path).exists() and not _is_pattern(cfg.path):
        raise DataError(f"{cfg.path}: the dataset {Path(run_dir).name} was trained on is not there (moved "
                        "or deleted?): point at a copy with --data=DIR")
    return cfg


def _is_pattern(path: str) -> bool:
    return "{" in path or "*" in path  # a shard pattern, expanded by the stream


def split_manifest(splits: dict[str, list[Record]]) -> dict[str, list[str]]:
    """The split actually used, saved with every run (image paths per split)."""
    return {s: [str(r.image) for r in recs] for s, recs in splits.items()}


def decode_images(records: list[Record], image_size: int, cache_dir: str | None = None,
                  skip_bad: bool = False, progress: bool = True) -> tuple[torch.Tensor, list[Record]]:
    """Decode every image once, resized and center-cropped to `image_size`.

    -> (images (N, 3, S, S) uint8, the records they belong to). With `cache_dir` the decoded
    images are kept on disk (cache.py) and memory-mapped by later epochs and runs; with
    `skip_bad` undecodable images are dropped, counted and reported instead of raising.
    """
    images, kept = load_images(records, image_size, cache_dir or None, skip_bad, progress)
    return images, [records[i] for i in kept]


def token_batch(tokens: dict[str, torch.Tensor], index: torch.Tensor):
    """Rows `index` of pre-tokenized captions, padding trimmed to the longest among them."""
    ids, mask = tokens["input_ids"][index], tokens["attention_mask"][index]
    longest = int(mask.sum(1).max())
    return ids[:, :longest], mask[:, :longest]


class UniqueImageBatchSampler(Sampler):
    """Batches of (image, caption) pairs in which no image appears twice.

    An epoch is `captions_per_epoch` rounds; each round visits every image once with a
    caption not yet used this epoch, in a fresh random order, and is cut into batches
    separately, so two captions of one image never meet in a batch (see loss.clip_loss).
    Under DDP every rank draws the same global batch and keeps its own contiguous share
    (rank r of W: pairs r*B/W to (r+1)*B/W), so uniqueness holds across the global batch —
    torch's DistributedSampler shards items, not batches, and would lose that.
    """

    def __init__(self, caption_counts: list[int], batch_size: int, captions_per_epoch: int = 1,
                 seed: int = 0, drop_last: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} does not split evenly over {world_size} processes")
        self.counts, self.batch_size = caption_counts, batch_size
        self.rounds, self.seed, self.drop_last = captions_per_epoch, seed, drop_last
        self.rank, self.world_size, self.epoch, self.start = rank, world_size, 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        """Iterate epoch `epoch`, skipping its first `start` batches (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def _round_batches(self):
        n, b = len(self.counts), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __len__(self):
        return self.rounds * self._round_batches()

    def __iter__(self):
        rng = random.Random(self.seed * 100_003 + self.epoch)
        caption_order = [rng.sample(range(c), c) for c in self.counts]
        k = 0
        for r in range(self.rounds):
            images = rng.sample(range(len(self.counts)), len(self.counts))
            for b in range(self._round_batches()):
                k += 1
                if k <= self.start:
                    continue
                chunk = images[b * self.batch_size:(b + 1) * self.batch_size]
                share = -(-len(chunk) // self.world_size)
                yield [(i, caption_order[i][r % self.counts[i]]) for i in chunk[self.rank * share:(self.rank + 1) * share]]


def caption_offsets(records: list[Record]) -> list[int]:
    offsets = [0]
    for r in records:
        offsets.append(offsets[-1] + len(r.captions))
    return offsets


def all_captions(records: list[Record]) -> list[str]:
    return [c for r in records for c in r.captions]


def batch_indices(sampler: UniqueImageBatchSampler, records: list[Record]):
    """Yield (image index, flat caption index) tensors (B,) for each batch of the sampler."""
    offsets = caption_offsets(records)
    for batch in sampler:
        yield (torch.tensor([i for i, _ in batch]), torch.tensor([offsets[i] + c for i, c in batch]))


def prefetch(iterator, depth: int = 2):
    """Run `iterator` in a background thread, up to `depth` items ahead: host-side batch gathers
    (memory-mapped cache reads, pinning) overlap the model step instead of preceding it."""
    import queue
    import threading
    items, done = queue.Queue(depth), object()

    def run():
        try:
            for item in iterator:
                items.put(item)
            items.put(done)
        except BaseException as e:  # re-raised in the consuming thread
            items.put(e)
    threading.Thread(target=run, daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def train_sampler(records: list[Record], batch_size: int, captions_per_epoch: int, seed: int,
                  rank: int = 0, world_size: int = 1) -> UniqueImageBatchSampler:
    if len(records) < batch_size:
        raise DataError(f"only {len(records)} training images: lower --batch_size below that")
    return UniqueImageBatchSampler([len(r.captions) for r in records], batch_size, captions_per_epoch,
                                   seed, rank=rank, world_size=world_size)


# ---------------------------------------------------------------- galleries

def gallery_records(checkpoint, data: str | None, split: str, layout: str = "auto",
                    skip_bad: bool = False) -> list[Record]:
    """The records of `split` exactly as the model's training run split them, or "all": every
    record of the folder, unsplit (`skip_bad`: bad rows left out). A plain folder of images
    (`layout="images"`, or any folder that has images but no dataset layout) gives every image
    in it, with no captions."""
    if data and (layout == "images" or (layout == "auto" and _plain_image_folder(data))):
        return image_folder_records(data)
    try:
        return load_split(run_data_config(checkpoint, data, layout, skip_bad), split)
    except DataError:
        # nested photo folders look like class folders; if they don't load as those, take the images
        if data and layout == "auto" and detect_layout(data) == "classes":
            return image_folder_records(data)
        raise


def _plain_image_folder(path) -> bool:
    try:
        detect_layout(path)
        return False
    except DataError:  # no dataset layout: a folder of images is still a gallery
        return Path(path).is_dir() and bool(image_files(Path(path), recursive=True))


def image_folder_records(folder) -> list[Record]:
    """Every image under `folder` (recursively, hidden files skipped) as a Record with no captions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    records = [Record(p.resolve(), []) for p in image_files(folder, recursive=True)]
    if not records:
        raise DataError(f"{folder}: no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) in it or below")
    return records
