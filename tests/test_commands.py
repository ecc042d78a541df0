"""The commands as a user starts them: options end at `--`; every command checks --device the
same way; search's -n and its grid are bounded."""
import json
from pathlib import Path

import pytest

from clip_foundation import cli, gallery, plots, search
from clip_foundation.index import GalleryIndex

ROOT = Path(__file__).resolve().parents[1]


def main_of(command: str):
    import importlib
    return importlib.import_module(f"clip_foundation.{command}").main


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
