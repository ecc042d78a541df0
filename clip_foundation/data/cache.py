"""Decoded-image cache: decode and resize each image once, reuse it across epochs and runs.

`load_images` decodes every record's image with `readers.open_rgb`, resizes and center-crops
it to the encoder's input side (`clipModel.resize_crop`, the one definition of that step) and
returns a uint8 (M, 3, S, S) tensor. With a `cache_dir` the result is stored on disk as

    <cache_dir>/<key>.u8    raw uint8 rows, C order, shape (M, 3, S, S)
    <cache_dir>/<key>.json  index: version, image_size, shape, paths, kept, bad

where `key` hashes the image paths, each file's size and mtime_ns, the image size and
CACHE_VERSION, so any change to the images or the size names a different cache (rebuilt),
and a later call memory-maps the rows instead of decoding. Both files are written to
temporary names (`<name>.tmp<pid>`) and renamed into place, the index last: a killed build is
never used, and the next build removes the temporary files of processes that no longer run
(a live process's are kept: it may be building the same cache right now).

A full disk is an error, never a crash: before building, a `CacheSpaceError` (an OSError)
says how much space the cache needs and how much is free if the rows, the index and a margin
do not fit; and since the rows are written with ordinary file writes, a disk that fills up
during the build raises the same error and the temporary file is removed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from clipModel import resize_crop

from clip_foundation.data.records import DataError, DataWarning, Record, SkippableError, open_rgb

CACHE_VERSION = 1  # bump when the decode/resize method changes: old caches then go unused
SPACE_MARGIN = 100 * 2**20  # bytes left free beyond the cache, for the logs and checkpoints of the run
_TEMP_FILE = re.compile(r"[0-9a-f]{24}\.(u8|json)\.tmp([1-9][0-9]{0,8})")  # ours, with the writer's pid


class CacheSpaceError(OSError):
    """Not enough disk space for the decoded-image cache; the message says what to do."""


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
        bad = _decode_all(paths, out.__setitem__, S, skip_bad, f"decoding {len(paths)} images", progress)
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
            raise SkippableError(next(iter(bad.values())))
    if bad:
        warnings.warn(f"skipped {len(bad)} images that could not be decoded "
                      f"(first: {next(iter(bad.values()))})", DataWarning, stacklevel=2)
    return images, kept


def _decode_all(paths: list[str], store, image_size: int, skip_bad: bool,
                desc: str, progress: bool) -> dict[int, str]:
    # Decode paths[i] and call store(i, (3, S, S) uint8) on a thread pool (PIL and torch
    # release the GIL). -> {index: error} of images that failed, by index; without skip_bad
    # the first raises, as does any error of `store` (e.g. a full disk).
    from tqdm.auto import tqdm
    resize = None  # resize_crop, built on first need

    def prepare(image):
        nonlocal resize
        if image.mode == "RGB" and image.size == (image_size, image_size):
            # already S x S: resize_crop's pixels (tested), without importing torchvision (~1 s of a short run)
            return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S)
        if resize is None:  # two threads may both build it: the same transform either way
            resize = resize_crop(image_size)
        return resize(image)

    def work(i: int) -> str | None:
        try:
            image = prepare(open_rgb(paths[i]))  # (3, S, S) uint8
        except DataError as e:
            return str(e)
        store(i, image)
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
                        raise SkippableError(error)
                    bad[futures[future]] = error
    finally:
        # Drop queued work and wait for running workers before the caller closes what they store to.
        pool.shutdown(wait=True, cancel_futures=True)
    return dict(sorted(bad.items()))


def _build_cache(data_file: Path, index_file: Path, paths: list[str], image_size: int,
                 skip_bad: bool, progress: bool) -> None:
    S, N = image_size, len(paths)
    row = 3 * S * S
    cache_dir = data_file.parent
    _remove_dead_temp_files(cache_dir)
    needed = N * row + sum(map(len, paths)) + SPACE_MARGIN  # rows + index (mostly paths) + margin
    free = shutil.disk_usage(cache_dir).free
    if free < needed:
        raise _no_space(cache_dir, needed, f"{_size(free)} free")
    tmp = data_file.with_name(f"{data_file.name}.tmp{os.getpid()}")
    tmp_index = index_file.with_name(f"{index_file.name}.tmp{os.getpid()}")
    try:
        # Rows go to the file with ordinary writes, not through np.memmap: a write to a memory
        # map that finds the disk full kills the process with SIGBUS, while write() raises
        # OSError ENOSPC on every filesystem. (posix_fallocate before mapping is missing on
        # macOS and Windows and reserves nothing on copy-on-write or network filesystems.)
        # Closing the file reports a write error deferred until then (NFS).
        with open(tmp, "w+b") as f:
            lock = threading.Lock()  # keeps each seek + write together; cheap next to decoding

            def store(i: int, image: torch.Tensor) -> None:
                pixels = image.contiguous().numpy()
                with lock:
                    f.seek(i * row)
                    f.write(pixels)

            bad = _decode_all(paths, store, S, skip_bad, f"decoding {N} images -> cache", progress)
            kept = [i for i in range(N) if i not in bad]
            for j, i in enumerate(kept):  # close the gaps left by bad images (i >= j: safe in place)
                if i != j:
                    f.seek(i * row)
                    pixels = f.read(row)
                    f.seek(j * row)
                    f.write(pixels)
            f.truncate(len(kept) * row)
        index = {"version": CACHE_VERSION, "image_size": S, "shape": [len(kept), 3, S, S],
                 "kept": kept, "bad": [{"index": i, "error": e} for i, e in bad.items()],
                 "paths": paths}
        tmp_index.write_text(json.dumps(index))  # before any rename: a full disk leaves nothing
        os.replace(tmp, data_file)
        os.replace(tmp_index, index_file)  # last: only now is the cache complete
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(cache_dir, needed, f"writing it failed: {e.strerror}") from e
        raise
    finally:
        for path in (tmp, tmp_index):
            path.unlink(missing_ok=True)


def _no_space(cache_dir: Path, needed: int, problem: str) -> CacheSpaceError:
    error = CacheSpaceError(
        f"{cache_dir}: not enough disk space for the decoded-image cache (it needs {_size(needed)}, "
        f"of which {_size(SPACE_MARGIN)} is a margin to leave free; {problem}). Free some space there, or pass --cache_dir=ELSEWHERE (a folder on another "
        f"disk), or --cache_dir= (empty) to decode the images in memory instead")
    error.errno = errno.ENOSPC  # for callers that test errno; str(error) stays the sentence above
    return error


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _remove_dead_temp_files(cache_dir: Path) -> None:
    # A killed build (kill -9, out of memory) leaves its `*.tmp<pid>` files, maybe as large as
    # the cache: remove those whose process is gone. Another running build keeps its own.
    for path in cache_dir.iterdir():
        match = _TEMP_FILE.fullmatch(path.name)
        if match and not process_alive(int(match[2])):
            path.unlink(missing_ok=True)  # another build may be removing it too


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (its temporary files are its own): the sweeps of killed writers ask."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows: keep the file
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        pass
    return True


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
