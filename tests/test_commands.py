"""The commands as a user starts them: `python X.py`, the installed `clip-X` and `python -m
clip_foundation.X` exit and report alike; options end at `--`; every command checks --device the
same way; search's -n and its grid are bounded; SIGTERM cleans up the page like Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import threading
import tomllib
import warnings
from pathlib import Path

import pytest

from clip_foundation.common import cli
from clip_foundation import commands
from clip_foundation.search import gallery
from clip_foundation.evaluate import plots
from clip_foundation.search import command as search
from clip_foundation.search.index import GalleryIndex
from clip_foundation.data.records import DataWarning

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {name.removeprefix("clip-"): target
                for name, target in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items()}


def main_of(command: str):
    import importlib
    from clip_foundation.commands import MODULES
    return importlib.import_module(MODULES[command]).main


def refusal(command: str, argv: list[str], capsys) -> tuple[object, str]:
    """-> (the exit code, everything said) of a command that must stop with an error."""
    with pytest.raises(SystemExit) as stop:
        main_of(command)(argv)
    out = capsys.readouterr()
    return stop.value.code, f"{stop.value.code}\n{out.out}{out.err}"


# ---------------------------------------------------------------- `--` ends the options

@pytest.mark.parametrize("argv, query", [
    (["--checkpoint=RUN", "--", "-a red circle"], "-a red circle"),
    (["--", "--help"], "--help"),  # after --, not the help
    (["-n", "3", "--", "-n"], "-n"),
    (["--", "-5 red circles", "--checkpoint=RUN"], None),  # one query only: the second is too many
])
def test_after_a_double_dash_every_argument_is_bare(argv, query, capsys):
    if query is None:
        with pytest.raises(SystemExit):
            cli.parse(search.SearchConfig(), argv, search.USAGE, positional=("query",))
        assert "unexpected argument '--checkpoint=RUN'" in capsys.readouterr().err
    else:
        assert cli.parse(search.SearchConfig(), argv, search.USAGE, positional=("query",)).query == query


@pytest.mark.parametrize("command, argv, said", [
    ("download", ["--", "-flickr8k"], "invalid choice '-flickr8k'"),  # reached the dataset name
    ("hub", ["--", "-card"], "push or card, not '-card'"),
    *((command, ["--checkpoint=/no/such/run", "--", "-x"], "unexpected argument '-x'")
      for command in ("train", "evaluate", "app", "embed")),  # no bare arguments: one line, not a crash
])
def test_every_command_ends_its_options_at_a_double_dash(command, argv, said, capsys):
    _, text = refusal(command, argv, capsys)
    assert said in text and "Traceback" not in text


def test_a_query_starting_with_a_dash_is_searched(tiny_run, capsys):
    _, run_dir, _ = tiny_run
    results = search.main(["--checkpoint", str(run_dir), "-n", "2", "--json", "--", "-a red circle"])
    assert len(results) == 2 and json.loads(capsys.readouterr().out)["query"] == "-a red circle"


# ---------------------------------------------------------------- --device: one check for every command

@pytest.mark.parametrize("device", ["tpu", "cuda:99", "meta", "cpu:5", "mps:1"])
@pytest.mark.parametrize("command", ["train", "evaluate", "search", "app", "embed"])
def test_every_command_refuses_a_device_this_machine_lacks(command, device, capsys, tmp_path):
    argv = {"train": [f"--out_dir={tmp_path}"], "search": ["a dog", "--checkpoint=/no/such/run"],
            "embed": ["--checkpoint=/no/such/run", "--data=/no/such/data", f"--out={tmp_path / 'emb'}"],
            }.get(command, ["--checkpoint=/no/such/run"])
    code, text = refusal(command, [*argv, f"--device={device}"], capsys)
    assert f"--device={device!r}: must be auto, cpu" in text and "Traceback" not in text
    assert code == 2 or command == "train"  # train's one line ends in its usage too, status 1
    assert not any(tmp_path.iterdir())  # refused before anything was written


# ---------------------------------------------------------------- -n and the grid are bounded

@pytest.mark.parametrize("n, refused", [(gallery.MAX_RESULTS + 1, True), (100000, True), (-1, True),
                                        (gallery.MAX_RESULTS, False), (0, False)])
def test_search_n_is_bounded_by_a_usage_line(n, refused, capsys):
    code, text = refusal("search", ["a dog", "--checkpoint=/no/such/run", "-n", str(n)], capsys)
    if refused:  # before the model loads
        assert code == 2 and f"--n={n}: must be 1 to {gallery.MAX_RESULTS}, or 0 for the default" in text
    else:  # allowed: it went on to the missing checkpoint
        assert "not a saved CLIPModel folder" in text


def test_the_find_functions_keep_the_same_bound():
    import torch
    index = GalleryIndex(torch.nn.functional.normalize(torch.randn(3, 8), dim=1).half(), ["a", "b", "c"], "id")
    for n in (0, gallery.MAX_RESULTS + 1):
        with pytest.raises(ValueError, match=f"--n={n}: must be 1 to {gallery.MAX_RESULTS}"):
            gallery.find_matches(None, index, "a dog", n=n)
        with pytest.raises(ValueError, match=f"--n={n}: must be 1 to {gallery.MAX_RESULTS}"):
            gallery.find_captions(None, index, "x.png", n=n)


def drawn_cells(monkeypatch) -> list[int]:
    """Patch the grid and caption figures to record how many results each would draw."""
    counts = []
    monkeypatch.setattr(plots, "image_grid", lambda matches, **kwargs: counts.append(len(matches)))
    monkeypatch.setattr(plots, "image_grid_png", lambda matches, **kwargs: counts.append(len(matches)))
    monkeypatch.setattr(plots, "captions_figure", lambda image, matches, **kwargs: counts.append(len(matches)))
    return counts


@pytest.mark.slow  # draws a grid of 100 images
def test_the_grid_draws_at_most_the_best_cells(tiny_run, tmp_path, monkeypatch, capsys):
    data, run_dir, _ = tiny_run
    counts = drawn_cells(monkeypatch)
    n = gallery.GRID_CELLS + 50
    base = ["--checkpoint", str(run_dir), "--split=all", "-n", str(n), "--out", str(tmp_path / "fig.png")]
    assert len(search.main(["a red circle", *base])) == n  # every result printed ...
    assert counts == [gallery.GRID_CELLS]  # ... the best ones drawn
    assert f"(the best {gallery.GRID_CELLS} of {n})" in capsys.readouterr().out
    image = next(iter(sorted((Path(data) / "images").glob("*.png"))))
    search.main(["--image", str(image), *base])
    assert counts[1:] == [gallery.GRID_CELLS]
    matches = gallery.Matches([gallery.Match(str(image), 0.5)] * n, "a red circle")
    matches._repr_png_()  # a notebook cell's grid
    assert counts[2:] == [gallery.GRID_CELLS]


@pytest.mark.parametrize("kind", ["query", "image"])
def test_json_draws_no_figure(tiny_run, tmp_path, monkeypatch, capsys, kind):
    data, run_dir, _ = tiny_run
    counts = drawn_cells(monkeypatch)
    what = ["a red circle"] if kind == "query" else ["--image", str(next(iter((Path(data) / "images").glob("*.png"))))]
    results = search.main([*what, "--checkpoint", str(run_dir), "-n", "3", "--json", "--out", str(tmp_path / "f.png")])
    printed = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert len(printed["matches"]) == len(results) == 3 and counts == [] and not any(tmp_path.iterdir())


# ---------------------------------------------------------------- every way of starting a command

def test_run_turns_main_results_into_the_exit_status():
    assert commands.run("search", lambda: {"R@1": 50.0}) == 0  # results, for Python callers
    assert commands.run("search", lambda: None) == 0
    assert commands.run("download", lambda: 1) == 1  # a status
    assert commands.run("search", lambda: [1, 2]) == 0


@pytest.mark.slow  # a fresh interpreter
def test_a_command_exits_with_its_heap_frozen_after_its_own_cleanup(tmp_path):
    # the exit's search for cycles skips what the command left (0.6 s after torch); the command's atexit work
    # (registered while it ran, as the page's folders and the engines' temporary graphs are) still runs first
    code = f"""
import atexit, gc, os, tempfile, shutil
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, "folder left:", os.path.exists(folder)))
from clip_foundation import commands
def main():
    global folder
    folder = tempfile.mkdtemp(dir={str(tmp_path)!r})
    atexit.register(shutil.rmtree, folder)
    print("results")
commands.run("search", main)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    assert done.stdout.splitlines() == ["results", "frozen at exit: True folder left: False"]


def test_run_reports_warnings_as_one_line_each(capsys):
    def main():
        warnings.warn("3 images are in none of the dataset's split lists", DataWarning)
        return {}
    commands.run("evaluate", main)
    assert capsys.readouterr().err == "warning: 3 images are in none of the dataset's split lists\n"


ROOT_SCRIPTS = ("train", "evaluate", "search", "app", "download")


def started(command: str, way: str) -> list[str]:
    """The command line that starts `command` `way`: its root script, its console script (what
    pip's wrapper runs: the entry point pyproject.toml names), or `python -m`."""
    if way == "script":
        return [sys.executable, str(ROOT / f"{command}.py")]
    if way == "console":
        module, function = ENTRY_POINTS[command].split(":")
        return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]
    from clip_foundation.commands import MODULES
    documented = {"embed": "clip_foundation.embed", "hub": "clip_foundation.hub"}  # python -m lines in the docs
    return [sys.executable, "-m", documented.get(command, MODULES[command])]


WAYS = [(command, way) for command in ENTRY_POINTS for way in ("script", "console", "module")
        if way != "script" or command in ROOT_SCRIPTS]


def outside(tmp_path) -> dict:
    """An environment with this checkout's code, no Kaggle login and no network."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    drop = ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "HOME": str(home),
            "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("command, way", WAYS)
def test_a_failed_command_exits_1_however_it_is_started(command, way, tmp_path):
    argv = {"train": ["--data=/no/such/data", f"--out_dir={tmp_path / 'runs'}"],
            "download": ["flickr8k", f"--dest={tmp_path / 'data'}"],  # offline, no credentials
            "hub": ["card", "/no/such/run"], "search": ["a dog", "--checkpoint=/no/such/run"],
            "embed": ["--checkpoint=/no/such/run", "--data=/no/such/data", f"--out={tmp_path / 'emb'}"],
            }.get(command, ["--checkpoint=/no/such/run"])
    done = subprocess.run([*started(command, way), *argv], capture_output=True, text=True, cwd=tmp_path,
                          env=outside(tmp_path), timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr[-1000:])
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr[-1000:]


@pytest.mark.slow
@pytest.mark.parametrize("way", ["script", "console", "module"])
def test_warnings_are_one_plain_line_however_a_command_is_started(tiny_run, way, tmp_path):
    data, run_dir, _ = tiny_run
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((Path(data) / "images").glob("*.png"))[:3]:
        (photos / image.name).write_bytes(image.read_bytes())
    (photos / "broken.png").write_bytes(b"not a png")
    done = subprocess.run([*started("search", way), "a red circle", f"--checkpoint={run_dir}", f"--data={photos}",
                           "--skip_bad", "-n", "2", "--json", "--engine=torch"],
                          capture_output=True, text=True, cwd=tmp_path, env=outside(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    # once, as "warning: ..." (the progress bar may share its line), not Python's "file:line: DataWarning: ..."
    assert done.stderr.count("warning: skipped 1 images that could not be decoded") == 1, done.stderr[-1000:]
    assert "broken.png" in done.stderr and "DataWarning" not in done.stderr and "warnings.warn" not in done.stderr


# ---------------------------------------------------------------- SIGTERM ends the page like Ctrl-C

@pytest.mark.slow
def test_sigterm_removes_the_pages_folders(tiny_run, tmp_path):
    pytest.importorskip("gradio", reason="the page needs gradio")
    _, run_dir, _ = tiny_run
    temp = tmp_path / "tmp"  # the page's temp and upload folders land here
    temp.mkdir()
    env = {**outside(tmp_path), "TMPDIR": str(temp), "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    page = subprocess.Popen([sys.executable, str(ROOT / "app.py"), f"--checkpoint={run_dir}", "--engine=torch"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    watchdog = threading.Timer(300, page.kill)  # a page that never comes up fails the test, not hangs it
    watchdog.start()
    try:
        said = []
        for line in page.stdout:  # until the server is up
            said.append(line)
            if "http://" in line:
                break
        assert len(list(temp.glob("clip-app-*"))) == 2, "".join(said)  # the page's thumbnails and Gradio's uploads
        page.send_signal(signal.SIGTERM)
        code = page.wait(timeout=60)
    finally:
        watchdog.cancel()
        page.kill()
    assert code == 128 + signal.SIGTERM
    assert not list(temp.glob("clip-app-*")), "left behind"
