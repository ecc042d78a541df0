"""Cached engine graphs are served only as exported: each carries the sha256 of its files, checked
on load, and one that changed is exported again (one warning line)."""
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from clip_foundation import cli, engines, export
from clip_foundation.retrieval import embed_texts
from conftest import TINY_CAPTIONS
from test_export import tiny_model

pytest.importorskip("onnxruntime", reason="needs the engines extra")
pytestmark = pytest.mark.usefixtures("real_engines")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
GRAPH_ENGINES = ["onnxruntime"] + ["openvino"] * HAS_OPENVINO
FORMAT = {"onnxruntime": "onnx", "openvino": "openvino"}


@pytest.fixture
def run(tmp_path):
    return tiny_model("scratch").save_pretrained(tmp_path / "run")


def unseen_token(model) -> int:
    """A token of TINY_CAPTIONS that the load check's example inputs never feed."""
    _, (example_ids, _), _ = export.graph(model, "text")
    ids = set(model.tokenize(TINY_CAPTIONS)["input_ids"].flatten().tolist())
    return min(ids - set(example_ids.flatten().tolist()) - {0})


def edit_token_row(weights: Path, model, token: int) -> None:
    """Change one row of the token embedding inside a graph's weights, bytes in place."""
    embedding = next(m for m in model.text_encoder.modules() if isinstance(m, torch.nn.Embedding))
    row = embedding.weight[token].detach().numpy()
    data = weights.read_bytes()
    assert data.count(row.tobytes()) == 1, "the row is not stored once as raw float32"
    weights.write_bytes(data.replace(row.tobytes(), row[::-1].tobytes()))  # not a shift: a layer norm undoes those


def damage(graph: Path, how: str, model) -> None:
    weights = graph.with_suffix(".bin") if graph.suffix == ".xml" else graph
    if how == "an edited weight":
        edit_token_row(weights, model, unseen_token(model))
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:  # exported by a version that wrote no digest
        export.digest_file(graph).unlink()


@pytest.mark.slow  # exports and compiles graphs: seconds each
@pytest.mark.parametrize("how", ["an edited weight", "truncated", "without its digest"])
@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_a_changed_cached_graph_is_exported_again_with_one_warning(engine, how, run):
    model = tiny_model("scratch")
    with torch.no_grad():
        expected = embed_texts(model, TINY_CAPTIONS)
    (text,) = [p for p in export.export_run(run, FORMAT[engine]) if p.name.startswith("text.")]
    damage(text, how, model)
    engines.use_engine(model, engine, run)
    with pytest.warns(UserWarning) as caught:
        got = embed_texts(model, TINY_CAPTIONS)
    assert [str(w.message) for w in caught] == [
        f"{text}: does not match the digest written when it was exported (changed or unfinished); exporting it again"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # the graph's, not torch's fallback:
    assert engines.encoder_of(model).graphs["text"] is not None
    assert export.intact(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # intact now: loaded without a word
        engines.use_engine(model, engine, run)
        embed_texts(model, TINY_CAPTIONS)


@pytest.mark.slow
def test_the_export_command_exports_a_truncated_graph_again(run, capsys):
    paths = export.main([str(run)])
    image = paths[0]
    image.write_bytes(image.read_bytes()[:1000])
    stamps = {p: p.stat().st_mtime_ns for p in paths[1:]}
    with pytest.warns(UserWarning, match="image.onnx: does not match the digest"):
        assert export.main([str(run)]) == paths
    assert export.intact(image) and image.stat().st_size > 1000
    assert {p: p.stat().st_mtime_ns for p in paths[1:]} == stamps  # the intact ones are kept


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPENVINO, reason="needs openvino (the engines extra)")
def test_a_garbage_openvino_graph_is_one_warning_line_and_never_parsed(run, capfd):
    model = tiny_model("scratch")
    (xml,) = [p for p in export.export_run(run, "openvino") if p.name == "text.xml"]
    xml.write_text("garbage <<<>")
    capfd.readouterr()
    with cli.reported_warnings():
        engines.use_engine(model, "openvino", run)
        embed_texts(model, TINY_CAPTIONS)
    err = capfd.readouterr().err  # OpenVINO's parsers write to the process's stderr itself
    assert err.splitlines() == [f"warning: {xml}: does not match the digest written when it was exported "
                                "(changed or unfinished); exporting it again"]
