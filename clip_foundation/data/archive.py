"""Zip archives unpacked safely, for the dataset downloads (download.py): no member may land outside the
destination (absolute paths, "..", links), nor unpack to more than the free space or MAX_RATIO times its
packed size (a zip bomb), nor write past the size its header declares; a corrupt archive is deleted.
The download errors live here, the lowest of the download modules, so both raise the same ones.
"""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path

from tqdm import tqdm


class DownloadError(RuntimeError):
    """A credential, network or archive problem; the message says what to do about it."""


class BadArchive(DownloadError):
    """The archive itself is unusable (corrupt, refused, wrong content): never reuse it."""


# Zip bomb limits, checked against the archive's listing before anything is written.
MAX_RATIO = 200                  # JPEGs compress ~1:1 and caption files ~4:1; bombs reach ~1000:1
RATIO_MIN_SIZE = 1 << 20         # a smaller member cannot fill a disk, whatever its ratio
FREE_SPACE_MARGIN = 250 * 10**6  # left free after unpacking: block rounding of ~32k files, other writers


def _inside(path: Path, out: Path) -> bool:
    path = os.path.normpath(path)
    return path == str(out) or path.startswith(str(out) + os.sep)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _check_member(zf: zipfile.ZipFile, m: zipfile.ZipInfo, out: Path) -> None:
    name = m.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or name[1:2] == ":" or ".." in parts or not _inside(out / name, out):
        raise BadArchive(f"refusing archive member {name!r}: an absolute path or '..' "
                         f"would write outside {out}")
    if stat.S_ISLNK(m.external_attr >> 16):
        link = zf.read(m).decode("utf-8", "replace")
        escapes = link.startswith("/") or not _inside((out / name).parent / link, out)
        # The Kaggle archives hold no links; refusing all of them keeps extraction simple.
        raise BadArchive(f"refusing archive member {name!r}: it is a symlink to {link!r}"
                         + (f", outside {out}" if escapes else ""))
    ratio = m.file_size / max(m.compress_size, 1)
    if m.file_size > RATIO_MIN_SIZE and ratio > MAX_RATIO:
        raise BadArchive(f"refusing archive member {name!r}: it would unpack from {m.compress_size:,} "
                         f"bytes to {_mb(m.file_size)}, {ratio:,.0f} times its size (the limit is "
                         f"{MAX_RATIO}), like a zip bomb")


def extract(archive: str | Path, out: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Unpack zip `archive` into folder `out`, refusing members that would land outside it.

    Every member is checked before anything is written: its path, symlinks, its compression
    ratio (MAX_RATIO) and the free space for all of them; members starting with a `skip`
    prefix are left out. A corrupt or truncated archive (bad zip, CRC error) is deleted
    and reported, so it is never half-used. Raises BadArchive for a corrupt or refused
    archive, DownloadError when `out` lacks the space.
    """
    archive, out = Path(archive), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:
                _check_member(zf, m, out)
            members = [m for m in members if not m.filename.startswith(skip)]
            total, free = sum(m.file_size for m in members), shutil.disk_usage(out).free
            if total + FREE_SPACE_MARGIN > free:
                raise DownloadError(f"not enough space to extract {archive.name}: it unpacks to "
                                    f"{_mb(total)} (plus a {_mb(FREE_SPACE_MARGIN)} margin) but "
                                    f"only {_mb(free)} is free in {out.parent}")
            with tqdm(total=total, unit="B", unit_scale=True,
                      desc=f"extracting {archive.name}") as bar:
                for m in members:
                    path = out / m.filename
                    if m.is_dir():
                        path.mkdir(parents=True, exist_ok=True)
                        continue
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # The checks above trust the declared size: never write past it (zipfile
                    # itself stops there, so this only guards against a reader that does not).
                    written = 0
                    with zf.open(m) as src, open(path, "wb") as dst:  # src checks the CRC at EOF
                        while chunk := src.read(1 << 20):
                            written += len(chunk)
                            if written > m.file_size:
                                raise BadArchive(f"refusing archive member {m.filename!r}: it "
                                                 f"unpacks to more than the {m.file_size:,} bytes "
                                                 "its header declares")
                            dst.write(chunk)
                            bar.update(len(chunk))
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        archive.unlink(missing_ok=True)
        raise BadArchive(f"the downloaded archive {archive.name} is corrupt or truncated ({e}): "
                         "removed it; run the download again") from None
