"""Exported graphs: every tower kind, with and without its projection head, gives torch's outputs
at any batch size and caption length; graphs are cached by the weights' digest."""
import pytest
import torch

from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig
from conftest import TINY_CAPTIONS

pytestmark = [pytest.mark.slow,  # exports and compiles ONNX / OpenVINO graphs: seconds each
              pytest.mark.usefixtures("real_engines")]

ort = pytest.importorskip("onnxruntime", reason="needs the engines extra")
SCRATCH_TEXT = TextEncoderConfig(kind="scratch", pooling="mean", width=32, depth=1, heads=2, vocab_size=64)


def tiny_model(kind: str, hf_root=None) -> CLIPModel:
    torch.manual_seed(0)
    if kind == "hf":
        config = CLIPConfig(image=ImageEncoderConfig(kind="hf", name=str(hf_root / "vit")),
                            text=TextEncoderConfig(kind="hf", name=str(hf_root / "bert")), projection_dim=16)
    else:
        timm_name = {"timm": "test_efficientnet", "timm side by side": "test_efficientnet+test_resnet"}.get(kind)
        image = (ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=1, heads=2) if kind == "scratch" else
                 ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=2, heads=2, merge_after=1)
                 if kind == "scratch merging tokens" else
                 ImageEncoderConfig(kind="timm", name=timm_name, pretrained=False, image_size=64, pool_blocks=2))
        config = CLIPConfig(image=image, text=SCRATCH_TEXT, projection_dim=16)
    return CLIPModel(config, captions=TINY_CAPTIONS * 3).eval()


def inputs(model: CLIPModel, tower: str) -> tuple[torch.Tensor, ...]:
    """A batch and a caption length other than the traced example's."""
    if tower == "image":
        S = model.config.image.image_size
        return (torch.randn(5, 3, S, S),)
    tokens = model.tokenize(TINY_CAPTIONS + ["a star"])
    return tokens["input_ids"], tokens["attention_mask"]


@pytest.mark.parametrize("kind", ["scratch", "scratch merging tokens", "timm", "timm side by side", "hf"])
def test_exported_graphs_give_torchs_outputs(kind, tiny_hf, tmp_path):
    from clip_foundation.engines.export import export_onnx, graph
    model = tiny_model(kind, tiny_hf)
    for tower in ("image", "text"):
        for part in ("embed", "features"):
            path = export_onnx(model, tower, part, tmp_path / f"{tower}-{part}.onnx")
            module, _, axes = graph(model, tower, part)
            x = inputs(model, tower)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {name: v.numpy() for name, v in zip(axes, x)})[0])
            with torch.no_grad():
                expected = module(*x)
            if part == "embed":
                torch.testing.assert_close(expected, (model.encode_image(*x) if tower == "image" else
                                                      model.encode_text(*x)).detach())
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_openvino_ir_gives_torchs_outputs(tmp_path):
    pytest.importorskip("openvino", reason="needs the engines extra")
    from clip_foundation.engines.registry import OpenVINOEncoder
    from clip_foundation.engines.export import export_onnx, to_openvino
    model = tiny_model("scratch")
    xml = to_openvino(export_onnx(model, "text", "embed", tmp_path / "text.onnx"), tmp_path / "text.xml")
    assert xml.with_suffix(".bin").is_file()
    compiled = OpenVINOEncoder(model).load(xml)  # compiled as the engine compiles it (fp32)
    x = inputs(model, "text")
    with torch.no_grad():
        expected = model.encode_text(*x)
    torch.testing.assert_close(torch.from_numpy(compiled([v.numpy() for v in x])[0]), expected, atol=1e-4, rtol=1e-4)


def test_export_command_writes_each_graph_once_beside_the_run(tmp_path, capsys):
    from clip_foundation.engines.command import main
    from clip_foundation.engines.export import run_engines_folder
    from clip_foundation.common.files import model_digest
    run = tiny_model("scratch").save_pretrained(tmp_path / "run")
    paths = main([str(run)])
    assert sorted(p.name for p in paths) == ["image.onnx", "image_tower.onnx", "text.onnx", "text_tower.onnx"]
    assert {p.parent for p in paths} == {run_engines_folder(run)} == {run / "engines" / model_digest(run)[:16]}
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert main([str(run)]) == paths and [p.stat().st_mtime_ns for p in paths] == stamps  # cached: not exported again


def test_export_command_refuses_an_unknown_format(tmp_path, capsys):
    from clip_foundation.engines.command import main
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--format=tensorrt"])
    assert "--format='tensorrt': must be onnx | openvino" in capsys.readouterr().err


def test_weights_digest_follows_the_weights():
    from clip_foundation.engines.export import weights_digest
    model = tiny_model("scratch")
    before = weights_digest(model.image_encoder)
    assert weights_digest(model.image_encoder) == before != weights_digest(model.text_encoder)
    with torch.no_grad():
        next(model.image_encoder.parameters())[0].add_(1e-3)
    assert weights_digest(model.image_encoder) != before
