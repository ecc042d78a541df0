"""Convert any dataset folder the readers read into WebDataset tar shards.

    python -m clip_foundation.shards data/flickr8k data/flickr8k-shards --shard_size 1000

Each sample is `KEY.<ext>` (the image file's own bytes, never re-encoded), `KEY.txt` (its
first caption, as img2dataset writes) and `KEY.json` ({"captions": [every caption], "source":
the image path}). A dataset that ships a split gets one shard set per split (OUT/train,
OUT/val, OUT/test); otherwise OUT holds one set. Records are shuffled (seeded) before they are
cut into shards, so a class-folder dataset does not give one class per shard.

`shards.json` in each set lists its shards (samples and bytes) and counts its samples, which
streaming training reads as the epoch size when --train_samples is not given. It is written
first marked incomplete, before any shard is replaced, and marked complete last; each shard is
written under a temporary name and renamed when whole. So a killed or failed conversion leaves a
set that streaming refuses (naming the fix: convert again), never one it half-trusts. OUT must
be new, empty or one of the converter's own sets: it never deletes a file it did not write.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from clip_foundation.data.splits import SPLITS, DataConfig, load_all
from clip_foundation.common.extras import optional
from clip_foundation.common.files import atomic_write, unlisted
from clip_foundation.data.records import DataError, DataWarning, Record
from clip_foundation.data.sources import source_of
from clip_foundation.data.stream import INDEX_FILE, SampleCounter, check_sample, decode_captions, read_json, shard_urls


@dataclass
class ShardsConfig:
    src: str = ""  # dataset folder (any layout the readers read: flickr8k/30k, csv, class folders, hf)
    out: str = ""  # output folder for the shards
    shard_size: int = 1000  # samples per tar shard (img2dataset writes 10,000; smaller shards spread over more workers)
    layout: str = "auto"  # reader layout of SRC; auto = detected
    image_column: str = ""  # csv / hf layouts: the image column; empty = the layout's default
    caption_column: str = ""  # csv / hf layouts: the caption column; empty = the layout's default
    split: bool = True  # one shard set per split when the dataset ships one (else all records in one set)
    shuffle: bool = True  # shuffle records (seeded) before sharding, so shards are alike
    seed: int = 0  # seed of that shuffle
    skip_bad: bool = False  # skip (count and report) bad rows instead of failing
    progress: bool = True  # tqdm progress bar


def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def sample_key(index: int) -> str:
    """A key without dots (webdataset splits a member's name at its first dot)."""
    return f"{index:09d}"


def owned_files(out: Path) -> list[Path]:
    """The files in `out` an earlier conversion wrote (its shards.json, the shards it lists and
    their temporary files); DataError when `out` holds anything else, so nothing of the
    user's is deleted or mixed into the set."""
    if not out.is_dir():
        return []
    listed = {INDEX_FILE}
    if (out / INDEX_FILE).is_file():
        with contextlib.suppress(DataError, KeyError, TypeError):  # unreadable: it owns nothing then
            listed |= {s["name"] for s in read_json(out / INDEX_FILE, "")["shards"]}
    entries = sorted(out.iterdir())
    foreign = unlisted(out, listed)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise DataError(f"{out}: holds {foreign[0].name}{more}, which the converter did not write: "
                        "give a new or empty folder as OUT")
    return entries


def _write_index(out: Path, shards: list[dict], complete: bool) -> dict:
    index = {"complete": complete, "shards": shards, "samples": sum(s["samples"] for s in shards)}
    with _naming(out / INDEX_FILE, "the shard index"):
        atomic_write(out / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    return index


@contextlib.contextmanager
def _naming(path: Path, what: str):
    # a full disk or a read-only folder: one line naming the file (OSError's own names none)
    try:
        yield
    except OSError as e:
        raise DataError(f"{path}: cannot write {what} ({e.strerror or e})") from None


def write_shards(records: list[Record], out: str | Path, shard_size: int = 1000,
                 progress: bool = True, desc: str = "") -> dict:
    """Write `records` as shards of `shard_size` samples to folder `out` -> its shards.json index.

    `out` must be new, empty or an earlier conversion's set (replaced; see `owned_files`). A
    record whose image file cannot be read, or a shard that cannot be written, is an error
    naming it; the set is then left marked incomplete."""
    wds = optional("webdataset", "shards", "WebDataset shards")
    from tqdm.auto import tqdm
    if shard_size < 1:
        raise ValueError(f"--shard_size must be at least 1, not {shard_size}")
    out = Path(out)
    old = owned_files(out)
    with _naming(out, "the shard set"):
        out.mkdir(parents=True, exist_ok=True)
    # Until the new index is written, the old one still lists the shards deleted here: streaming
    # refuses the set as missing shards, and a new conversion still owns them.
    for path in old:
        if path.name != INDEX_FILE:
            path.unlink(missing_ok=True)
    starts = range(0, len(records), shard_size)
    planned = [{"name": shard_name(i), "samples": len(records[start:start + shard_size])}
               for i, start in enumerate(starts)]
    _write_index(out, planned, complete=False)

    def write(tmp: Path, start: int):
        with open(tmp, "wb") as f, wds.TarWriter(f) as sink:
            for i, rec in enumerate(records[start:start + shard_size], start=start):
                try:
                    data = Path(rec.image).read_bytes()
                except OSError as e:
                    raise DataError(f"{rec.image}: cannot read image ({e.strerror or e})") from None
                ext = Path(rec.image).suffix.lower().lstrip(".") or "jpg"
                sink.write({"__key__": sample_key(i), ext: data, "txt": rec.captions[0],
                            "json": {"captions": list(rec.captions), "source": str(rec.image)}})
                bar.update()

    with tqdm(total=len(records), desc=desc or f"writing {out}", disable=not progress, unit="img") as bar:
        for shard, start in zip(planned, starts):
            path = out / shard["name"]
            with _naming(path, "the shard"):
                atomic_write(path, lambda tmp: write(tmp, start))  # a temporary name until whole
            shard["bytes"] = path.stat().st_size  # streaming checks it: a shard replaced later is refused
    return _write_index(out, planned, complete=True)


def convert(cfg: ShardsConfig) -> dict[str, dict]:
    """SRC -> shards under OUT (one set per shipped split with `cfg.split`) -> {set folder: index}."""
    data = DataConfig(path=cfg.src, layout=cfg.layout, image_column=cfg.image_column,
                      caption_column=cfg.caption_column, skip_bad=cfg.skip_bad)
    records = load_all(data)
    if not records:
        raise DataError(f"{cfg.src}: no images to convert")
    if cfg.shuffle:
        records = records[:]
        random.Random(cfg.seed).shuffle(records)
    sets = {"": records}
    if cfg.split and any(r.split in SPLITS for r in records):
        sets = {s: [r for r in records if r.split == s] for s in SPLITS}
    for name in sets:  # every set's OUT before writing any, so a refusal leaves nothing half done
        owned_files(Path(cfg.out) / name)
    written = {}
    for name, recs in sets.items():
        if recs:
            folder = Path(cfg.out) / name
            written[str(folder)] = write_shards(recs, folder, cfg.shard_size, cfg.progress,
                                                desc=f"{name or 'all'}: {len(recs)} images")
    return written


USAGE = "usage: python -m clip_foundation.shards SRC OUT [--shard_size=1000] [--split=true] [--layout=auto] ..."


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Command line: python -m clip_foundation.shards SRC OUT --shard_size 1000"""
    from clip_foundation.common.cli import parse
    cfg = parse(ShardsConfig(), argv, USAGE, positional=("src", "out"))
    if not cfg.src or not cfg.out:
        sys.exit(f"error: SRC and OUT are required\n{USAGE}")
    try:
        written = convert(cfg)
    except (DataError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    for folder, index in written.items():
        print(f"{folder}: {index['samples']} samples in {len(index['shards'])} shards")
    return written


if __name__ == "__main__":
    main()


def extract(urls: list[str], cache_root: str | Path) -> list[Record]:
    """An evaluation shard set -> records of image files, extracted once into
    CACHE_ROOT/<hash of the shard names, sizes and mtimes>/ (evaluation and the run's
    matches.png read image files). Bad samples (as in training: stream.check_sample) are
    skipped and counted in one warning."""
    wds = optional("webdataset", "shards", "WebDataset shards")
    h = hashlib.sha256()
    for u in urls:
        stamp = os.stat(u) if Path(u).is_file() else None
        h.update(f"{u}\0{stamp and (stamp.st_size, stamp.st_mtime_ns)}\n".encode())
    folder = Path(cache_root) / h.hexdigest()[:20]
    listing = folder / "records.json"
    if not listing.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rows, counter = [], SampleCounter()
        for url in urls:
            for sample in wds.tarfile_samples([{"url": url}], handler=counter.handler()):
                try:  # decoded here, so a bad image is named by shard and key, not by its cache file
                    ext, captions, _ = check_sample(sample)
                except ValueError as e:
                    counter.skip(*e.args)
                    continue
                name = f"{len(rows):09d}.{ext}"
                (folder / name).write_bytes(sample[ext])
                rows.append({"image": name, "captions": captions})
        if counter.counts:
            warnings.warn(f"extracting {len(urls)} evaluation shards skipped " + ", ".join(
                f"{n} {k}" for k, n in counter.counts.items()) + f" (first: {'; '.join(counter.first.values())})",
                DataWarning)
        tmp = listing.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(rows))
        tmp.rename(listing)  # last: a killed extraction is redone
    return [Record(image=folder / row["image"], captions=row["captions"]) for row in json.loads(listing.read_text())]


def streamed_splits(cfg: DataConfig, streaming) -> dict[str, list[Record]]:
    """A streamed run's splits: "train" holds a caption sample (the first shards' captions, up
    to 10,000 samples, for a scratch tokenizer); val/test are `streaming.val_data` / `.test_data`
    (a training.streaming.StreamConfig), dataset folders or shard sets (extracted once under `cfg.cache_dir`)."""
    wds = optional("webdataset", "shards", "WebDataset shards")
    if not (streaming.val_data or streaming.test_data):
        raise DataError("streaming from shards needs --val_data or --test_data (a dataset folder or shard set) "
                        "to pick and score the model")
    train, counter = [], SampleCounter()
    for url in shard_urls(cfg.path):
        for sample in wds.tarfile_samples([{"url": url}], handler=counter.handler()):
            with contextlib.suppress(ValueError):  # no caption: counted when streamed
                train.append(Record(image=Path(f"{url}#{sample['__key__']}"), captions=decode_captions(sample)))
        if len(train) >= 10_000:
            break
    splits = {"train": train}
    for split, source in (("val", streaming.val_data), ("test", streaming.test_data)):
        if not source:
            splits[split] = []
        elif source_of(source).streams:
            splits[split] = extract(shard_urls(source), Path(cfg.cache_dir or "data/cache") / "shards")
        else:
            splits[split] = load_all(DataConfig(path=source, skip_bad=cfg.skip_bad))
    return splits
