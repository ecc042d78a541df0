"""Cached engine graphs are served only as exported: each carries the sha256 of its files, checked
on load, and one that changed is exported again (one warning line); killed exports leave nothing
for long; Ctrl-C is one line; a read-only run exports into the user cache the engines read."""
import errno
import importlib.util
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from clip_foundation.common import cli
from clip_foundation.engines import registry as engines
from clip_foundation.engines import command as export_command
from clip_foundation.engines import export
from clip_foundation.evaluate.metrics import embed_texts
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
    paths = export_command.main([str(run)])
    image = paths[0]
    image.write_bytes(image.read_bytes()[:1000])
    stamps = {p: p.stat().st_mtime_ns for p in paths[1:]}
    with pytest.warns(UserWarning, match="image.onnx: does not match the digest"):
        assert export_command.main([str(run)]) == paths
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


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.mark.slow  # exports the graphs
def test_an_export_sweeps_what_dead_exports_left(run):
    folder = export.run_engines_folder(run)
    paths = export_command.main([str(run)])
    dead, alive = _dead_pid(), os.getppid()
    (folder / f".ov{dead}-k2j1x9").mkdir()
    (folder / f".ov{dead}-k2j1x9" / "text.bin").write_bytes(b"\0" * 100)
    (folder / f".text.onnx.tmp{dead}").write_bytes(b"half")
    (folder / f".text.onnx.sha256.json.tmp{dead}").write_bytes(b"{")
    (folder / f".image.onnx.tmp{alive}").write_bytes(b"another export, still running")
    (folder / "notes.txt").write_text("the user's")
    assert export_command.main([str(run)]) == paths
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [f".image.onnx.tmp{alive}"]
    assert (folder / "notes.txt").is_file()


KILLED_EXPORT = """
import os, signal, sys
import {module} as tool
real = tool.{function}

def killed(*args, **kwargs):  # the temporary file is written, then the process dies as kill -9 leaves it
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

tool.{function} = killed
from clip_foundation.engines import command
command.main([{run!r}, "--format={format}"])
"""


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("format, module, function", [("onnx", "torch.onnx", "export"),
                                                      ("openvino", "openvino", "save_model")])
def test_kill_9_during_an_export_leaves_nothing_after_the_next(format, module, function, run):
    if format == "openvino" and not HAS_OPENVINO:
        pytest.skip("needs openvino (the engines extra)")
    script = KILLED_EXPORT.format(module=module, function=function, run=str(run), format=format)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    folder = export.run_engines_folder(run)
    assert [p for p in folder.iterdir() if p.name.startswith(".")]  # what the killed export left
    paths = export.export_run(run, format)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert all(export.intact(p) for p in paths)


def test_ctrl_c_during_an_export_is_one_line_and_status_130(run, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(export, "export_onnx", interrupted)
    try:
        export_command.main([str(run)])
    except BaseException as e:  # noqa: BLE001 - a KeyboardInterrupt let through would stop the whole session
        raised = e
    assert isinstance(raised, SystemExit) and raised.code == 130
    assert capsys.readouterr() == ("", "interrupted\n")


@pytest.mark.slow  # exports the graphs
def test_a_read_only_run_exports_into_the_user_cache_the_engines_read(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_mkdir = Path.mkdir

    def read_only(path, *args, **kwargs):
        if path.is_relative_to(run):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", read_only)
    paths = export_command.main([str(run)])
    folder = tmp_path / "cache" / "clip-foundation" / "engines" / export.run_engines_folder(run).name
    assert {p.parent for p in paths} == {folder} and all(export.intact(p) for p in paths)
    out = capsys.readouterr()
    assert out.out.split() == [str(p) for p in paths]
    assert out.err == f"{run} cannot be written: the graphs are in the user cache, {folder}\n"
    stamps = [p.stat().st_mtime_ns for p in paths]
    model = tiny_model("scratch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engines.use_engine(model, "onnxruntime", run).folder == folder
        embed_texts(model, TINY_CAPTIONS)
    assert [p.stat().st_mtime_ns for p in paths] == stamps  # the exported graphs are the ones served
