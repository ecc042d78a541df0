"""cache.py: cached == direct (bit-exact), reuse, rebuild on change, half-built caches, bad images,
a full disk, temporary files of killed builds."""
import errno
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_foundation.data import cache  # noqa: E402
from clip_foundation.data.cache import CacheSpaceError, cache_key, load_images  # noqa: E402
from clipModel import ImageEncoderConfig, image_transform  # noqa: E402
from clipModel import to_model_input  # noqa: E402
from clip_foundation.data.records import DataError, DataWarning, Record, open_rgb  # noqa: E402

S = 16
CFG = ImageEncoderConfig(kind="scratch", image_size=S, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))


def noise_image(path: Path, size=(37, 23), mode="RGB", seed=0) -> Path:
    # Random pixels, so any difference in resizing shows up.
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    im = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, "L" if channels == 1 else None)
    if mode == "CMYK":
        im = Image.frombytes("CMYK", size, pixels.tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def records_of(*paths) -> list[Record]:
    return [Record(Path(p).resolve(), ["a caption"]) for p in paths]


def some_images(folder: Path, n=3) -> list[Record]:
    return records_of(*(noise_image(folder / f"{i}.jpg", (30 + 7 * i, 20 + 5 * i), seed=i)
                        for i in range(n)))


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []

    def counting(path):
        calls.append(path)
        return open_rgb(path)
    monkeypatch.setattr(cache, "open_rgb", counting)
    return calls


def cache_files(folder: Path, suffix: str) -> list[Path]:
    return sorted(folder.glob(f"*{suffix}"))


# ---------------------------------------------------------------- cached == direct

FORMATS = [("a.jpg", (64, 48), "RGB"), ("b.png", (23, 71), "RGB"), ("c.jpg", (16, 16), "RGB"),
           ("d.png", (9, 5), "RGB"), ("e.png", (40, 33), "L"), ("f.jpg", (33, 40), "L"),
           ("g.png", (50, 20), "RGBA"), ("h.jpg", (25, 30), "CMYK")]


@pytest.mark.parametrize("use_cache", [False, True], ids=["memory", "cache"])
def test_cached_equals_direct(tmp_path, use_cache):
    recs = records_of(*(noise_image(tmp_path / "img" / n, size, mode, seed=i)
                        for i, (n, size, mode) in enumerate(FORMATS)))
    cache_dir = tmp_path / "cache" if use_cache else None
    for _ in range(2):  # build, then reuse
        images, kept = load_images(recs, S, cache_dir, progress=False)
        assert images.dtype == torch.uint8 and images.shape == (len(recs), 3, S, S)
        assert kept == list(range(len(recs)))
        for img, rec in zip(images, recs):
            direct = image_transform(CFG, train=False)(open_rgb(rec.image))  # (3, S, S) float
            assert torch.equal(image_transform(CFG, train=False)(img), direct)
            # clipModel.to_model_input divides by 255, ToDtype multiplies by 1/255: <= 1 ulp apart.
            torch.testing.assert_close(to_model_input(img[None], CFG.mean, CFG.std)[0], direct,
                                       rtol=0, atol=0)


def test_to_model_input_bit_exact(tmp_path):
    recs = some_images(tmp_path, 4)
    images, _ = load_images(recs, S, tmp_path / "cache", progress=False)
    direct = torch.stack([image_transform(CFG)(open_rgb(r.image)) for r in recs])
    assert torch.equal(to_model_input(images, CFG.mean, CFG.std), direct)


def test_memory_equals_cache(tmp_path):
    recs = some_images(tmp_path, 5)
    memory, _ = load_images(recs, S, None, progress=False)
    cached, _ = load_images(recs, S, tmp_path / "cache", progress=False)
    assert torch.equal(memory, cached)


def test_empty(tmp_path):
    images, kept = load_images([], S, tmp_path / "cache", progress=False)
    assert images.shape == (0, 3, S, S) and kept == []


# ---------------------------------------------------------------- reuse and rebuild

def test_second_call_reuses_cache(tmp_path, monkeypatch):
    recs = some_images(tmp_path)
    first, _ = load_images(recs, S, tmp_path / "cache", progress=False)
    assert len(cache_files(tmp_path / "cache", ".u8")) == 1

    def no_decoding(path):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(cache, "open_rgb", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. numpy's non-writable-array warning
        second, kept = load_images(recs, S, tmp_path / "cache", progress=False)
    assert torch.equal(first, second) and kept == [0, 1, 2]


def test_writes_to_cached_tensor_stay_private(tmp_path):
    recs = some_images(tmp_path)
    images, _ = load_images(recs, S, tmp_path / "cache", progress=False)
    expected = images.clone()
    images.fill_(0)  # copy-on-write map: the file keeps its pixels
    again, _ = load_images(recs, S, tmp_path / "cache", progress=False)
    assert torch.equal(again, expected)


def touch_later(path: Path):
    st = path.stat()  # a new mtime even on filesystems with coarse timestamps
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("change", ["rewrite", "image_size", "add", "remove"])
def test_rebuilt_when_inputs_change(tmp_path, count_decodes, change):
    recs = some_images(tmp_path / "img", 3)
    load_images(recs, S, tmp_path / "cache", progress=False)
    assert len(count_decodes) == 3
    size = S
    if change == "rewrite":
        noise_image(recs[1].image, (30, 20), seed=99)
        touch_later(recs[1].image)
    elif change == "image_size":
        size = S // 2
    elif change == "add":
        recs = recs + records_of(noise_image(tmp_path / "img" / "new.png", (12, 19), seed=7))
    else:
        recs = recs[:2]
    images, kept = load_images(recs, size, tmp_path / "cache", progress=False)
    assert len(count_decodes) == 3 + len(recs)  # every image decoded again
    assert images.shape == (len(recs), 3, size, size) and kept == list(range(len(recs)))
    memory, _ = load_images(recs, size, None, progress=False)
    assert torch.equal(images, memory)
    assert len(cache_files(tmp_path / "cache", ".json")) == 2  # old cache left in place


def test_key_depends_on_inputs(tmp_path):
    recs = some_images(tmp_path, 2)
    key = cache_key(recs, S)
    assert cache_key(recs, S) == key
    assert cache_key(recs, S + 1) != key
    assert cache_key(recs[::-1], S) != key
    touch_later(recs[0].image)
    assert cache_key(recs, S) != key


# ---------------------------------------------------------------- half-built caches

@pytest.mark.parametrize("damage", ["no index", "truncated data", "no data", "bad index"])
def test_half_built_cache_is_rebuilt(tmp_path, count_decodes, damage):
    recs = some_images(tmp_path / "img", 3)
    expected, _ = load_images(recs, S, tmp_path / "cache", progress=False)
    expected = expected.clone()
    [data_file], [index_file] = cache_files(tmp_path / "cache", ".u8"), cache_files(tmp_path / "cache", ".json")
    if damage == "no index":
        index_file.unlink()
    elif damage == "truncated data":
        os.truncate(data_file, data_file.stat().st_size // 2)
    elif damage == "no data":
        data_file.unlink()
    else:
        index_file.write_text('{"version": 1, "shape": [')
    images, kept = load_images(recs, S, tmp_path / "cache", progress=False)
    assert len(count_decodes) == 6  # rebuilt, not read
    assert torch.equal(images, expected) and kept == [0, 1, 2]


def test_failed_build_leaves_no_files(tmp_path):
    recs = some_images(tmp_path / "img", 2) + records_of(tmp_path / "img" / "missing.jpg")
    with pytest.raises(DataError):
        load_images(recs, S, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------- bad images

def truncated_jpeg(path: Path) -> Path:
    data = noise_image(path, (40, 30)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD = {"truncated": truncated_jpeg,
       "garbage": lambda p: (p.write_bytes(b"this is not an image" * 10), p)[1],
       "missing": lambda p: p}


@pytest.mark.parametrize("use_cache", [False, True], ids=["memory", "cache"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_image_named(tmp_path, kind, use_cache):
    recs = some_images(tmp_path / "img", 3)
    bad = BAD[kind](tmp_path / "img" / f"bad_{kind}.jpg")
    recs.insert(1, records_of(bad)[0])
    cache_dir = tmp_path / "cache" if use_cache else None
    with pytest.raises(DataError, match=f"bad_{kind}.jpg"):
        load_images(recs, S, cache_dir, progress=False)
    for _ in range(2 if use_cache else 1):  # the cache remembers the bad image: warns again
        with pytest.warns(DataWarning, match=rf"skipped 1 images .*first: .*bad_{kind}\.jpg"):
            images, kept = load_images(recs, S, cache_dir, skip_bad=True, progress=False)
        assert kept == [0, 2, 3] and images.shape == (3, 3, S, S)
        good, _ = load_images([recs[i] for i in kept], S, None, progress=False)
        assert torch.equal(images, good)
    if use_cache:  # a strict call on a cache built with skip_bad still fails, naming the file
        with pytest.raises(DataError, match=f"bad_{kind}.jpg"):
            load_images(recs, S, cache_dir, progress=False)


def test_all_bad_with_skip_bad(tmp_path):
    recs = records_of(tmp_path / "gone1.jpg", tmp_path / "gone2.jpg")
    with pytest.warns(DataWarning, match="skipped 2 images"):
        images, kept = load_images(recs, S, tmp_path / "cache", skip_bad=True, progress=False)
    assert images.shape == (0, 3, S, S) and kept == []


# ---------------------------------------------------------------- full disk, killed builds

def fake_free_space(monkeypatch, free: int):
    usage = shutil.disk_usage(".")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))


def test_too_little_free_space_is_refused(tmp_path, monkeypatch, count_decodes):
    recs = some_images(tmp_path / "img", 3)
    fake_free_space(monkeypatch, 5 * 10**6)
    with pytest.raises(CacheSpaceError) as raised:
        load_images(recs, S, tmp_path / "cache", progress=False)
    message = str(raised.value)
    assert str(tmp_path / "cache") in message
    assert re.search(r"needs 10\d\.\d MB, of which 104\.9 MB is a margin to leave free; 5\.0 MB free",
                     message)
    assert "--cache_dir=ELSEWHERE" in message and "--cache_dir= (empty)" in message
    assert isinstance(raised.value, OSError) and raised.value.errno == errno.ENOSPC
    assert count_decodes == [] and list((tmp_path / "cache").iterdir()) == []  # refused up front
    images, _ = load_images(recs, S, None, progress=False)  # the way out it names still works
    assert images.shape == (3, 3, S, S)


class FillsUp:
    """A file whose writes fail with `code` once `room` bytes are written, like a full disk."""

    def __init__(self, file, room: int, code: int):
        self.file, self.room, self.code = file, room, code

    def write(self, data):
        self.room -= memoryview(data).nbytes
        if self.room < 0:
            raise OSError(self.code, os.strerror(self.code))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_disk_full_while_writing(tmp_path, monkeypatch, code):
    recs = some_images(tmp_path / "img", 4)
    fake_free_space(monkeypatch, 10**12)  # the check up front passes; the disk fills up later
    monkeypatch.setattr(cache, "open", lambda *a, **k: FillsUp(open(*a, **k), 2 * 3 * S * S, code),
                        raising=False)
    with pytest.raises(CacheSpaceError, match=r"not enough disk space .*writing it failed: "
                       + os.strerror(code)) as raised:
        load_images(recs, S, tmp_path / "cache", progress=False)
    assert "--cache_dir=ELSEWHERE" in str(raised.value)
    assert list((tmp_path / "cache").iterdir()) == []  # the partial temporary file is gone
    monkeypatch.undo()  # space again: the cache builds
    images, _ = load_images(recs, S, tmp_path / "cache", progress=False)
    memory, _ = load_images(recs, S, None, progress=False)
    assert torch.equal(images, memory)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # exited and reaped: no process has this pid (until it is reused)
    return child.pid


def test_temp_files_of_dead_builds_removed(tmp_path):
    recs = some_images(tmp_path / "img", 2)
    folder = tmp_path / "cache"
    folder.mkdir()
    key, other, dead = cache_key(recs, S), "0123456789abcdef01234567", dead_pid()
    gone = [folder / f"{key}.u8.tmp{dead}", folder / f"{key}.json.tmp{dead}",
            folder / f"{other}.u8.tmp{dead}"]
    kept = [folder / f"{other}.u8.tmp{os.getpid()}",  # a live build of another cache
            folder / f"{other}.u8.tmp1",  # pid 1 always runs (as another user: PermissionError)
            folder / f"notes.txt.tmp{dead}"]  # not a cache file
    for path in gone + kept:
        path.write_bytes(b"x" * 100)
    images, _ = load_images(recs, S, folder, progress=False)
    assert images.shape == (2, 3, S, S)
    assert not any(path.exists() for path in gone)
    assert all(path.exists() for path in kept)


@pytest.mark.parametrize("mode, size", [("RGB", 32), ("RGB", 40), ("L", 32)])
def test_an_image_already_its_size_is_stored_as_resize_crop_stores_it(tmp_path, mode, size):
    """The cache skips torchvision for an RGB image already S x S (its import is ~1 s of a short run):
    the same uint8 pixels as `resize_crop`, which every other image still goes through."""
    from clipModel import resize_crop
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, len(mode)), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(path)
    stored = {}
    assert cache._decode_all([str(path)], stored.__setitem__, 32, False, "", False) == {}
    reference = resize_crop(32)(open_rgb(path))
    assert stored[0].dtype == torch.uint8 and torch.equal(stored[0], reference.as_subclass(torch.Tensor))
