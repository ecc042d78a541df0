"""Embed a gallery of any size, on one process or many, into clip-retrieval's layout (autofaiss reads it).

    python -m clip_foundation.embed --checkpoint=runs/NAME --data=PHOTOS --out=EMB
    python -m clip_foundation.embed --checkpoint=runs/NAME --data="shards/{00000..09999}.tar" --out=EMB
    torchrun --nnodes=8 --nproc_per_node=8 ... -m clip_foundation.embed --checkpoint=... --data=... --out=EMB

--data is a dataset folder (any layout the readers read, every split), a plain folder of images, or
WebDataset shards (a brace pattern, a folder of .tar files, a list file, URLs, `pipe:` commands).
The input is cut into fixed parts: a list of images into parts of --rows_per_shard images
(part i = images [i*N, (i+1)*N) in reading order), shards into one part per input shard. Rank r of
W embeds the parts i with i % W == r, so the files are the same whatever W is, and ranks never
talk to each other (no process group: a rank that finishes early just exits; ranks may even be
separate jobs that set RANK and WORLD_SIZE). OUT must be one folder every rank sees.

Each part is written whole or not at all, with a record of the model and inputs it was made from
(see embed/format.py); a rerun skips the parts whose record vouches for them and redoes the rest
(parts cut short, left by another run, or whose images changed since), so a killed run is resumed
by running the same command again. A shard that cannot be read to the end (a failed download, a
truncated file) leaves its part unwritten, for a rerun to try again. The run that finds every part
written marks EMB/embed.json complete, with the total rows, what was skipped (images that cannot be
decoded and, in shards, samples without an image are left out of both files and counted by kind)
and every part's record. OUT holding another model's or another input list's embedding is refused.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from clipModel import CLIPModel, check, model_folder, resize_crop

from clip_foundation.common import cli
from clip_foundation.embed import format as fmt
from clip_foundation.engines.options import ModelOptions, checked_device
from clip_foundation.engines.registry import encoder_of, use_engine
from clip_foundation.common.extras import optional
from clip_foundation.data.splits import gallery_records
from clip_foundation.common.files import folder_to_write
from clip_foundation.common.files import gallery_digest, model_digest
from clip_foundation.common.modes import eval_mode
from clip_foundation.data.records import DataError, open_rgb
from clip_foundation.data.stream import IMAGE_EXTS, REMOTE, SampleCounter, decode_captions, is_shards, shard_urls


class UnreadPart(DataError):
    """A part whose source could not be read to the end: it is not written, a rerun tries again."""


@dataclass
class EmbedConfig(ModelOptions):  # --checkpoint, --device, --engine
    data: str = ""  # dataset folder (any layout, all splits), folder of images, or WebDataset shards (pattern, folder, list, URL, pipe:)
    out: str = ""  # the embedding folder (img_emb/, metadata/, embed.json); an unfinished one is resumed
    layout: str = "auto"  # dataset layout of --data; images = a plain image folder
    rows_per_shard: int = 10_000  # images per output part for dataset and image folders (shards: one part per input shard)
    batch_size: int = 256  # images decoded ahead and embedded together (a CPU engine encodes 32 at a time)
    workers: int = 0  # image decoding threads; 0 = this process's share of the machine's cores
    threads: int = 0  # threads of the encoding engine; 0 = torch's default (torchrun sets 1 per rank)
    progress: bool = True  # progress bar with images/s (rank 0's)

    def validate(self) -> None:
        """Raise ConfigError (one line: the option, its value, the allowed range) for a value out of range."""
        check(self.rows_per_shard >= 1, "rows_per_shard", self.rows_per_shard, ">= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.workers >= 0, "workers", self.workers, ">= 0 (0 = this process's share of the cores)")
        check(self.threads >= 0, "threads", self.threads, ">= 0 (0 = torch's default)")
        super().validate()


USAGE = ("usage: python -m clip_foundation.embed --checkpoint=RUN --data=SRC --out=EMB "
         "[--rows_per_shard=10000] [--batch_size=256] [--engine=auto]  (or under torchrun: each GPU rank on cuda:LOCAL_RANK)")


# ---------------------------------------------------------------- inputs cut into parts

class RecordParts:
    """A list of records (a dataset's or an image folder's) cut into parts of `rows` records.
    `items(part, counter)` -> (metadata row, where, load) per image, `load()` giving a PIL image."""

    def __init__(self, records, rows: int, root):
        self.records, self.rows, self.root = records, rows, Path(root).resolve()
        self.rows_per_shard = rows

    def __len__(self) -> int:
        return -(-len(self.records) // self.rows)

    def digest(self) -> str:
        return _digest(str(r.image) for r in self.records)

    def source(self, part: int) -> str:
        """What part `part` is made from as it is now: its images' names, sizes and mtimes."""
        return gallery_digest([str(r.image) for r in self.records[part * self.rows:(part + 1) * self.rows]])

    def size(self, part: int) -> int:
        return len(self.records[part * self.rows:(part + 1) * self.rows])

    def items(self, part: int, counter: SampleCounter):
        for rec in self.records[part * self.rows:(part + 1) * self.rows]:
            path = Path(rec.image)
            key = os.path.relpath(path, self.root) if path.is_relative_to(self.root) else str(path)
            row = {"image_path": str(path), "caption": rec.captions[0] if rec.captions else "", "key": key}
            yield row, str(path), partial(open_rgb, path)


class ShardParts:
    """WebDataset shards, one part per shard. A row's image_path is the sample's source (its json
    "url", as img2dataset writes, or "source", as shards.py writes), else SHARD#KEY; its key is
    SHARD-NAME/KEY (the shard's file name, or its position when two shards share a name)."""
    rows_per_shard = None  # parts follow the input shards: their sizes vary

    def __init__(self, urls: list[str]):
        self.urls = urls
        names = [Path(u).name.split(".")[0] for u in urls]  # pipe:curl -s https://host/00012.tar -> 00012
        self.labels = names if len(set(names)) == len(names) else [f"{i:06d}" for i in range(len(urls))]

    def __len__(self) -> int:
        return len(self.urls)

    def digest(self) -> str:
        return _digest(self.urls)

    def source(self, part: int) -> str:
        """What part `part` is made from as it is now: a local shard's name, size and mtime (a
        URL's or a command's name alone)."""
        url = self.urls[part]
        return _digest([url]) if url.startswith(REMOTE) else gallery_digest([url])

    def size(self, part: int) -> None:
        return None  # known once read

    def items(self, part: int, counter: SampleCounter):
        wds = optional("webdataset", "shards", "embedding WebDataset shards")
        url = self.urls[part]
        for sample in wds.tarfile_samples([{"url": url}], handler=counter.handler()):
            where = f"{url}:{sample['__key__']}"
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                counter.skip("no image", f"{where}: no image member ({', '.join(IMAGE_EXTS)})")
                continue
            try:
                caption = decode_captions(sample)[0]
            except ValueError:  # a gallery image needs no caption
                caption = ""
            row = {"image_path": _source(sample) or f"{url}#{sample['__key__']}", "caption": caption,
                   "key": f"{self.labels[part]}/{sample['__key__']}"}
            yield row, f"{where}.{ext}", partial(open_rgb, io.BytesIO(sample[ext]))
        if "unreadable shard" in counter.counts:  # what followed the error in the shard is lost
            raise UnreadPart(f"{url}: not read to the end ({counter.first['unreadable shard']}), so its part "
                             f"{part} is not written: run the same command again to retry it")


def _source(sample: dict) -> str:
    try:
        meta = json.loads(sample.get("json", b"{}"))
        return str(meta.get("url") or meta.get("source") or "")
    except (ValueError, AttributeError):
        return ""


def _digest(names) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def input_parts(cfg: EmbedConfig):
    """--data as parts: ShardParts for WebDataset shards, RecordParts for anything the readers read."""
    if is_shards(cfg.data):
        return ShardParts(shard_urls(cfg.data))
    records = gallery_records(cfg.checkpoint, cfg.data, "all", cfg.layout)
    if not records:
        raise DataError(f"{cfg.data}: no images to embed")
    root = cfg.data if Path(cfg.data).is_dir() else Path(cfg.data).parent
    return RecordParts(records, cfg.rows_per_shard, root)


def parts_of_rank(parts: int, rank: int, world: int) -> list[int]:
    """The parts rank `rank` of `world` embeds: i % world == rank."""
    return list(range(rank, parts, world))


# ---------------------------------------------------------------- embedding one part

def _decode(load, resize, where: str):
    """(3, S, S) uint8, or the one-line reason the image is skipped."""
    try:
        return resize(load())
    except DataError as e:
        return f"{where}: {str(e).split(': ', 1)[-1]}"


def decoded_batches(items, pool: ThreadPoolExecutor, resize, batch_size: int, counter: SampleCounter):
    """`items` decoded on `pool`, one batch ahead of the caller -> (images (b, 3, S, S) uint8, their
    rows, items read); undecodable images are counted in `counter` and left out."""
    def submit(chunk):
        return [(row, pool.submit(_decode, load, resize, where)) for row, where, load in chunk]

    def collect(pending):
        images, rows = [], []
        for row, future in pending:
            image = future.result()
            if isinstance(image, str):
                counter.skip("undecodable image", image)
            else:
                images.append(image)
                rows.append(row)
        return images, rows, len(pending)

    items, ahead = iter(items), None
    while chunk := list(itertools.islice(items, batch_size)):
        pending = submit(chunk)
        if ahead is not None:
            yield collect(ahead)
        ahead = pending
    if ahead is not None:
        yield collect(ahead)


def embed_part(model: CLIPModel, parts, part: int, pool: ThreadPoolExecutor, batch_size: int, bar):
    """Part `part` of `parts` -> (embeddings float16 (n, D), metadata rows, {"counts", "first"} skipped)."""
    counter, encoder = SampleCounter(), encoder_of(model)
    resize = resize_crop(model.config.image.image_size)
    out = [np.zeros((0, model.config.projection_dim), np.float16)]
    rows = []
    for images, batch_rows, read in decoded_batches(parts.items(part, counter), pool, resize, batch_size, counter):
        if images:
            embedded = encoder.encode_images(torch.stack(images), batch_size)  # (b, D), normalised
            out.append(embedded.half().cpu().numpy())
            rows += batch_rows
        bar.update(read)
    return np.concatenate(out), rows, {"counts": counter.counts, "first": counter.first}


# ---------------------------------------------------------------- the folder

def start(out: Path, info: dict, changing: bool) -> dict:
    """OUT's embed.json for this model and input: written when new, checked when resuming
    (another model's or another input list's embedding is refused), and marked incomplete again
    when parts are `changing` (images changed since, or parts not vouched for)."""
    old = fmt.read_info(out)
    for key, what in (("version", "format version"), ("model", "model (weights)"), ("inputs", "input"),
                      ("shards", "number of parts"), ("rows_per_shard", "--rows_per_shard")):
        if old is not None and old.get(key) != info[key]:
            raise DataError(f"{out}: holds embeddings of another {what} ({old.get(key)!r}, now "
                            f"{info[key]!r}): give a new --out folder, or the options of that run")
    if old is None or (changing and old.get("complete")):
        fmt.write_info(out, info)
        return info
    return old


def finish(out: Path, info: dict, made_from) -> dict:
    """embed.json marked complete, with the total rows and skips and every part's record, once
    every part is written from this model and its inputs as they are (`made_from(part)`)."""
    if not all(fmt.is_done(out, p, made_from(p), verify=False) for p in range(info["shards"])):
        return info  # the digests were checked by the rank that wrote or kept each part
    rows, counts, first = 0, {}, {}
    for p in range(info["shards"]):
        n, skipped = fmt.part_summary(out, p)
        rows += n
        for kind, k in skipped["counts"].items():
            counts[kind] = counts.get(kind, 0) + k
        for kind, message in skipped["first"].items():
            first.setdefault(kind, message)
    info = {**info, "complete": True, "rows": rows, "skipped": counts, "skipped_total": sum(counts.values()),
            "first_skipped": first, "parts": [fmt.read_record(out, p) for p in range(info["shards"])]}
    fmt.write_info(out, info)
    return info


def rank_and_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) on a plain run."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def embed(cfg: EmbedConfig, device: torch.device) -> dict:
    """Embed this rank's unfinished parts of --data into --out -> embed.json's contents as left."""
    from tqdm.auto import tqdm
    cfg = replace(cfg, checkpoint=str(model_folder(cfg.checkpoint)))  # a Hub id: its snapshot in the Hub cache
    rank, world, local = rank_and_world()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    out = folder_to_write(cfg.out, "out")
    fmt.parquet()  # a missing pyarrow stops the run here, before the model loads
    parts = input_parts(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # the graph engines take torch's count too
    model = CLIPModel.from_pretrained(cfg.checkpoint, device=device)
    use_engine(model, cfg.engine, cfg.checkpoint)
    model_id = model_digest(cfg.checkpoint)

    def made_from(part: int) -> dict:  # what a part's record must say for the part to be kept
        return {"version": fmt.VERSION, "model": model_id, "source": parts.source(part)}

    todo = [p for p in parts_of_rank(len(parts), rank, world) if not fmt.is_done(out, p, made_from(p))]
    info = start(out, {"version": fmt.VERSION, "dim": model.config.projection_dim,
                       "checkpoint": str(Path(cfg.checkpoint).resolve()), "model": model_id,
                       "shards": len(parts), "rows_per_shard": parts.rows_per_shard, "complete": False,
                       "data": cfg.data, "inputs": parts.digest()}, changing=bool(todo))
    sizes = [parts.size(p) for p in todo]
    total = None if None in sizes else sum(sizes)
    workers = cfg.workers or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    with ThreadPoolExecutor(workers) as pool, eval_mode(model), torch.no_grad(), \
            tqdm(total=total, unit="img", desc=f"embedding {len(todo)} parts", leave=False,
                 disable=not cfg.progress or rank != 0) as bar:
        unread = []
        for part in todo:
            try:
                embeddings, rows, skipped = embed_part(model, parts, part, pool, cfg.batch_size, bar)
            except UnreadPart as e:  # the other parts are still worth writing
                unread.append(str(e))
                continue
            fmt.write_part(out, part, embeddings, rows, skipped, made_from(part))
    if unread:
        raise UnreadPart(unread[0] + (f" (and {len(unread) - 1} more parts)" if len(unread) > 1 else ""))
    return finish(out, info, made_from)


def main(argv=None) -> dict:
    """Command line: python -m clip_foundation.embed --checkpoint=RUN --data=SRC --out=EMB"""
    cfg = cli.parse(EmbedConfig(), argv, USAGE)
    if not (cfg.checkpoint and cfg.data and cfg.out):
        cli.usage_error("--checkpoint, --data and --out are required", USAGE)
    device = checked_device(cfg, USAGE)
    rank = rank_and_world()[0]
    try:
        info = embed(cfg, device)
    except (ImportError, DataError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if info["complete"]:
        skipped = ", ".join(f"{n} {k}" for k, n in sorted(info["skipped"].items())) or "none"
        print(f"{cfg.out}: {info['rows']} rows x {info['dim']} (float16) in {info['shards']} parts; "
              f"skipped: {skipped}")
    elif rank == 0:
        done = sum(fmt.is_done(cfg.out, p, verify=False) for p in range(info["shards"]))
        print(f"{cfg.out}: {done} of {info['shards']} parts written; the other ranks are still embedding "
              "(or were stopped: run the same command again to finish)")
    return info


if __name__ == "__main__":
    from clip_foundation.commands import run
    raise SystemExit(run("embed", main))  # this module's main, not a second copy of it
