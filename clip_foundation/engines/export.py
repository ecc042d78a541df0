"""Export a CLIP's towers as ONNX or OpenVINO graphs, for the faster CPU engines of `registry.py`.

    python -m clip_foundation.export runs/NAME                    # RUN/engines/<digest>/*.onnx
    python -m clip_foundation.export runs/NAME --format=openvino  # the same as OpenVINO IR (.xml + .bin)

(that command line is `command.py`'s; this module writes and finds the graphs)

Each tower is written twice: with its projection head (`image.onnx`, `text.onnx`: normalised
embeddings, what search and evaluation use) and alone (`image_tower.onnx`, `text_tower.onnx`: the
tower's features, what training on a frozen tower caches). Graphs take any batch size (and any
caption length), are traced with torch.onnx.export at opset 17, and are cached in a folder named
by the weights' digest, so the same weights are never exported twice. Each graph is served only as
it was exported: the sha256 of its files is written beside it last (`NAME.sha256.json`) and checked
on every load, and a graph that no longer matches it (edited, truncated, unfinished) is exported
again with one warning line. Temporary files of exports that were killed are removed by the next. A
check of a graph against the run's own weights that passed (registry.py) is kept as NAME.checked.json:
the graph's digest, the runtime and how close it came; it vouches for those bytes on that runtime only.
Those files are read by saved.py, which imports no torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_foundation.data.cache import process_alive
from clip_foundation.common.extras import optional
from clip_foundation.common.files import atomic_write, file_entries
# an exported graph's files, its digest and the check that vouches for it, where a run's are cached: saved.py's
# (read without torch), and export's too, where its callers have always found them
from clip_foundation.engines.saved import (check_file, digest_file, engines_folder, graph_files,  # noqa: F401
                                           graph_name, intact, run_engines_folder, vouch, vouched)
from clip_foundation.common.modes import eval_mode  # dropout off while tracing; each module's own mode after
from clipModel import CLIPModel, model_folder

OPSET = 17
TOWERS = ("image", "text")
PARTS = ("embed", "features")  # with the projection head (normalised) | the tower alone


class _Graph(nn.Module):
    """A tower, then (for "embed") its projection head and L2 normalisation: what is exported."""

    def __init__(self, tower: nn.Module, head: nn.Module | None):
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, *inputs):
        features = self.tower(*inputs)
        return features if self.head is None else F.normalize(self.head(features), dim=-1)


def graph(model: CLIPModel, tower: str, part: str = "embed") -> tuple[nn.Module, tuple, dict]:
    """-> (module to export, example inputs, {input name: dynamic axes}) of `tower` ("image" or
    "text"), with its projection head (`part="embed"`) or alone (`part="features"`)."""
    encoder = getattr(model, f"{tower}_encoder")
    head = getattr(model, f"{tower}_projection") if part == "embed" else None
    return _Graph(encoder, head), encoder.example_inputs(getattr(model.config, tower)), encoder.export_axes


def weights_digest(*modules: nn.Module) -> str:
    """sha256 of the modules' parameters and buffers (names, shapes, dtypes and bytes): the identity
    of a model held in memory, such as a frozen tower during training."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def export_onnx(model: CLIPModel, tower: str, part: str, path) -> Path:
    """Trace one graph (see `graph`) into the ONNX file `path`, written whole or not at all."""
    module, inputs, axes = graph(model, tower, part)
    inputs = tuple(x.to(model.device) for x in inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with warnings.catch_warnings(), torch.no_grad(), eval_mode(module):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(module, inputs, str(tmp), input_names=list(axes), output_names=["features"],
                              dynamic_axes={**axes, "features": {0: "batch"}}, opset_version=OPSET, dynamo=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _seal(path)


def to_openvino(onnx_path, xml_path) -> Path:
    """Convert an ONNX file to OpenVINO IR (`xml_path` and its .bin) in fp32, the .xml written last."""
    ov = optional("openvino", "engines", "the OpenVINO engine")
    return _save_openvino(ov.convert_model(str(onnx_path)), xml_path)


def to_int8(xml_path, inputs, int8_path) -> Path:
    """Quantize the OpenVINO graph at `xml_path` to int8 (NNCF's post-training quantization, its
    activation ranges taken on `inputs`, a numpy batch (N, ...) of what the graph will be given) into
    `int8_path`, written last like every graph. NNCF (the engines extra) is imported only here."""
    ov = optional("openvino", "engines", "the OpenVINO engine")
    nncf = optional("nncf", "engines", "int8 quantization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NNCF's notes on its torch backend, unused here
        model = nncf.quantize(ov.Core().read_model(str(xml_path)), nncf.Dataset([x[None] for x in inputs]),
                              subset_size=len(inputs), fast_bias_correction=True)
    return _save_openvino(model, int8_path)


def _save_openvino(model, xml_path) -> Path:
    ov = optional("openvino", "engines", "the OpenVINO engine")
    xml_path = Path(xml_path)
    # the pid in the name tells the next export whether the process writing it is gone
    with tempfile.TemporaryDirectory(dir=xml_path.parent, prefix=f".ov{os.getpid()}-") as tmp:
        ov.save_model(model, str(Path(tmp) / xml_path.name), compress_to_fp16=False)
        os.replace(Path(tmp) / xml_path.with_suffix(".bin").name, xml_path.with_suffix(".bin"))
        os.replace(Path(tmp) / xml_path.name, xml_path)
    return _seal(xml_path)


def _seal(path: Path) -> Path:
    # last, once the graph's files are in place: only a whole graph has a digest that matches
    entries = file_entries(path.parent, [f.name for f in graph_files(path)])  # what embed.json and index.json vouch with
    atomic_write(digest_file(path), lambda tmp: tmp.write_text(json.dumps(entries)))
    return path


def _exported(path: Path, write) -> Path:
    # `path` when intact, else written by `write(path)`: silently where there was none yet
    if not intact(path):
        if any(f.exists() for f in graph_files(path)):
            warnings.warn(f"{path}: does not match the digest written when it was exported "
                          "(changed or unfinished); exporting it again")
        write(path)
    return path


# the temporary files of export_onnx and atomic_write (.NAME.tmpPID), to_openvino's folders (.ovPID-*)
_LEFTOVER = re.compile(r"\.(?:.+\.tmp([1-9][0-9]{0,8})|ov([1-9][0-9]{0,8})-.*)")


def _sweep(folder: Path) -> None:
    # Exports killed midway (kill -9, out of memory) leave their temporary files and folders: remove
    # those whose process is gone. Another running export keeps its own; a read-only folder keeps all.
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _LEFTOVER.fullmatch(path.name)
        if match and not process_alive(int(match[1] or match[2])):
            with contextlib.suppress(OSError):  # another export may be removing it too
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()


def cached_graph(model: CLIPModel, tower: str, part: str, folder, format: str = "onnx") -> Path:
    """The graph file of `tower`/`part` in `folder` (named by the weights' digest by the caller),
    exported (and converted) only when it is not there intact yet."""
    folder = Path(folder)
    _sweep(folder)

    def onnx() -> Path:  # OpenVINO's graph is converted from it
        return _exported(folder / graph_name(tower, part), lambda path: export_onnx(model, tower, part, path))
    if format == "onnx":
        return onnx()
    return _exported(folder / graph_name(tower, part, "openvino"), lambda path: to_openvino(onnx(), path))


def cached_int8_graph(xml_path, inputs) -> Path:
    """The int8 graph of the OpenVINO graph at `xml_path`, calibrated on the numpy batch `inputs`
    (`to_int8`), cached beside it as NAME.int8-<digest of the inputs>.xml: quantized again only for
    other inputs, or when its files no longer match their digest."""
    xml_path = Path(xml_path)
    key = hashlib.sha256(inputs.tobytes() + str(inputs.shape).encode()).hexdigest()[:16]
    return _exported(xml_path.with_name(f"{xml_path.stem}.int8-{key}.xml"),
                     lambda path: to_int8(xml_path, inputs, path))


def export_run(checkpoint, format: str = "onnx", model: CLIPModel | None = None) -> list[Path]:
    """Write (or find cached) every graph of the saved model in `checkpoint` (a folder, or a Hub
    id: its snapshot in the Hub cache, where the graphs go too) -> their paths."""
    checkpoint = model_folder(checkpoint)
    model = model or CLIPModel.from_pretrained(checkpoint)
    folder = engines_folder(checkpoint)
    return [cached_graph(model, tower, part, folder, format) for tower in TOWERS for part in PARTS]
