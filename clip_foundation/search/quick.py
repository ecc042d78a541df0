"""A text query from the shell answered without torch: `search.py "a dog" --checkpoint=RUN [-n 9] [--json]`
(`--engine` auto or a graph engine, `--device` auto or cpu, `--split`), asked first by `commands.run`. It serves
only what the full path (command.py) would serve, checked as that path checks it, and otherwise returns None,
having said nothing, for the full path to answer. Per query it checks:

- the split's records, without reading the dataset: the memo the full path left beside the index when it last
  read them (`RecordsMemo`: records-SPLIT.json) names their image paths by sha256, and serves only while its
  stamp is unchanged (the run's config.json, the size and time of every file under the data folder but the
  images, every folder's time, and the readers' own source files); the warnings that read showed are shown again;
- the index: its format, identity (the weights' sha256, the gallery's paths, sizes and times, the querybank's
  sha256) and its rows' sha256, by the definitions `index.load_index` uses (`index_meta`);
- the text graph: intact (its files' sha256 as exported) and vouched for by a check against these weights on
  this runtime (`engines.saved`), as the full path serves it to a model that has not read its text tower.

The large files' digests are kept across commands (`files.file_digest`). The full path shares this module's
query rule (`clean_query`, `MAX_RESULTS`) and printing (`show_results`, `is_link`); cached.py holds the rest.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from clip_foundation.common import cli
from clip_foundation.common.files import model_digest
from clip_foundation.data.records import caption_fault
from clip_foundation.engines import saved
from clip_foundation.search.cached import (AUTO_FAISS_MIN_SIZE, NON_FINITE_SCORES, BadIndexError, RecordsMemo,
                                           image_identity, index_meta, paths_digest, user_index_dir)

MAX_RESULTS = 1000  # a search returns at most this many (-n): -n 100000 had not finished after 120 s
GRAPH_ENGINES = {"openvino": "openvino", "onnxruntime": "onnx"}  # registry's graph engines -> format, auto's order


def clean_query(query: str) -> str:
    """A text query cleaned as the readers clean a caption (stripped) and held to their one rule
    (`records.caption_fault`), so that what cannot be a caption is not searched for either:
    ValueError, one line, for a query with no visible text (spaces, zero-width characters),
    a line break, or more characters than a caption may have."""
    query = query.strip()
    if fault := caption_fault(query):
        kind, message = fault
        raise ValueError("empty query: type some words to search for" if kind == "empty caption"
                         else message.replace("caption", "query", 1))  # "query has a line break"
    return query


def is_link(path: str) -> bool:
    """Whether a gallery row names a URL (an embedding folder's image_path may), not a file."""
    return re.match(r"[a-z][a-z0-9+.-]*://", str(path), re.IGNORECASE) is not None


def show_results(what: dict, matches: list[dict], lines: list[str], missing: list[str], as_json: bool) -> None:
    """Print a search's answer: its JSON alone (`what`, the matches, the images gone) or its lines, then a
    warning naming the results whose images are gone; exit with an error for scores JSON cannot hold."""
    if as_json:
        try:  # the last guard: NaN or Infinity is not JSON, and a reader of --json would choke on it
            text = json.dumps({**what, "matches": matches, "missing": missing}, indent=2, allow_nan=False)
        except ValueError:
            sys.exit(f"error: {NON_FINITE_SCORES}")
        print(text)
    else:
        print("\n".join(lines))
    if missing:
        print(f"warning: {len(missing)} of these images no longer exist (moved or deleted since the "
              f"index was built): {', '.join(missing)}; rebuild the index", file=sys.stderr)


# ---------------------------------------------------------------- the command line it serves

@dataclass
class PlainQuery:
    """The options of `search.py` a plain text query may give: SearchConfig's own, named and defaulted alike."""
    checkpoint: str = ""
    device: str = "auto"
    engine: str = "auto"
    query: str | None = None
    n: int = 0
    json: bool = False
    split: str = "test"


def plain_query(argv: list[str]) -> PlainQuery | None:
    """`argv` read as the search command reads it (`cli.read`) when it is a text query with PlainQuery's options
    alone, each in range; None for anything else (another option or a mistake: the full path says which)."""
    try:
        args = cli.read(PlainQuery(), argv, positional=("query",))
    except ValueError:
        return None
    ok = (args.query is not None and args.checkpoint and 0 <= args.n <= MAX_RESULTS and args.device in ("auto", "cpu")
          and args.engine in ("auto", *GRAPH_ENGINES) and args.split in ("train", "val", "test", "all"))
    return args if ok else None


def answer(argv: list[str]) -> int | None:
    """Answer the command line `argv` when it is a plain text query whose every part is at hand and checked
    (the module's docstring) -> 0; an empty query is the full path's error (exit 1). None, having printed
    nothing, for the full path to answer: another option, a Hub id, no memo or index, a changed file, a graph
    not vouched for, a GPU torch would pick, FAISS."""
    if (args := plain_query(argv)) is None:
        return None
    try:
        query = clean_query(args.query)
    except ValueError as e:  # as the full path says it
        sys.exit(f"error: {e}")
    served = None
    with contextlib.suppress(Exception):  # whatever went wrong, the full path answers, and says what it was
        served = _serve(query, args)
    if served is None:
        return None
    shown, paths, scores = served
    for message in shown:  # the records' warnings, as the full path shows them on reading
        print(f"warning: {message}", file=sys.stderr)
    matches = [{"path": p, "score": s} for p, s in zip(paths, scores)]
    show_results({"query": query}, matches, [f"{s:.4f}  {p}" for p, s in zip(paths, scores)],
                 [p for p in paths if not is_link(p) and not Path(p).is_file()], args.json)
    return 0


def _serve(query: str, args: PlainQuery):
    # -> (warnings to show, paths, float scores) best first, or None where the full path must answer
    folder, engine = Path(args.checkpoint), _engine(args.engine, args.device)
    torch_version = _torch_version()
    if engine is None or torch_version is None or not folder.is_dir():
        return None
    memo = RecordsMemo.load(folder, args.split)
    if memo is None:
        return None
    model_id, found, name = model_digest(folder), None, f"images-{memo['paths'][:16]}"  # as gallery names it
    for stem in (folder / "index" / name, user_index_dir(folder) / name):  # the first that loads, as there
        with contextlib.suppress(BadIndexError, OSError):
            meta = index_meta(stem)
            if (paths_digest(meta["paths"]) == memo["paths"] and meta.get("kind") == "images"
                    and meta.get("identity") == image_identity(model_id, meta["paths"], folder)):
                found = stem, meta
                break
    if found is None or "faiss" in found[1] or len(found[1]["paths"]) >= AUTO_FAISS_MIN_SIZE:
        return None  # stale or missing: rebuilt there; FAISS: searched there
    (stem, meta), fmt = found, GRAPH_ENGINES[engine]
    graph = saved.engines_folder(folder) / saved.graph_name("text", "embed", fmt)
    runtime = importlib.import_module(engine)
    if not (saved.intact(graph) and saved.vouched(graph, saved.runtime_text(
            engine, getattr(runtime, "__version__", "?"), torch_version))):
        return None
    max_length = json.loads((folder / "config.json").read_text())["model"]["text"]["max_length"]
    tokenizer = saved.saved_tokenizer(folder, max_length)
    if tokenizer is None:
        return None
    import numpy as np
    from safetensors.numpy import load_file
    encoded = tokenizer.encode_batch([query])
    inputs = [np.array([e.ids for e in encoded], dtype=np.int64), np.array([e.attention_mask for e in encoded],
                                                                        dtype=np.int64)]
    text = _infer(engine, runtime, graph, inputs).astype(np.float32)  # (1, D)
    if meta.get("querybank"):
        text = np.concatenate([text, np.ones((1, 1), np.float32)], axis=1)  # ranks by cosine - the hub bias
    rows = load_file(str(stem.with_suffix(".safetensors")))["embeddings"]
    if rows.dtype != np.float16 or rows.ndim != 2 or rows.shape != (len(meta["paths"]), text.shape[1]):
        return None
    # as index.exact_topk scores a single query: float64 products and sums, rounded once to float32
    scores = rows.astype(np.float64) @ text[0].astype(np.float64)
    best = np.argsort(-scores, kind="stable")[:min(args.n or 9, len(rows))]
    if not len(best) or not np.isfinite(scores[best]).all():
        return None
    return memo["warnings"], [meta["paths"][i] for i in best], [float(s) for s in scores[best].astype(np.float32)]


def _engine(engine: str, device: str) -> str | None:
    """The graph engine `--engine`/`--device` name on this machine, as registry.resolve and make_encoder choose
    it; None where that is torch (a GPU torch would pick, no engine installed)."""
    if device == "auto" and (sys.platform == "darwin" or any(map(os.path.exists, (
            "/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")))):
        return None  # torch may find a GPU here (cuda, rocm, mps): only asking it would tell
    names = GRAPH_ENGINES if engine == "auto" else [engine]
    return next((name for name in names if importlib.util.find_spec(name) is not None), None)


def _torch_version() -> str | None:
    """torch.__version__, read from its version.py without importing torch (1.7 s here): a graph's check is
    recorded under it (the outputs it was compared with)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return None
    text = Path(spec.origin).with_name("version.py").read_text()
    found = re.search(r"^__version__\s*=\s*'([^'\\]+)'\s*$", text, re.M)
    return found and found[1]


def torch_threads() -> int:
    """The threads torch runs on by default (its graphs are compiled with torch.get_num_threads()): MKL's or
    OpenMP's count when set, else the physical cores this process may use."""
    for variable in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        with contextlib.suppress(ValueError):
            if (count := int(os.environ.get(variable, "").split(",")[0])) > 0:
                return count
    cores = set()
    for cpu in os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(cpu)
    return max(1, len(cores))


def _infer(engine: str, runtime, graph: Path, inputs: list):
    # the graph run as registry's OpenVINOEncoder / OnnxRuntimeEncoder run the text tower (fp32, torch's threads)
    if engine == "openvino":
        with saved.signal_stack_kept():
            compiled = runtime.Core().compile_model(str(graph), "CPU", {
                "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch_threads()})
        return compiled(inputs)[0]
    options = runtime.SessionOptions()
    options.intra_op_num_threads = torch_threads()
    options.log_severity_level = 3
    session = runtime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip([i.name for i in session.get_inputs()], inputs)))[0]
