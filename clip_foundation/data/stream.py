"""Training data streamed from WebDataset tar shards: no decoded cache, any dataset size.

The global batch draws equally from `streams` independent shard streams (default: one per
DataLoader worker of every rank). Pass p of the data orders the shards by a permutation
seeded by (seed, p); stream s reads shards s, s+S, s+2S, ... of that order, shuffles their
samples in a buffer, decodes and resizes them (in a DataLoader worker) and hands out B/S
samples per step. Rank r of W owns streams r*S/W .. (r+1)*S/W - 1, so its share of the global
batch is contiguous (as the cached path's sampler) and the global batches depend on the seed
and S only, not on the number of nodes or workers: a one-process run with the same `streams`
sees exactly the batches of a multi-node run. Streams never end (pass p+1 follows pass p), so
no rank runs dry before another; an epoch is `train_samples` samples.

Resume: every piece a stream hands out carries its position (pass, index of the oldest shard
that still has samples in its shuffle buffer); checkpoints save the position of each stream's
last consumed piece, and a resumed stream restarts at that shard with a fresh buffer. So no
sample of the pass is skipped, and the only repeats are samples of that shard and the ones
after it that were trained on before the checkpoint (at most about shuffle_buffer + one
shard's worth per stream). Bad samples (undecodable image, no image, no caption, a truncated
shard, a caption that breaks the readers' rule) are skipped and counted, never fatal. A shard set
whose shards.json marks it unfinished, or disagrees with the .tar files beside it, is refused.
The training side (its options, `StreamConfig`, and inputs, `StreamInputs`) is training/streaming.py.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

from clipModel import resize_crop

from clip_foundation.common.extras import optional
from clip_foundation.data.records import DataError, Source, caption_fault, has_visible, open_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://")
SKIP_KINDS = ("undecodable image", "no image", "no caption", "not utf-8", "multi-line caption", "caption too long",
              "unreadable shard")
INDEX_FILE = "shards.json"  # the converter's, per shard set: {"complete", "shards": [{"name", "samples", "bytes"}], "samples"}


def is_shards(path: str) -> bool:
    """Whether --data names a shard set: a brace pattern, a .tar, a URL or pipe:, a folder of
    .tar files, or a list file (.txt whose lines name shards)."""
    p = str(path)
    if not p or p.startswith("hf:"):
        return False
    if p.startswith(REMOTE) or "::" in p or ("{" in p and ".." in p) or p.endswith(TAR_SUFFIXES):
        return True
    folder = Path(p)
    if folder.is_dir():
        return any(f.name.endswith(TAR_SUFFIXES) for f in folder.iterdir())
    return folder.suffix == ".txt" and folder.is_file() and bool(_list_file(folder))


def _list_file(path: Path) -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    urls = [ln for ln in lines if ln and not ln.startswith("#")]
    return urls if urls and all(u.startswith(REMOTE) or u.endswith(TAR_SUFFIXES) for u in urls) else []


# Shards are a dataset source too, detected before every other (training streams a folder of .tar files
# whatever else it holds); `streams` tells callers to stream them, as nothing reads them into records.
SHARDS = Source("shards", "WebDataset shards, streamed by training: a folder of *.tar, a .tar, a {000..009} "
                "pattern, a list file (.txt of shards), a URL or pipe:", is_shards, streams=True)


def shard_urls(source: str) -> list[str]:
    """The shards `source` names (pattern, folder, list file or URL); a local shard that does
    not exist is one DataError naming it, before any training starts."""
    expand_urls = optional("webdataset.shardlists", "shards", "streaming from shards").expand_urls
    path = Path(source)
    if path.is_dir():
        urls = sorted(str(f) for f in path.iterdir() if f.name.endswith(TAR_SUFFIXES))
    elif path.suffix == ".txt" and path.is_file():
        urls = [u for line in _list_file(path) for u in expand_urls(line)]
    else:
        urls = expand_urls(source)
    if not urls:
        raise DataError(f"{source}: no shards found")
    missing = [u for u in urls if not u.startswith(REMOTE) and not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of the {len(urls)} shards)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: shard not found{more}, listed by --data={source}")
    for folder in _folders(urls):
        check_set(folder, [Path(u).name for u in urls if Path(u).parent == folder])
    return urls


def _folders(urls: list[str]) -> list[Path]:
    return sorted({Path(u).parent for u in urls if not u.startswith(REMOTE)})


def redo(folder: Path) -> str:
    """The fix for a broken converted set, as the end of an error line."""
    return f"convert it again (python -m clip_foundation.shards SRC {folder})"


def read_json(path: Path, fix: str) -> dict:
    """A JSON object file beside the shards; unreadable or invalid is one DataError naming it and `fix`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e}): {fix}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path}: not valid JSON ({e}): {fix}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a JSON object: {fix}")
    return data


def read_index(folder: Path) -> dict[str, dict] | None:
    """The converter's shards.json in `folder` -> {shard name: {"samples", "bytes"}}; None
    when there is none. Unreadable, malformed or marked unfinished is a DataError naming it."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    index = read_json(path, redo(folder))
    if index.get("complete") is False:  # written first, before any shard is replaced
        raise DataError(f"{folder}: its conversion did not finish ({INDEX_FILE} marks the set incomplete): "
                        + redo(folder))
    try:
        return {s["name"]: {"samples": int(s["samples"]), "bytes": s.get("bytes")} for s in index["shards"]}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: not a shard index (a list of shards with names and sample counts): "
                        + redo(folder)) from None


def check_set(folder: Path, names: list[str]):
    """A converted set must be whole: its shards.json lists each shard read from `folder`
    (`names`), and every shard it lists is there with the size it was written with."""
    listed = read_index(folder)
    if listed is None:
        return  # not the converter's (img2dataset, hand-made): nothing to check against
    path = folder / INDEX_FILE
    for name in names:
        if name not in listed:
            raise DataError(f"{path}: does not list {name}, which is beside it: " + redo(folder))
    for name, entry in listed.items():
        if not (folder / name).is_file():
            raise DataError(f"{path}: lists {name}, which is missing: " + redo(folder))
        if entry["bytes"] is not None and entry["bytes"] != (size := (folder / name).stat().st_size):
            raise DataError(f"{path}: lists {name} with {entry['bytes']} bytes, but it has {size}: " + redo(folder))


def count_samples(urls: list[str]) -> int | None:
    """Samples in the shard set from the converter's shards.json or img2dataset's *_stats.json
    beside local shards; None when unknown (then --train_samples must say)."""
    total = 0
    for folder in _folders(urls):
        sizes = {name: entry["samples"] for name, entry in (read_index(folder) or {}).items()}
        if not sizes:
            for stats in folder.glob("*_stats.json"):
                successes = read_json(stats, "remove it, or pass --train_samples=N").get("successes", 0)
                sizes[stats.name.replace("_stats.json", ".tar")] = successes
        for u in urls:
            if Path(u).parent == folder:
                if Path(u).name not in sizes:
                    return None
                total += sizes[Path(u).name]
    return total if total and not any(u.startswith(REMOTE) for u in urls) else None


def stream_shards(urls: list[str], streams: int, stream: int, seed: int, pass_: int) -> list[str]:
    """The shards stream `stream` of `streams` reads in pass `pass_`, in reading order."""
    order = random.Random(f"shards/{seed}/{pass_}").sample(range(len(urls)), len(urls))
    return [urls[i] for i in order[stream::streams]]


class SampleCounter:
    """Counts of skipped samples by kind, with the first message of each kind."""

    def __init__(self):
        self.counts, self.first = {}, {}

    def skip(self, kind: str, message: str):
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first.setdefault(kind, message)

    def handler(self):
        """A webdataset error handler for reading one shard: its first error counts one
        unreadable shard (what follows in that file is lost) and reading goes on."""
        seen = []

        def handle(exn: Exception) -> bool:
            if not seen:
                self.skip("unreadable shard", f"{exn.args[-1] if exn.args else ''}: {exn.args[0] if exn.args else exn}")
            seen.append(exn)
            return True
        return handle


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def decode_captions(sample: dict) -> list[str]:
    """A raw sample's captions: the converter's json "captions", an img2dataset json
    "caption", else its .txt. ValueError(kind, message) when there are none, the .txt is not
    UTF-8, or one breaks the readers' caption rule (records.caption_fault)."""
    captions = []
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            captions = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
        except (ValueError, AttributeError):
            pass
    if not captions and "txt" in sample:
        try:
            captions = [sample["txt"].decode("utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError("not utf-8", f"{_where(sample)}.txt: bytes that are not UTF-8: "
                                          f"{e.object[e.start:e.end]!r}") from None
    captions = [c.strip() for c in captions if isinstance(c, str) and has_visible(c)]
    if not captions:
        raise ValueError("no caption", f"{_where(sample)}: no caption (.txt or .json)")
    for caption in captions:
        if fault := caption_fault(caption):
            raise ValueError(fault[0], f"{_where(sample)}: {fault[1]}")
    return captions


def check_sample(sample: dict):
    """A raw sample -> (its image member's extension, its captions, its image decoded as RGB);
    ValueError(kind, message naming shard:key) for a sample to skip."""
    captions = decode_captions(sample)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError("no image", f"{_where(sample)}: no image member ({', '.join(IMAGE_EXTS)})")
    try:
        image = open_rgb(io.BytesIO(sample[ext]))
    except DataError as e:
        raise ValueError("undecodable image", f"{_where(sample)}.{ext}: {str(e).split(': ', 1)[-1]}") from None
    return ext, captions, image


def decode_sample(sample: dict, image_size: int | object, rng: random.Random) -> tuple[torch.Tensor, str]:
    """A raw webdataset sample -> (image (3, S, S) uint8, one of its captions); ValueError(kind,
    message) for a sample to skip. The decode and resize are the cached path's (open_rgb, resize_crop)."""
    _, captions, image = check_sample(sample)
    resize = resize_crop(image_size) if isinstance(image_size, int) else image_size  # or a built resize_crop
    return resize(image), rng.choice(captions)


def read_stream(urls, streams: int, stream: int, seed: int, image_size: int, buffer: int,
                start: tuple[int, int], counter: SampleCounter):
    """Stream `stream`'s samples forever from position `start` = (pass, shard) ->
    (image, caption, (pass, shard url), position (pass, shard) of the oldest shard still needed)."""
    wds = optional("webdataset", "shards", "streaming from shards")
    rng = random.Random(f"buffer/{seed}/{stream}/{start[0]}/{start[1]}")
    held = []  # the shuffle buffer: (pass, shard index, raw sample)
    in_buffer = {}  # (pass, shard index) -> its samples in the buffer

    def raw():
        pass_, k = start
        while True:
            shards = stream_shards(urls, streams, stream, seed, pass_)
            for k in range(k, len(shards)):
                for sample in wds.tarfile_samples([{"url": shards[k]}], handler=counter.handler()):
                    yield pass_, k, sample
            pass_, k = pass_ + 1, 0
            yield pass_, 0, None  # the pass is over: the buffer drains, so a pass holds each sample once

    resize = resize_crop(image_size)
    reading = start  # where the next sample will be read from

    def emit(i: int):  # hand out held[i], unless it is a bad sample (then counted)
        held[i], held[-1] = held[-1], held[i]
        pass_, k, sample = held.pop()
        in_buffer[pass_, k] -= 1
        if not in_buffer[pass_, k]:
            del in_buffer[pass_, k]
        try:
            image, caption = decode_sample(sample, resize, rng)
        except ValueError as e:
            counter.skip(*e.args)
            return
        yield image, caption, (pass_, sample["__url__"]), min([*in_buffer, reading])  # where a resume restarts

    for pass_, k, sample in raw():
        reading = (pass_, k)
        if sample is None:
            while held:
                yield from emit(rng.randrange(len(held)))
            continue
        held.append((pass_, k, sample))
        in_buffer[reading] = in_buffer.get(reading, 0) + 1
        if len(held) >= buffer:
            yield from emit(rng.randrange(len(held)))


class ShardStreams(torch.utils.data.IterableDataset):
    """The pieces of one rank's share: each DataLoader worker runs some of the rank's streams
    and yields, in stream order, one piece of `per_stream` samples per stream per step."""

    def __init__(self, urls, streams: int, owned: list[int], per_stream: int, image_size: int,
                 seed: int, buffer: int, positions: dict[int, tuple[int, int]]):
        super().__init__()
        self.urls, self.streams, self.owned, self.per_stream = urls, streams, owned, per_stream
        self.image_size, self.seed, self.buffer, self.positions = image_size, seed, buffer, positions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.owned[info.id::info.num_workers] if info else self.owned
        counters = {s: SampleCounter() for s in mine}
        readers = {s: read_stream(self.urls, self.streams, s, self.seed, self.image_size, self.buffer,
                                  tuple(self.positions.get(s, (0, 0))), counters[s]) for s in mine}
        while True:
            for s in mine:
                items = [next(readers[s]) for _ in range(self.per_stream)]
                yield {"stream": s, "images": torch.stack([it[0] for it in items]),  # (n, 3, S, S) uint8
                       "captions": [it[1] for it in items], "read": sorted({it[2] for it in items}),
                       "position": list(items[-1][3]), "skipped": dict(counters[s].counts),
                       "first": dict(counters[s].first)}
