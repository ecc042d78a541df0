"""Decoded-image cache: decode and resize each image once, reuse it across epochs and runs.

`load_images` decodes every record's image with `readers.open_rgb`, resizes and center-crops
it to the encoder's input side (`prepare_transform`, the one definition of that step) and
returns a uint8 (M, 3, S, S) tensor. With a `cache_dir` the result is stored on disk as

    <cache_dir>/<key>.u8    raw uint8 rows, C order, shape (M, 3, S, S)
    <cache_dir>/<key>.json  index: version, image_size, shape, paths, kept, bad

where `key` hashes the image paths, each file's size and mtime_ns, the image size and
CACHE_VERSION, so any change to the images or the size names a different cache (rebuilt),
and a later call memory-maps the rows instead of decoding. Both files are written to
temporary names and renamed into place, the index last: a killed build is never used.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from readers import DataError, DataWarning, Record, open_rgb

CACHE_VERSION = 1  # bump when the decode/resize method changes: old caches then go unused


def prepare_transform(image_size: int):
    """PIL RGB image -> uint8 (3, S, S): resize the short side to S, then center-crop S×S.

    The same steps open `clipModel.image_transform`, which leaves an S×S image unchanged,
    so cached images give exactly the tensors of the direct path. No `Image.draft`: it
    would change pixels."""
    from torchvision.transforms import v2
    return v2.Compose([v2.ToImage(), v2.Resize(image_size, antialias=True),
                       v2.CenterCrop(image_size)])


def cache_key(records: list[Record], image_size: int) -> str:
    """Hash of (paths, file sizes, mtimes, image_size, CACHE_VERSION): the cache's file name."""
    h = hashlib.sha256(f"clip-image-cache v{CACHE_VERSION} size {image_size}\n".encode())
    for rec in records:
        try:
            st = os.stat(rec.image)
            stamp = f"{st.st_size} {st.st_mtime_ns}"
        except OSError:
            stamp = "missing"  # reported when decoding; a file appearing later changes the key
        h.update(f"{rec.image}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def load_images(records: list[Record], image_size: int, cache_dir: str | Path | None = None,
                skip_bad: bool = False, progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """-> (images (M, 3, S, S) uint8, kept) where kept lists the indices of records whose image
    decoded (M == len(kept)); without skip_bad, M == len(records) or a DataError names the file.

    `cache_dir=None` decodes into memory. With a `cache_dir`, the first call builds
    `<key>.u8` + `<key>.json` there and later calls with the same images and size return a
    copy-on-write memory map of it (read lazily; writes to it never reach the file).
    With `skip_bad`, images that fail to decode are left out with one DataWarning."""
    paths = [str(r.image) for r in records]
    S = image_size
    if not records:
        return torch.empty(0, 3, S, S, dtype=torch.uint8), []
    if cache_dir is None:
        out = torch.empty(len(paths), 3, S, S, dtype=torch.uint8)
        bad = _decode_all(paths, out, S, skip_bad, f"decoding {len(paths)} images", progress)
        kept = [i for i in range(len(paths)) if i not in bad]
        images = out[kept] if bad else out
    else:
        cache_dir = Path(cache_dir)
        key = cache_key(records, S)
        data_file, index_file = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
        opened = _open_cache(data_file, index_file, paths, S)
        if opened is None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _build_cache(data_file, index_file, paths, S, skip_bad, progress)
            opened = _open_cache(data_file, index_file, paths, S)
            if opened is None:
                raise RuntimeError(f"{index_file}: image cache unreadable right after building it")
        images, kept, bad = opened
        if bad and not skip_bad:  # built earlier with skip_bad: this call wants every image
            raise DataError(next(iter(bad.values())))
    if bad:
        warnings.warn(f"skipped {len(bad)} images that could not be decoded "
                      f"(first: {next(iter(bad.values()))})", DataWarning, stacklevel=2)
    return images, kept


def _decode_all(paths: list[str], out: torch.Tensor, image_size: int, skip_bad: bool,
                desc: str, progress: bool) -> dict[int, str]:
    # Decode paths[i] into out[i] on a thread pool (PIL and torch release the GIL).
    # -> {index: error} of images that failed, by index; without skip_bad the first raises.
    from tqdm.auto import tqdm
    prepare = prepare_transform(image_size)

    def work(i: int) -> str | None:
        try:
            out[i] = prepare(open_rgb(paths[i]))  # (3, S, S) uint8
        except DataError as e:
            return str(e)
        return None

    bad = {}
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    try:
        futures = {pool.submit(work, i): i for i in range(len(paths))}
        with tqdm(total=len(paths), desc=desc, disable=not progress, leave=False) as bar:
            for future in as_completed(futures):
                bar.update()
                if (error := future.result()) is not None:
                    if not skip_bad:
                        raise DataError(error)
                    bad[futures[future]] = error
    finally:
        # Drop queued work and wait for running workers before `out` (maybe a memmap) goes.
        pool.shutdown(wait=True, cancel_futures=True)
    return dict(sorted(bad.items()))


def _build_cache(data_file: Path, index_file: Path, paths: list[str], image_size: int,
                 skip_bad: bool, progress: bool) -> None:
    S, N = image_size, len(paths)
    row = 3 * S * S
    tmp = data_file.with_name(f"{data_file.name}.tmp{os.getpid()}")
    tmp_index = index_file.with_name(f"{index_file.name}.tmp{os.getpid()}")
    try:
        mm = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(N, 3, S, S))
        out = torch.from_numpy(mm)  # (N, 3, S, S) view on the file: workers write rows in place
        bad = _decode_all(paths, out, S, skip_bad, f"decoding {N} images -> cache", progress)
        kept = [i for i in range(N) if i not in bad]
        for j, i in enumerate(kept):  # close the gaps left by bad images (i >= j: safe in place)
            if i != j:
                out[j] = out[i]
        mm.flush()
        del out, mm
        os.truncate(tmp, len(kept) * row)
        os.replace(tmp, data_file)
        index = {"version": CACHE_VERSION, "image_size": S, "shape": [len(kept), 3, S, S],
                 "kept": kept, "bad": [{"index": i, "error": e} for i, e in bad.items()],
                 "paths": paths}
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, index_file)  # last: only now is the cache complete
    finally:
        for f in (tmp, tmp_index):
            f.unlink(missing_ok=True)


def _open_cache(data_file: Path, index_file: Path, paths: list[str], image_size: int):
    # -> (images, kept, bad) from a complete, matching cache; None when it must be (re)built.
    try:
        index = json.loads(index_file.read_text())
        shape, kept = index["shape"], index["kept"]
        bad = {int(b["index"]): b["error"] for b in index["bad"]}
        if (index["version"] != CACHE_VERSION or index["paths"] != paths
                or shape != [len(kept), 3, image_size, image_size]):
            return None
        numel = math.prod(shape)
        if data_file.stat().st_size != numel:  # truncated or overwritten: rebuild
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if numel == 0:
        return torch.empty(shape, dtype=torch.uint8), kept, bad
    # shared=False maps the file copy-on-write: pages load on first touch, writes stay private.
    images = torch.from_file(str(data_file), shared=False, size=numel, dtype=torch.uint8)
    return images.view(shape), kept, bad
