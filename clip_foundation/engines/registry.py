"""One engine choice for every embedding: torch, ONNX Runtime or OpenVINO.

On a CPU the exported graphs of `export.py` encode 3-4x faster than torch (benchmarks/encode_speed.py,
docs/results.md). Every embedding path asks `encoder_of(model)` for its `Encoder`: evaluation, index
building, zero-shot, the gallery and the page through `retrieval.embed_images` / `embed_texts`, and
training's frozen-tower features through `features.py` (`tower_encoder`). A command line picks the
engine with `--engine=NAME` (`engine_names()`); `use_engine(model, engine, folder)` attaches it to a
loaded model. Each engine is one `Encoder` class in `ENCODERS`, added by `register_engine` and looked up
only in `engine_class`: its name, the graph format it runs, the package it needs and its rank for
`auto`. `auto` is torch on a GPU and the best-ranked installed graph engine on a CPU (OpenVINO, then
ONNX Runtime), torch when none is. A graph is served only as exported (its digest, see
`export.py`) and is checked against torch on the adapter's example inputs when first loaded; an
export or a check that fails falls back to torch with one warning line. A check made against the
weights as read from the run's file is recorded beside the graph (`export.vouch`): a model that has not
read that tower yet (`lazy.load_model`) is then served the intact graph without reading the tower at all.
Training steps always run in torch: only inference on fixed weights uses another engine.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from clipModel import CLIPModel, to_model_input

from clip_foundation.engines.export import (cached_graph, cached_int8_graph, engines_folder, graph, vouch, vouched,
                                            weights_digest)
from clip_foundation.engines.lazy import LazyModel
from clip_foundation.engines.saved import BF16_COSINE, INT8_COSINE, TOLERANCE, runtime_text, signal_stack_kept
from clip_foundation.common import cpu
from clip_foundation.common.extras import optional
from clip_foundation.common.modes import eval_mode, image_layout

CALIBRATION_IMAGES = 128  # images an int8 graph is calibrated on: dev recall as with NNCF's default 300, in less time
PRECISION_ENV = "CLIP_ENGINE_PRECISION"  # at most this precision for the image tower: fp32, bf16, or auto (int8 where it pays)
CPU_IMAGE_BATCH = 32  # Lite0 on 2 cores: 8,841 minor page faults per image at 32, 12,278 at 128 (channels-last)

ENCODERS: dict[str, type[Encoder]] = {}  # --engine NAME -> its Encoder class, in the order they were registered


def register_engine(cls: type[Encoder]) -> type[Encoder]:
    """Add the Encoder subclass `cls` as `--engine=cls.name` (a class decorator): every command's
    --engine, its help and `auto` (with a `rank`) then know it."""
    ENCODERS[cls.name] = cls
    return cls


def engine_names() -> tuple[str, ...]:
    """What --engine accepts: auto, then every registered engine."""
    return ("auto", *ENCODERS)


def engine_class(name: str) -> type[Encoder]:
    """The Encoder class of the registered engine `name` (the one place an engine is looked up);
    ValueError naming the engines there are otherwise."""
    if name not in ENCODERS:
        raise ValueError(f"--engine={name!r}: must be {' | '.join(engine_names())}")
    return ENCODERS[name]


def installed(name: str) -> bool:
    """Whether the package the engine `name` needs can be imported here."""
    package = engine_class(name).package
    return package is None or importlib.util.find_spec(package) is not None


def auto_order() -> list[str]:
    """The engines `auto` tries on a CPU, best first (those with a `rank`)."""
    return sorted((name for name, cls in ENCODERS.items() if cls.rank is not None), key=lambda name: ENCODERS[name].rank)


def resolve(engine: str, device) -> str:
    """The engine `engine` ("auto" or a name) means on `device`: auto is torch off the CPU and the
    first of `auto_order()` installed on it (torch when none is)."""
    if engine != "auto":
        return engine
    if torch.device(device).type != "cpu":
        return Encoder.name
    return next((name for name in auto_order() if installed(name)), Encoder.name)


def engine_help(purpose: str = "encodes") -> str:
    """--engine's help line, listing the engines registered now."""
    cpu = ", then ".join(auto_order())
    auto = f"auto ({cpu} on a CPU; torch on a GPU)" if cpu else "auto (torch)"
    return f"{purpose}: {' | '.join((auto, *ENCODERS))}"


def export_formats() -> tuple[str, ...]:
    """The graph formats the registered engines run: what `python -m clip_foundation.export --format` writes."""
    return tuple(sorted({cls.format for cls in ENCODERS.values() if cls.format}))


@register_engine
class Encoder:
    """Encodes with the torch model: `encode_images(uint8 or normalised images (N, 3, S, S))` and
    `encode_texts(input_ids, attention_mask)` -> (N, D) normalised embeddings (`part="embed"`) or the
    towers' own features (`part="features"`), float32 on the model's device.

    An engine is a subclass registered with `register_engine`; its class attributes say what differs."""
    name = "torch"  # --engine=NAME
    format = None  # the exported graph it runs (export.cached_graph: onnx | openvino); None: the torch model
    package = None  # the module it imports, checked before use (None: nothing beyond torch)
    extra = None  # the clip-foundation extra that installs `package`
    rank = None  # auto's order on a CPU, lowest first; None: auto never picks it

    def __init__(self, model: CLIPModel, part: str = "embed", folder=None):
        self.model, self.part = model, part  # `folder` (where graphs are cached) is for graph engines
        self.source = None  # the checkpoint whose weights the graphs in `folder` are of (use_engine sets it)
        self.calibration = None  # uint8 images (N, 3, S, S) like those to encode: allows an int8 image tower

    @classmethod
    def precision(cls, tower: str, calibrated: bool = False) -> str:
        """The precision this engine runs `tower` in on this machine: fp32, or bf16 / int8 where it pays.
        `calibrated`: the inputs to encode are at hand, a frozen tower's features while training (an image
        tower can then be quantized on them to int8)."""
        return "fp32"

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Images, uint8 (decoded) or float (normalised), in batches of `batch_size` (at most 32 on
        a CPU, where larger batches spend their time in page faults)."""
        if self.model.device.type == "cpu":
            batch_size = min(batch_size, CPU_IMAGE_BATCH)
        cfg, out = self.model.config.image, []
        with self._image_context() as layout:
            for s in range(0, len(images), batch_size):
                x = images[s:s + batch_size].to(self.model.device)
                x = to_model_input(x, cfg.mean, cfg.std) if x.dtype == torch.uint8 else x.float()
                out.append(self._run("image", (x.contiguous(memory_format=layout),)).float())
        return torch.cat(out).to(self.model.device)

    @torch.no_grad()
    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and attention mask (B, T) -> (B, D)."""
        ids, mask = input_ids.to(self.model.device), attention_mask.to(self.model.device)
        return self._run("text", (ids, mask)).float().to(self.model.device)

    def _image_context(self):
        return image_layout(self.model)  # the tower's own memory format (channels-last for timm)

    def _run(self, tower: str, inputs: tuple) -> torch.Tensor:
        module = getattr(self.model, f"{tower}_encoder")
        if self.part == "features":
            return module(*inputs)
        project = self.model.project_image if tower == "image" else self.model.project_text
        return project(module(*inputs))


class GraphEncoder(Encoder):
    """An exported graph per tower, loaded (exported first if need be) on first use and checked
    against torch; a tower whose export, load or check fails is encoded by torch, with a warning.
    A graph engine sets `format` and implements `load` and `infer`."""
    format, extra = "onnx", "engines"

    def __init__(self, model: CLIPModel, part: str = "embed", folder=None):
        super().__init__(model, part, folder)
        self.folder = Path(folder) if folder else _temporary_folder()
        self.graphs: dict[str, object] = {}  # tower -> a loaded graph, or None: torch for that tower

    def _image_context(self):
        return contextlib.nullcontext(torch.contiguous_format)

    def _run(self, tower: str, inputs: tuple) -> torch.Tensor:
        if tower not in self.graphs:
            self.graphs[tower] = self._checked(tower)
        loaded = self.graphs[tower]
        if loaded is None:  # torch, in the contiguous layout
            return super()._run(tower, inputs)
        arrays = [x.detach().cpu().contiguous().numpy() for x in inputs]
        return torch.from_numpy(self.infer(loaded, arrays))

    def _checked(self, tower: str):
        # A tower not in memory yet can only be read from the checkpoint these graphs are of: checked against
        # those weights, a graph is vouched for (export.vouch), and while it is intact it serves this tower
        # without the check, so its torch weights are never read. A tower in memory (trained, edited) is checked.
        from_file = (self.part == "embed" and self.source is not None and isinstance(self.model, LazyModel)
                     and not self.model.has_tower(tower) and self.model.reads(self.source))
        try:
            precision = self.precision(tower, calibrated=self._calibrated(tower))
            path = cached_graph(self.model, tower, self.part, self.folder, self.format)
            photos = None
            if precision == "int8":  # quantized on, and checked on, images like those it will encode
                cfg = self.model.config.image
                photos = to_model_input(self.calibration, cfg.mean, cfg.std).contiguous()
                path = cached_int8_graph(path, photos.numpy())
            stat = path.stat()
            memo = (type(self), str(path), stat.st_size, stat.st_mtime_ns, precision)
            if self.part == "features" and memo in _CHECKED:  # checked in this process (the split before)
                return _CHECKED[memo]
            loaded = self.load(path, precision)
            if from_file and vouched(path, self.runtime(precision)):
                return loaded  # before anything touches the tower: reading it is what a vouched graph saves
            module, example, _ = graph(self.model, tower, self.part)
            if photos is not None:
                example = (photos[:8],)
            with eval_mode(module), torch.no_grad():
                expected = module(*(x.to(self.model.device) for x in example)).float().cpu()
            got = torch.from_numpy(self.infer(loaded, [x.numpy() for x in example]))
            if got.shape != expected.shape:
                raise ValueError(f"outputs of shape {tuple(got.shape)}, torch's {tuple(expected.shape)}")
            if precision == "fp32" and not torch.allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE):
                raise ValueError(f"outputs differ from torch's by up to {(got - expected).abs().max().item():.2g}")
            cosines = torch.nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1))
            cosine = cosines.min().item()
            if precision == "bf16" and not cosine >= BF16_COSINE:  # rounding, not a wrong graph
                raise ValueError(f"{precision} outputs' cosine with torch's is {cosine:.4f} (< {BF16_COSINE})")
            if precision == "int8" and not cosines.mean().item() >= INT8_COSINE:
                raise ValueError(f"int8 outputs' mean cosine with torch's is {cosines.mean().item():.4f} (< {INT8_COSINE})")
            if from_file:
                vouch(path, self.runtime(precision), {"max_diff": (got - expected).abs().max().item(), "cosine": cosine})
            if self.part == "features":  # a frozen tower's graph: the folder is named by its weights' digest
                if len(_CHECKED) >= 4:
                    del _CHECKED[next(iter(_CHECKED))]
                _CHECKED[memo] = loaded
            return loaded
        except Exception as e:  # noqa: BLE001 - any failure of a foreign toolchain: torch still works
            warnings.warn(f"{self.name} engine: cannot use the {tower} tower's graph "
                          f"({' '.join(str(e).split())[:300]}); encoding it with torch", stacklevel=2)
            return None

    def _calibrated(self, tower: str) -> bool:
        return self.part == "features" and (tower == "text" or self.calibration is not None)

    def load(self, path: Path, precision: str = "fp32"):
        """The graph file at `path`, ready to run in `precision` (what `precision(tower)` said)."""
        raise NotImplementedError

    def runtime(self, precision: str = "fp32") -> str:
        """This engine, the versions its outputs depend on, the precision it runs in and what the check asks of
        it: a check vouches for a graph under these only."""
        version = getattr(importlib.import_module(self.package), "__version__", "?") if self.package else ""
        return runtime_text(self.name, version, torch.__version__, precision)

    def infer(self, loaded, arrays: list):
        """Run a loaded graph on numpy inputs -> its numpy output."""
        raise NotImplementedError


_CHECKED: dict = {}  # (engine, graph file, its size and mtime, precision) -> that graph loaded and checked, the last 4


def _temporary_folder() -> Path:
    """A folder for graphs that have no cache to go to, removed when the interpreter exits."""
    import atexit
    import shutil
    folder = tempfile.mkdtemp(prefix="clip-engines-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


@register_engine
class OpenVINOEncoder(GraphEncoder):
    """OpenVINO IR compiled for the CPU with torch's thread count, the image tower in the fastest
    precision that keeps dev recall (docs/results.md), picked by what the CPU has:
    - int8 on CPUs with int8 dot-product units (AVX-512 VNNI, AVX-VNNI, AMX), where calibration images
      are given (frozen-tower features while training): 1.7x bf16's images/s, the same dev recall;
    - bf16 on CPUs with bf16 units (AVX-512 BF16, AMX): ~2x fp32's images/s, each embedding within a
      cosine of 0.9995 of torch's;
    - fp32 elsewhere.
    The text tower runs in bf16 on CPUs with bf16 units while it encodes a frozen tower's features
    (1.4x fp32's captions/s, each embedding within a cosine of 0.9999 of fp32's), fp32 otherwise.
    `CLIP_ENGINE_PRECISION=bf16` (or `fp32`) caps both."""
    name, format, package = "openvino", "openvino", "openvino"
    rank = 1  # Lite2 on 2 cores: 24.1 images/s, the fastest (torch 5.6)

    @classmethod
    def precision(cls, tower: str, calibrated: bool = False) -> str:
        cap = os.environ.get(PRECISION_ENV, "auto")
        if cap == "fp32" or not installed(cls.name):
            return "fp32"
        if tower == "text":
            return "bf16" if calibrated and _cpu_has("bf16") else "fp32"
        if calibrated and cap == "auto" and _cpu_has("vnni") and importlib.util.find_spec("nncf"):
            return "int8"
        return "bf16" if _cpu_has("bf16") else "fp32"

    def load(self, path, precision: str = "fp32"):
        ov = optional("openvino", "engines", "the OpenVINO engine")
        with signal_stack_kept():  # an int8 graph's other layers run in bf16 where the CPU has it
            return ov.Core().compile_model(str(path), "CPU", {
                "INFERENCE_PRECISION_HINT": "bf16" if precision != "fp32" and _cpu_has("bf16") else "f32",
                "INFERENCE_NUM_THREADS": torch.get_num_threads()})

    def infer(self, loaded, arrays):
        return loaded(arrays)[0]


def _cpu_has(unit: str) -> bool:
    """Whether this CPU has `unit`, asked once: "bf16" as OpenVINO finds it (AVX-512 BF16 or AMX), others
    ("vnni": int8 dot products) from the CPU's flags (`common.cpu`)."""
    if unit not in _UNITS:
        if unit == "bf16":
            ov = optional("openvino", "engines", "the OpenVINO engine")
            _UNITS[unit] = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        else:
            _UNITS[unit] = cpu.has(unit)
    return _UNITS[unit]


_UNITS: dict[str, bool] = {}  # unit -> whether this CPU has it


@register_engine
class OnnxRuntimeEncoder(GraphEncoder):
    """ONNX graphs run by ONNX Runtime on the CPU, with torch's thread count."""
    name, format, package = "onnxruntime", "onnx", "onnxruntime"
    rank = 2  # Lite2 on 2 cores: 16.9 images/s (torch 5.6)

    def load(self, path, precision: str = "fp32"):
        ort = optional("onnxruntime", "engines", "the ONNX Runtime engine")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def infer(self, loaded, arrays):
        names = [i.name for i in loaded.get_inputs()]
        return loaded.run(None, dict(zip(names, arrays)))[0]


def make_encoder(model: CLIPModel, engine: str = "auto", folder=None, part: str = "embed",
                 calibration=None) -> Encoder:
    """The `Encoder` of `engine` for `model` (graphs cached in `folder`; a temporary one if None;
    `calibration`: see `Encoder`). An engine whose package is missing is torch, with one warning line."""
    name = resolve(engine, model.device)
    cls = engine_class(name)
    if not installed(name):
        how = f'"clip-foundation[{cls.extra}]"' if cls.extra else cls.package
        warnings.warn(f"the {name} engine needs the optional package {cls.package}: "
                      f"pip install {how}; encoding with torch", stacklevel=2)
        cls = Encoder
    encoder = cls(model, part, folder)
    encoder.calibration = calibration  # set, not passed: an engine registered from outside keeps its signature
    return encoder


def use_engine(model: CLIPModel, engine: str = "auto", checkpoint=None) -> Encoder:
    """Make every embedding of the (loaded, not training) `model` go through `engine`; its graphs
    are cached in CHECKPOINT/engines/<weights digest> (or the user's cache when that folder cannot
    be written). -> the Encoder now attached."""
    folder = None
    if checkpoint is not None and engine_class(resolve(engine, model.device)).format:
        folder = engines_folder(checkpoint)  # where `python -m clip_foundation.export` writes them too
    model._clip_encoder = make_encoder(model, engine, folder)
    model._clip_encoder.source = checkpoint
    return model._clip_encoder


def encoder_of(model: CLIPModel) -> Encoder:
    """The Encoder attached by `use_engine`, or torch's."""
    return getattr(model, "_clip_encoder", None) or Encoder(model)


def tower_encoder(model: CLIPModel, engine: str, cache_dir, tower: str, calibration=None) -> Encoder:
    """An Encoder of the towers' own features (frozen-tower training), its graphs cached under
    CACHE_DIR/engines/TOWER-<digest of its weights and config> (only that tower is encoded with it):
    the same weights at another input size or pooling trace another graph. `calibration`: uint8 images
    like those to encode, which let an engine run the image tower in int8 (`Encoder.precision`)."""
    module = getattr(model, f"{tower}_encoder")
    config = json.dumps(asdict(getattr(model.config, tower)), sort_keys=True)
    digest = hashlib.sha256((weights_digest(module) + config).encode()).hexdigest()
    folder = Path(cache_dir) / "engines" / f"{tower}-{digest[:16]}" if cache_dir else None
    return make_encoder(model, engine, folder, part="features", calibration=calibration)
