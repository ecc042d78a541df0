"""A text query from the shell is answered without torch (search/quick.py) exactly as the full path answers it:
the same paths and scores, with and without a querybank, byte for byte from a fresh process; anything it cannot
serve as checked falls back to the full path (changed weights, a changed graph, a changed dataset file, a
tampered index, other options), which mends what it found; digests of large files are kept across commands
only under the file's unchanged identity."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_foundation.common import cli, files
from clip_foundation.engines import registry, saved
from clip_foundation.evaluate import querybank
from clip_foundation.search import cached, quick
from clip_foundation.search import command as search
from conftest import REAL_AUTO_ORDER

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["a red circle", "a small blue square on the left", "two green triangles", "a yellow star"]
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="needs the engines extra")


@pytest.fixture(scope="module")
def answered(tiny_run, tmp_path_factory):
    """A copy of the tiny run and of its dataset (the run's config names the copy) after one query of the full
    path: its index, its text graph checked against its weights, its records memo."""
    data, run_dir, _ = tiny_run
    root = tmp_path_factory.mktemp("quick")
    run, copy = root / "run", root / "data"
    shutil.copytree(data, copy)
    run.mkdir()
    for f in run_dir.iterdir():
        if f.is_file() and f.suffix in (".json", ".safetensors") and f.name != "metrics.json":
            shutil.copy2(f, run / f.name)
    config = json.loads((run / "config.json").read_text())
    config["data"]["path"] = str(copy)
    (run / "config.json").write_text(json.dumps(config))
    if HAS_ORT:
        search.main(argv_of(run, "a red circle", "--json"))
    return run


@pytest.fixture
def make_run(answered, tmp_path):
    """-> make(bank=True, own_data=False): a private copy of `answered` (its graph still vouched for), with or
    without its querybank, reading a private copy of the dataset if asked (its index and memo then stale)."""
    def make(bank: bool = True, own_data: bool = False) -> Path:
        run = tmp_path / "run"
        shutil.copytree(answered, run)
        if own_data:
            config = json.loads((run / "config.json").read_text())
            shutil.copytree(config["data"]["path"], tmp_path / "data")
            config["data"]["path"] = str(tmp_path / "data")
            (run / "config.json").write_text(json.dumps(config))
        if not bank:
            (run / querybank.FILE).unlink()
        return run
    return make


def argv_of(run, query="a red circle", *extra):
    return [query, f"--checkpoint={run}", "-n", "20", "--engine=onnxruntime", "--device=cpu", *extra]


def full(argv, capsys) -> str:
    search.main(argv)
    return capsys.readouterr().out


def served(argv, capsys) -> str | None:
    """What the quick path printed, or None where it left the query to the full path (having printed nothing)."""
    status = quick.answer(argv)
    out, err = capsys.readouterr()
    if status is None:
        assert out == "" and err == ""
        return None
    assert status == 0
    return out


def assert_same(quick_out: str, full_out: str) -> None:
    got, expected = json.loads(quick_out), json.loads(full_out)
    assert [m["path"] for m in got["matches"]] == [m["path"] for m in expected["matches"]]
    torch.testing.assert_close(torch.tensor([m["score"] for m in got["matches"]]),
                               torch.tensor([m["score"] for m in expected["matches"]]), atol=1e-4, rtol=0)
    assert got["query"] == expected["query"] and got["missing"] == expected["missing"]


# ---------------------------------------------------------------- the same answer

@needs_ort
@pytest.mark.parametrize("bank", [True, pytest.param(False, marks=pytest.mark.slow)])  # slow: another index built
def test_the_quick_path_answers_as_the_full_path(make_run, bank, capsys):
    run = make_run(bank, own_data=True)
    assert served(argv_of(run, "a red circle", "--json"), capsys) is None  # nothing kept for it yet: the full path
    for query in QUERIES[:2]:
        argv = argv_of(run, query, "--json")
        expected = full(argv, capsys)  # its index, graph and records memo: kept for the next query
        got = served(argv, capsys)
        assert got is not None, query
        assert_same(got, expected)
    assert served(argv_of(run, query), capsys) == full(argv_of(run, query), capsys)  # the lines, to 4 places
    meta = json.loads((run / "index" / f"images-{cached.RecordsMemo.load(run, 'test')['paths'][:16]}.json").read_text())
    assert bool(meta.get("querybank")) == bank and len(json.loads(got)["matches"]) == 20


@pytest.mark.slow  # fresh interpreters (the full path's imports torch: seconds)
@needs_ort
def test_a_query_from_the_shell_imports_no_torch_and_prints_what_the_full_path_prints(make_run, capsys):
    run = make_run()
    argv = argv_of(run, "a small blue square on the left")
    full(argv, capsys)  # the index, the graph checked against the weights and the memo
    wrapper = ("import atexit, runpy, sys\n"
               "atexit.register(lambda: print(' '.join(sorted(sys.modules)), file=sys.stderr))\n"
               "sys.argv = ['search.py', *sys.argv[1:]]\n"
               "runpy.run_path('search.py', run_name='__main__')")
    for extra in ([], ["--json"]):
        quick_run = subprocess.run([sys.executable, "-c", wrapper, *argv, *extra], capture_output=True, text=True,
                                   cwd=ROOT)
        full_run = subprocess.run([sys.executable, "-m", "clip_foundation.search.command", *argv, *extra],
                                  capture_output=True, text=True, cwd=ROOT)
        *said, modules = quick_run.stderr.splitlines()
        assert quick_run.returncode == full_run.returncode == 0, quick_run.stderr[-2000:] + full_run.stderr[-2000:]
        assert "torch" not in modules.split() and "clip_foundation.search.command" not in modules.split()
        assert quick_run.stdout == full_run.stdout and "\n".join(said) == full_run.stderr.rstrip("\n")
    empty = subprocess.run([sys.executable, "search.py", " \u200b ", f"--checkpoint={run}"], capture_output=True,
                           text=True, cwd=ROOT)
    said = "error: empty query: type some words to search for\n"
    assert (empty.returncode, empty.stdout, empty.stderr) == (1, "", said)  # without torch too: the full path's words


# ---------------------------------------------------------------- what it cannot serve, the full path does

def ready(run, capsys, query="a red circle") -> str:
    """The full path's answer, after which the quick path serves the same."""
    expected = full(argv_of(run, query, "--json"), capsys)
    assert_same(served(argv_of(run, query, "--json"), capsys), expected)
    return expected


@pytest.mark.slow  # exports the graph of the new weights
@needs_ort
def test_changed_weights_fall_back_and_the_index_is_rebuilt_for_them(make_run, capsys):
    from safetensors.torch import load_file, save_file
    run = make_run()
    ready(run, capsys)
    weights = load_file(run / "model.safetensors")
    weights["text_projection.fc.weight"] = weights["text_projection.fc.weight"].flip(0).contiguous()
    save_file(weights, run / "model.safetensors")
    assert served(argv_of(run, "a red circle", "--json"), capsys) is None
    expected = ready(run, capsys)
    model_id = files.model_digest(run)
    assert json.loads(next((run / "index").glob("images-*.json")).read_text())["model"] == model_id
    assert saved.vouched(run / "engines" / model_id[:16] / "text.onnx", quick_runtime("onnxruntime"))
    assert json.loads(expected)["matches"]


@pytest.mark.slow  # exports the graph again
@needs_ort
def test_a_changed_graph_falls_back_and_is_exported_again(make_run, capsys):
    run = make_run()
    ready(run, capsys)
    graph = saved.run_engines_folder(run) / "text.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    assert served(argv_of(run, "a red circle", "--json"), capsys) is None
    with pytest.warns(UserWarning, match="does not match the digest"):
        ready(run, capsys)
    assert saved.intact(graph)


@needs_ort
@pytest.mark.parametrize("change", ["a caption file's time", "a file added", "config.json"])
def test_a_changed_dataset_falls_back_and_its_records_are_read_again(make_run, capsys, change):
    run = make_run(own_data=True)
    ready(run, capsys)
    data = Path(json.loads((run / "config.json").read_text())["data"]["path"])
    if change == "a caption file's time":
        os.utime(data / "captions.csv", ns=(1, 1))
    elif change == "a file added":
        (data / "images" / "notes.txt").write_text("taken in 2024")
    else:
        (run / "config.json").write_text((run / "config.json").read_text() + "\n")
    assert served(argv_of(run, "a red circle", "--json"), capsys) is None
    ready(run, capsys)  # read again by the full path, and kept again


@pytest.mark.parametrize("extra", [["--grid"], ["--data=/somewhere"], ["--backend=exact"], ["--split=val", "-n", "0"],
                                   ["--engine=torch"], ["--device=cuda"], ["--help"], ["--skip_bad"], ["a 2nd query"]])
def test_other_options_are_left_to_the_full_path(extra, tmp_path):
    argv = argv_of(tmp_path, "a red circle", *extra)
    if extra[0] == "--split=val":
        assert quick.plain_query(argv).split == "val"  # a split it serves, when a memo of it is kept
    else:
        assert quick.plain_query(argv) is None and quick.answer(argv) is None
    assert quick.answer(["--image=photo.png", f"--checkpoint={tmp_path}"]) is None
    assert quick.answer(["a dog", f"--checkpoint={tmp_path}"]) is None  # no run there: the full path says so


@needs_ort
@pytest.mark.parametrize("tamper", ["rows", "description"])
def test_a_tampered_index_is_refused_and_rebuilt_as_before(make_run, capsys, tamper):
    run = make_run()
    expected = ready(run, capsys)
    meta_file = next((run / "index").glob("images-*.json"))
    if tamper == "rows":
        rows = meta_file.with_suffix(".safetensors")
        data = bytearray(rows.read_bytes())
        data[-3] ^= 0x40  # a float16 of the last row: the file still parses
        rows.write_bytes(bytes(data))
    else:
        meta_file.write_text(meta_file.read_text()[:-100])  # cut short: not JSON
    assert served(argv_of(run, "a red circle", "--json"), capsys) is None
    assert ready(run, capsys) == expected  # rebuilt whole by the full path, as a damaged cache always was


# ---------------------------------------------------------------- the pieces it shares with the full path

def quick_runtime(engine: str) -> str:
    return saved.runtime_text(engine, importlib.import_module(engine).__version__, quick._torch_version())


@pytest.mark.parametrize("argv", [
    ["a dog", "--checkpoint=R"], ["--checkpoint", "R", "a dog"], ["a dog", "--checkpoint=R", "-n", "5"],
    ["a dog", "--checkpoint=R", "-n=5", "--json"], ["a dog", "--checkpoint=R", "--json", "false"],
    ["--json", "a dog", "--checkpoint=R"], ["--checkpoint=R", "--", "-a dog"], ["a dog", "--checkpoint=R", "--n", "0"],
    ["--query=a cat", "a dog", "--checkpoint=R"], ["a dog", "--checkpoint=R", "--engine", "openvino", "--device=cpu"],
    ["a dog", "--checkpoint=R", "--split", "all", "--json=yes"], ["a dog", "--checkpoint", "--json"],
    ["a dog", "--checkpoint=R", "-n"], ["a dog", "--checkpoint=R", "-n", "1001"], ["a dog", "--checkpoint=R", "-x"],
    ["a dog", "--check=R"], ["a dog", "--checkpoint=R", "--json=maybe"], ["--checkpoint=R"],
    ["a", "b", "--checkpoint=R"]])
def test_a_plain_query_is_read_as_the_command_line_reads_it(argv):
    got = quick.plain_query(argv)
    try:
        expected = cli.parse(search.SearchConfig(), argv, "usage", positional=("query",))
        expected.validate()
    except (SystemExit, ValueError):
        assert got is None  # the full path's usage error
        return
    if got is not None:
        assert {k: getattr(expected, k) for k in vars(got)} == vars(got)
        assert all(getattr(expected, k) == getattr(search.SearchConfig(), k) for k in vars(expected)
                   if k not in vars(got))


def test_the_quick_path_knows_what_the_full_path_knows():
    assert list(quick.GRAPH_ENGINES) == REAL_AUTO_ORDER()
    assert all(registry.engine_class(name).format == fmt and registry.engine_class(name).package == name
               for name, fmt in quick.GRAPH_ENGINES.items())
    assert quick._torch_version() == torch.__version__
    assert {k: getattr(search.SearchConfig(), k) for k in vars(quick.PlainQuery())} == vars(quick.PlainQuery())
    assert cached.QUERYBANK_FILE == querybank.FILE
    if HAS_ORT:
        model = registry.OnnxRuntimeEncoder.__new__(registry.OnnxRuntimeEncoder)
        assert registry.OnnxRuntimeEncoder.runtime(model) == quick_runtime("onnxruntime")


@pytest.mark.slow  # fresh interpreters
@pytest.mark.parametrize("threads", [None, "1"])
def test_graphs_run_on_torch_s_threads(threads, monkeypatch):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    if threads:
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                          text=True, check=True)
    assert quick.torch_threads() == int(done.stdout)


def test_a_large_files_digest_is_kept_only_under_its_unchanged_identity(tmp_path, monkeypatch):
    import hashlib
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "KEPT_FROM", 10)
    path = tmp_path / "weights"
    path.write_bytes(b"a" * 100)
    digest = files.file_digest(path)
    assert digest == hashlib.sha256(b"a" * 100).hexdigest()
    assert not (tmp_path / "cache").exists()  # written a moment ago: not settled, so not kept
    monkeypatch.setattr(files, "SETTLED_NS", 0)
    assert files.file_digest(path) == digest
    [kept] = (tmp_path / "cache" / "clip-foundation" / "digests").iterdir()
    entry = json.loads(kept.read_text())
    kept.write_text(json.dumps({**entry, "sha256": "0" * 64}))
    assert files.file_digest(path) == "0" * 64  # served from the entry: the file is not read again
    path.write_bytes(b"b" * 100)  # the same size, other bytes: new times, so another identity
    assert files.file_digest(path) == hashlib.sha256(b"b" * 100).hexdigest()
    for entry in kept.parent.iterdir():
        entry.write_text(entry.read_text()[:-5])  # half written: not JSON, never believed
    assert files.file_digest(path) == hashlib.sha256(b"b" * 100).hexdigest()
    monkeypatch.setattr(files, "KEPT_FROM", 1000)
    small = tmp_path / "small"
    small.write_bytes(b"c" * 100)
    files.file_digest(small)
    assert len(list(kept.parent.iterdir())) == 2  # below KEPT_FROM nothing is kept
