"""What the engines read from a run folder, without importing torch: where a run's graphs are cached, an
exported graph's files and the digest it was sealed with (`intact`), the check that vouches for it against the
run's own weights (`vouch`, `vouched`) and the runtime text that check is recorded under, the run's saved
tokenizer.json set to tokenize as the model does, and OpenVINO's signal stack given back. export.py writes the
graphs, registry.py runs them, and search/quick.py answers a text query from a shell with these alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import tempfile
from pathlib import Path

from clip_foundation.common.files import changed_file, model_digest, user_cache

TOLERANCE = 1e-4  # an engine's outputs on the example inputs must match torch's within this (fp32)
BF16_COSINE = 0.999  # in bf16, each output row's cosine with torch's must be at least this (measured: 0.9995)
INT8_COSINE = 0.98  # in int8, the mean cosine with torch's features on calibration photos (measured: 0.994)


def graph_name(tower: str, part: str, format: str = "onnx") -> str:
    """The file an exported graph is saved as: image.onnx, text_tower.xml, ..."""
    return f"{tower}{'_tower' if part == 'features' else ''}.{'xml' if format == 'openvino' else 'onnx'}"


def graph_files(path) -> list[Path]:
    """The files a graph is made of: the .onnx, or OpenVINO's .xml and its .bin."""
    path = Path(path)
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def digest_file(path) -> Path:
    """Where the sha256 of a graph's files is kept: NAME.sha256.json beside it."""
    return Path(path).with_name(f"{Path(path).name}.sha256.json")


def intact(path) -> bool:
    """Whether the graph at `path` is there as it was exported: its files' sizes and sha256 match the
    digest written beside it (not when edited, truncated, unfinished or exported without a digest)."""
    path = Path(path)
    try:
        entries = json.loads(digest_file(path).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(entries, dict) and set(entries) == {f.name for f in graph_files(path)}
            and changed_file(path.parent, entries) is None)


def check_file(path) -> Path:
    """Where the result of checking a graph against torch is kept: NAME.checked.json beside it."""
    return Path(path).with_name(f"{Path(path).name}.checked.json")


def vouch(path, runtime: str, found: dict) -> None:
    """Record that the intact graph at `path`, run as `runtime` says (engine, versions, precision, what the
    check asks), passed its check against the torch weights whose digest names its folder (`found`: how
    close it came). Written only by a check against those weights as read from the run's file
    (registry.py); best effort: a folder that cannot be written checks again next time."""
    from clip_foundation.common import files  # its atomic_write is the model file's: torch, here already
    with contextlib.suppress(OSError, ValueError):  # not written: the graph is still served, and checked next time
        record = {"graph": json.loads(digest_file(path).read_text()), "runtime": runtime, **found}
        files.atomic_write(check_file(path), lambda tmp: tmp.write_text(json.dumps(record)))


def vouched(path, runtime: str) -> bool:
    """Whether the graph at `path` as it is now (the digest it was loaded by) passed a check run as `runtime`
    says (`vouch`); a record of other bytes, another runtime, precision or check, or none, vouches for nothing."""
    try:
        record = json.loads(check_file(path).read_text())
        return (isinstance(record, dict) and record.get("graph") == json.loads(digest_file(path).read_text())
                and record.get("runtime") == runtime)
    except (OSError, ValueError):
        return False


def runtime_text(engine: str, version: str, torch_version: str, precision: str = "fp32") -> str:
    """What a check is recorded under (`vouch`): the engine and its version, torch's (the outputs it was compared
    with), the precision and what the check asks of it."""
    asked = {"fp32": f"within {TOLERANCE}", "bf16": f"cosine >= {BF16_COSINE}"}.get(
        precision, f"mean cosine >= {INT8_COSINE}")
    return f"{engine} {version}, torch {torch_version}, {precision} {asked}"


def run_engines_folder(checkpoint) -> Path:
    """RUN/engines/<first 16 hex digits of the weights' sha256>: where a run's graphs are cached."""
    return Path(checkpoint) / "engines" / model_digest(checkpoint)[:16]


def engines_folder(checkpoint) -> Path:
    """Where the graphs of the saved model in `checkpoint` are cached and read: `run_engines_folder`,
    or the same digest under the user's cache ($XDG_CACHE_HOME or ~/.cache) when the run folder
    cannot be written (read-only, another user's)."""
    folder = run_engines_folder(checkpoint)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # a folder that exists may still refuse writes
        return folder
    except OSError:
        return user_cache("engines", folder.name)


def saved_tokenizer(folder, max_length: int):
    """The tokenizer saved in `folder` (tokenizer.json) as a `tokenizers.Tokenizer` that truncates to
    `max_length` and pads to the longest as `CLIPModel.tokenize` asks transformers to; None when the folder
    holds no fast tokenizer with a padding token (transformers' own is used then)."""
    from tokenizers import Tokenizer
    folder = Path(folder)
    try:
        saved = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer = Tokenizer.from_file(os.fspath(folder / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - missing, or unreadable (tokenizers raises a bare Exception): transformers says why
        return None
    pad = saved.get("pad_token") if isinstance(saved, dict) else None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if not isinstance(pad, str) or tokenizer.token_to_id(pad) is None:
        return None
    tokenizer.enable_truncation(max_length, direction=saved.get("truncation_side", "right"))
    tokenizer.enable_padding(direction=saved.get("padding_side", "right"), pad_id=tokenizer.token_to_id(pad),
                             pad_type_id=saved.get("pad_token_type_id", 0), pad_token=pad)
    return tokenizer


class _SignalStack(ctypes.Structure):  # Linux's stack_t
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


@contextlib.contextmanager
def signal_stack_kept():
    """Give the calling thread its own signal stack back after the block. A compiled OpenVINO model
    sets the thread's signal stack and, when freed, puts back the one it found: freed in any order
    but the reverse (as the garbage collector pleases), that left an unmapped stack, and the next
    signal handled on it (Ctrl-C, a child process's exit) was a segmentation fault."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc, kept = ctypes.CDLL(None, use_errno=True), _SignalStack()
    libc.sigaltstack(None, ctypes.byref(kept))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(kept), None)
