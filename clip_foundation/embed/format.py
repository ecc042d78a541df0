"""The folder `clip_foundation.embed.writer` writes: clip-retrieval's embedding layout, which autofaiss
(and clip-retrieval's own indexing) reads as it is.

    EMB/img_emb/img_emb_000000.npy          float16 (rows, D), L2-normalised rows
    EMB/metadata/metadata_000000.parquet     the same rows, in order: image_path, caption, key (strings)
    EMB/parts/part_000000.json               the part's record: the model and inputs it was made from,
                                              its rows, each file's size and sha256
    EMB/embed.json                           {"version": 2, "dim", "checkpoint", "model", "shards",
                                              "rows_per_shard", "complete", "rows", "skipped", ...,
                                              "parts": [every part's record, once complete]}

Part i is written whole or not at all: its parquet, its .npy, then its record, each under a
temporary name renamed into place when whole (files.atomic_write). So a part is finished exactly
when its record exists, was made from this model and the part's inputs as they are now (names,
sizes, mtimes), and its files are those it describes: a part another run left in OUT, one of
another model, or one whose images changed since is written again. What a part skipped (bad
images, by kind, with the first message of each kind) travels in its parquet's schema metadata, so
the counts of a resumed run are the counts of the parts on disk.

Differences from clip-retrieval's writer: part numbers are always 6 digits (it pads to the digits
of the part count), so names sort in part order up to a million parts whatever the count; and
every parquet has all three columns (it writes `caption` only when it embeds texts, and puts a
WebDataset sample's `__key__` in `image_path`, where this layout puts the sample's URL or source
path and keeps the key in `key`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clip_foundation.common.extras import optional
from clip_foundation.common.files import atomic_write
from clip_foundation.common.files import changed_file, file_entries

VERSION = 2  # 2: parts are vouched for by records (parts/, and embed.json's "parts")
INFO = "embed.json"
COLUMNS = ("image_path", "caption", "key")  # every one a string; caption "" when there is none
SKIPS = b"clip_foundation.skipped"  # parquet schema metadata key: {"counts": {kind: n}, "first": {kind: message}}


def parquet():
    """pyarrow.parquet, or ImportError naming the extra that installs it."""
    return optional("pyarrow.parquet", "scale", "writing embeddings as parquet")


def embeddings_path(out, part: int) -> Path:
    return Path(out) / "img_emb" / f"img_emb_{part:06d}.npy"


def metadata_path(out, part: int) -> Path:
    return Path(out) / "metadata" / f"metadata_{part:06d}.parquet"


def record_path(out, part: int) -> Path:
    return Path(out) / "parts" / f"part_{part:06d}.json"


def write_part(out, part: int, embeddings: np.ndarray, rows: list[dict], skipped: dict,
               made_from: dict | None = None) -> None:
    """Part `part`: float16 `embeddings` (n, D) and their `rows` ({column: str}), the parquet first,
    the .npy, then the record of `made_from` (the model and inputs: see `is_done`) vouching for
    both, each whole or not at all. `skipped`: {"counts", "first"} of this part."""
    pq = parquet()
    import pyarrow as pa
    if len(rows) != len(embeddings):
        raise ValueError(f"part {part}: {len(embeddings)} embeddings for {len(rows)} metadata rows")
    table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in COLUMNS})
    table = table.replace_schema_metadata({SKIPS: json.dumps(skipped)})
    for path in (metadata_path(out, part), embeddings_path(out, part), record_path(out, part)):
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp*"):  # a killed writer's: this part is ours now
            stale.unlink(missing_ok=True)
    record_path(out, part).unlink(missing_ok=True)  # first: a part being replaced is never vouched for
    atomic_write(metadata_path(out, part), lambda tmp: pq.write_table(table, tmp))
    atomic_write(embeddings_path(out, part), lambda tmp: _save_npy(tmp, embeddings.astype(np.float16)))
    record = vouch(out, [embeddings_path(out, part), metadata_path(out, part)], len(rows), **(made_from or {}))
    atomic_write(record_path(out, part), lambda tmp: tmp.write_text(json.dumps(record)))


def vouch(out, files, rows: int, **made_from) -> dict:
    """The record of a part: `made_from`, its `rows`, and the size and sha256 of its `files`
    (paths in `out`, named relative to it), which `is_done` and EmbeddingFolder check."""
    return {**made_from, "rows": rows,
            "files": file_entries(out, [Path(f).relative_to(out).as_posix() for f in files])}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to a temporary name
        np.save(f, array)


def read_record(out, part: int) -> dict | None:
    """Part `part`'s record, or None when it has none (not finished, or not written here)."""
    try:
        record = json.loads(record_path(out, part).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def is_done(out, part: int, made_from: dict | None = None, verify: bool = True) -> bool:
    """Whether part `part` is finished: its record (written last) exists, was made from
    `made_from` (when given: the model, and the part's inputs as they are now), and its files are
    the part's, as recorded (their sizes, and with `verify` their sha256)."""
    record = read_record(out, part)
    names = {p.relative_to(out).as_posix() for p in (embeddings_path(out, part), metadata_path(out, part))}
    return (record is not None and all(record.get(k) == v for k, v in (made_from or {}).items())
            and set(record["files"]) == names and changed_file(out, record["files"], verify) is None)


def part_summary(out, part: int) -> tuple[int, dict]:
    """A finished part's (rows, {"counts", "first"} of what it skipped), from its parquet footer."""
    meta = parquet().read_metadata(metadata_path(out, part))
    raw = (meta.metadata or {}).get(SKIPS)
    return meta.num_rows, json.loads(raw) if raw else {"counts": {}, "first": {}}


def read_part(out, part: int) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Part `part` -> (embeddings float16 (n, D), {column: n strings})."""
    table = parquet().read_table(metadata_path(out, part))
    return np.load(embeddings_path(out, part)), {c: table.column(c).to_pylist() for c in COLUMNS}


def read_info(out) -> dict | None:
    """EMB/embed.json, or None when there is none yet."""
    path = Path(out) / INFO
    return json.loads(path.read_text()) if path.is_file() else None


def write_info(out, info: dict) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out) / INFO, lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
