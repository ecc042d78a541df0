"""What a search keeps on disk beside a run, read without torch: the cached image index's files checked (its
format, identity and rows' sha256: `index_meta`, `image_identity`), where a run's indexes are cached, and the
records memo (`RecordsMemo`): what the search command read a run's split as, kept beside its index so that a
text query from the shell (quick.py) need not read the dataset again while nothing it depends on changed.
index.py and gallery.py build and load indexes by these same definitions.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from clip_foundation.common.files import file_digest, gallery_digest, user_cache
from clip_foundation.data.records import IMAGE_SUFFIXES

INDEX_VERSION = 3  # bump when the index format changes, so old caches are rebuilt (index.py)
AUTO_FAISS_MIN_SIZE = 200_000  # --backend=auto gives a gallery of this many rows a FAISS index (index.py)
NON_FINITE_SCORES = ("non-finite scores (NaN or inf): the index or the model is damaged; "
                     "rebuild the index (search.py --build-index)")
MEMO_VERSION = 1  # bump when the memo's stamp changes
QUERYBANK_FILE = "querybank.safetensors"  # evaluate.querybank.FILE (torch's side of the floor)


class BadIndexError(ValueError):
    """A prebuilt index that cannot be used: missing, incomplete or from another model."""


def paths_digest(paths) -> str:
    """sha256 of a gallery's image paths in order: its first 16 digits name the gallery's cached index."""
    return hashlib.sha256("\n".join(map(str, paths)).encode("utf-8", "surrogateescape")).hexdigest()


def user_index_dir(checkpoint) -> Path:
    """Where indexes of `checkpoint` go when its own folder cannot be written (read-only, full):
    a folder per checkpoint under the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    key = hashlib.sha256(str(Path(checkpoint).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return user_cache("index", key)


def index_meta(stem, identity: str | None = None) -> dict:
    """<stem>.json as `index.save_index` wrote it, checked: this format's version, `identity` when given, and
    the sha256 <stem>.safetensors had when written; BadIndexError naming the fault otherwise."""
    meta_file = Path(stem).with_suffix(".json")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise BadIndexError(f"{meta_file}: missing or unreadable ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
        raise BadIndexError(f"{meta_file}: not an index of format v{INDEX_VERSION}")
    if identity and meta.get("identity") != identity:
        raise BadIndexError(f"{meta_file}: stale (built for another model or gallery)")
    check_digest(Path(stem).with_suffix(".safetensors"), meta, meta_file)
    return meta


def check_digest(path: Path, meta: dict, meta_file: Path) -> None:
    """BadIndexError unless the file at `path` has the sha256 `meta` recorded for its suffix: a file that still
    parses may hold other vectors."""
    try:
        current = file_digest(path)
    except OSError as e:
        raise BadIndexError(f"{path}: missing or unreadable ({e.strerror or e})") from None
    if current != (meta.get("sha256") or {}).get(path.suffix[1:]):
        raise BadIndexError(f"{path}: its contents differ from the sha256 recorded in {meta_file.name} "
                            "when it was built (truncated, damaged or changed since)")


def image_gallery(paths, checkpoint) -> str:
    """The gallery a run's image index is of: each image's path, size and time, and the run's querybank's sha256
    (each row carries its image's hub bias: a new or changed bank makes a new index)."""
    bank = Path(checkpoint) / QUERYBANK_FILE
    return gallery_digest(list(paths)) + (f":querybank:{file_digest(bank)}" if bank.is_file() else "")


def index_identity(model_id: str, gallery: str) -> str:
    """What a cached index must have been built for: this format, the weights' sha256 and its gallery."""
    return f"v{INDEX_VERSION}:{model_id}:{gallery}"


def image_identity(model_id: str, paths, checkpoint) -> str:
    """The identity of the run's image index of the images `paths`."""
    return index_identity(model_id, image_gallery(paths, checkpoint))


# ---------------------------------------------------------------- the records memo

class RecordsMemo:
    """What the full path read a run's split as, kept beside its index: the sha256 of the records' image paths,
    and the warnings that reading showed, under the stamp of what the reading depended on, taken before it."""

    def __init__(self, checkpoint, split: str, data: str, stamp: dict):
        self.checkpoint, self.split, self.data, self.stamp = Path(checkpoint), split, data, stamp

    @classmethod
    def before_reading(cls, checkpoint, split: str, data: str) -> RecordsMemo | None:
        """The memo to keep once the records of the run's `data` folder (as its config names it) are read; None
        where a stamp cannot vouch for them (a folder not given as an absolute local path)."""
        stamp = records_stamp(checkpoint, data)
        return cls(checkpoint, split, data, stamp) if stamp is not None else None

    def save(self, paths: list[str], shown: list) -> None:
        """Keep it, with the warnings `shown` while reading (`cli.shown_warnings`), in CHECKPOINT/index/ or beside the
        user's cached indexes (best effort: a query that finds none reads the records)."""
        from clip_foundation.common import files  # its atomic_write is the model file's: torch, there already
        if None in shown:
            return
        memo = {"version": MEMO_VERSION, "split": self.split, "data": self.data, "stamp": self.stamp,
                "paths": paths_digest(paths), "warnings": shown}
        for folder in (self.checkpoint / "index", user_index_dir(self.checkpoint)):
            path = folder / f"records-{self.split}.json"
            with contextlib.suppress(OSError, ValueError, TypeError):  # kept already: its warnings as first shown
                if {**json.loads(path.read_text()), "warnings": shown} == memo:  # (a process shows each once)
                    return
            with contextlib.suppress(OSError):
                folder.mkdir(parents=True, exist_ok=True)
                files.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(memo)))
                return

    @staticmethod
    def load(checkpoint, split: str) -> dict | None:
        """The memo of `split` whose stamp still matches (CHECKPOINT/index/ first), else None."""
        for folder in (Path(checkpoint) / "index", user_index_dir(checkpoint)):
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                memo = json.loads((folder / f"records-{split}.json").read_text())
                if (memo.get("version") == MEMO_VERSION and memo.get("split") == split
                        and memo.get("stamp") == records_stamp(checkpoint, memo.get("data"))):
                    return memo
        return None


def records_stamp(checkpoint, data) -> dict | None:
    """What reading the records of the run's `data` folder depends on, taken cheaply: the run's config.json, the
    size and time of every file under the folder but its images, every folder's time (an image added, removed or
    renamed changes it; an image rewritten in place changes the gallery's digest instead), where each linked
    folder points, and the readers' source files. None unless `data` is an absolute path to a local folder
    whose every entry can be looked at."""
    if not (isinstance(data, str) and os.path.isabs(data) and os.path.isdir(data)):
        return None
    folders, others, seen = {}, {}, set()

    def walk(folder: str, rel: str) -> None:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree
            return
        seen.add((st.st_dev, st.st_ino))
        folders[rel] = [st.st_mtime_ns, os.readlink(folder) if os.path.islink(folder) else None]
        with os.scandir(folder) as entries:
            for e in entries:
                if e.is_dir():  # linked folders followed: a dataset's Images/ may be a link to a shared copy
                    walk(e.path, f"{rel}/{e.name}")
                elif os.path.splitext(e.name)[1].lower() not in IMAGE_SUFFIXES:
                    st = e.stat()
                    others[f"{rel}/{e.name}"] = [st.st_size, st.st_mtime_ns]
    try:
        walk(data, ".")
        readers = {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                   for p in (Path(__file__).parents[1] / "data").glob("*.py")}
        return {"config": file_digest(Path(checkpoint) / "config.json"), "folders": folders, "files": others,
                "readers": readers}
    except OSError:  # a broken link, an entry that went while walking: the records are read each time
        return None
