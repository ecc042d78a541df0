"""Files written whole or not at all (`atomic_write`), the checks of a folder a command is about to
write into, and digests: of a file, of the files a description vouches for (embed.json, index.json), of a
saved model, of a gallery's images. Imports no torch (a text query from the shell reads digests without it:
search/quick.py); `atomic_write`, the model file's, is imported from it on first use."""
import contextlib
import contextvars
import hashlib
import json
import os
import re
import time
from pathlib import Path

__all__ = ["atomic_write", "user_cache", "folder_to_write", "unlisted", "file_digest", "digests_held", "file_entries",
           "changed_file", "model_digest", "gallery_digest"]
_HELD: contextvars.ContextVar[dict | None] = contextvars.ContextVar("digests_held", default=None)
KEPT_FROM = 4 << 20  # files from this size keep their digest across commands (`file_digest`): 155 MB took 0.2 s
SETTLED_NS = 2_000_000_000  # ...once unchanged this long: file times are this coarse on some filesystems (FAT: 2 s)


def __getattr__(name: str):
    # clipModel's atomic_write (shared, not copied), imported when first asked for: clipModel imports torch
    if name == "atomic_write":
        from clipModel import atomic_write
        globals()[name] = atomic_write
        return atomic_write
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def user_cache(*parts: str) -> Path:
    """This user's cache folder of the project, $XDG_CACHE_HOME (or ~/.cache)/clip-foundation/PARTS...:
    where converted weights, indexes and engine graphs go when a run folder cannot hold them."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "clip-foundation", *parts)


def folder_to_write(path, option: str) -> Path:
    """`path` as a folder a command writes into; NotADirectoryError (one line naming `--option`) when
    it is an existing file, which mkdir would only answer with "[Errno 17] File exists"."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--{option}={path} is a file: it must be a folder (a new one, or one this command wrote)")
    return path


def unlisted(folder: Path, listed) -> list[Path]:
    """The entries of `folder` that are not files named in `listed`, nor atomic_write's temporary
    names of them (".NAME.tmpPID", and the "NAME.tmp" of older versions): what a command that
    writes there did not write."""
    return [e for e in sorted(Path(folder).iterdir())
            if re.sub(r"^\.|\.tmp\d*$", "", e.name) not in listed or not e.is_file()]


def file_digest(path, chunk: int = 1 << 20) -> str:
    """sha256 of the file at `path`, read in chunks; an unchanged file is not read again within a `digests_held`
    block, nor, from KEPT_FROM bytes, across commands: its digest is kept in the user's cache under the file's
    identity, as git's index keeps one (real path, device, inode, size, modification and change times in ns).
    Any write changes the times, and the change time cannot be set back without root (or moving the clock);
    a file changed within SETTLED_NS of being hashed is not kept, so a write in the same clock tick cannot
    hide. The kept digest is as trusted as the cache folder it is in (where the engines' and indexes' go too)."""
    held, st = _HELD.get(), os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if held is not None and key in held:
        return held[key]
    kept = _kept_digest(key) if st.st_size >= KEPT_FROM else None
    if kept is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        kept = h.hexdigest()
        if st.st_size >= KEPT_FROM and time.time_ns() - st.st_ctime_ns > SETTLED_NS:
            _keep_digest(path, key, kept)
    if held is not None:
        held[key] = kept
    return kept


def _kept_path(key: tuple) -> Path:
    name = hashlib.sha256(json.dumps(key).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return user_cache("digests", name)


def _kept_digest(key: tuple) -> str | None:
    # the digest kept for exactly this file identity, or None (none kept, unreadable, half written: hashed again)
    try:
        entry = json.loads(_kept_path(key).read_text())
    except (OSError, ValueError):
        return None
    digest = entry.get("sha256") if isinstance(entry, dict) and entry.get("key") == list(key) else None
    return digest if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) else None


def _keep_digest(path, key: tuple, digest: str) -> None:
    # best effort; only if the file did not change while it was read. A half-written entry is not JSON: never read
    st = os.stat(path)
    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != key[1:]:
        return
    with contextlib.suppress(OSError):
        where = _kept_path(key)
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(json.dumps({"key": list(key), "sha256": digest}))


@contextlib.contextmanager
def digests_held():
    """A block (one command) in which a file hashed again, unchanged (size, times and inode as before), is not
    read again: a query checks the weights file for its engines' folder and for its index, 117 MB each time.
    Only within the block, and only in its thread: a later command, or a file written since, is hashed anew."""
    token = _HELD.set({})
    try:
        yield
    finally:
        _HELD.reset(token)


def file_entries(folder, names, stamped: bool = False) -> dict:
    """{name: {"bytes", "sha256"}} of the files `names` in `folder`: what a description written
    beside them (embed.json, index.json) vouches for; `changed_file` checks them. `stamped` adds each
    file's modification time, so a later check reads the bytes only of a file written since (a
    description meant to be reproduced byte for byte, embed.json, carries none)."""
    out = {}
    for name in names:
        st = (Path(folder) / name).stat()
        out[name] = {"bytes": st.st_size, "sha256": file_digest(Path(folder) / name)}
        if stamped:
            out[name]["mtime_ns"] = st.st_mtime_ns
    return out


def changed_file(folder, files: dict, verify: bool = True) -> str | None:
    """The first of `files` (as `file_entries` wrote them) that is missing from `folder` or no
    longer the file recorded: another size, or with `verify` other bytes (a file changed in
    place keeps its size); None when every one is as recorded. A stamped file whose size and
    modification time are still the recorded ones was not written since, so its bytes are read only
    when the time differs (a copied folder, a file rewritten in place): opening a 5 GB index stays cheap."""
    for name, entry in files.items():
        path = Path(folder) / name
        if not (isinstance(entry, dict) and path.is_file()):
            return name
        st = path.stat()
        if st.st_size != entry.get("bytes"):
            return name
        if verify and st.st_mtime_ns != entry.get("mtime_ns") and file_digest(path) != entry.get("sha256"):
            return name
    return None


def model_digest(checkpoint) -> str:
    """The identity of a saved model: sha256 of its weights file."""
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a saved CLIPModel folder "
                                "(expected config.json and model.safetensors)")
    return file_digest(path)


def gallery_digest(paths: list[str]) -> str:
    """Changes when an image is added, removed, or rewritten (size or mtime)."""
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
