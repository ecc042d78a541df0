"""Every extension point taken from outside the package: each test registers a new entry of its own
(removed again afterwards) and drives it through the real command on the tiny fixtures of conftest.py."""
import csv
import shutil
from pathlib import Path

import pytest

from clip_foundation.data import sources
from clip_foundation.data.records import Record, Source
from clip_foundation.evaluate.command import main as evaluate_main


# ---- sources

def read_pairs(folder, *, report, **options) -> list[Record]:
    """A layout the package does not know: pairs.tsv of `image<TAB>caption` lines beside the images."""
    records: dict[Path, Record] = {}
    for line, row in enumerate((Path(folder) / "pairs.tsv").read_text().splitlines(), start=1):
        name, caption = row.split("\t")
        image = (Path(folder) / name).resolve()
        records.setdefault(image, Record(image, [], None, line)).captions.append(caption)
    return list(records.values())


PAIRS = Source("pairs", "pairs.tsv of image<TAB>caption lines, the images beside it",
               lambda path: (Path(path) / "pairs.tsv").is_file(), read_pairs)


@pytest.fixture
def pairs_layout(monkeypatch):
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))  # the package's own registry comes back after
    sources.register_source(PAIRS, before="classes")
    return PAIRS


def pairs_folder(data: Path, folder: Path, n: int = 8) -> list[Record]:
    """The first `n` test images of the tiny run's set, with their captions, copied into the pairs layout."""
    chosen = [r for r in sources.load_records(data) if r.split == "test"][:n]
    folder.mkdir()
    for r in chosen:
        shutil.copy(r.image, folder / r.image.name)
    (folder / "pairs.tsv").write_text("".join(f"{r.image.name}\t{c}\n" for r in chosen for c in r.captions))
    return chosen


def test_a_registered_layout_is_detected_and_scored_by_evaluate(tiny_run, pairs_layout, tmp_path):
    data, run_dir, _ = tiny_run
    chosen = pairs_folder(Path(data), tmp_path / "pairs")
    assert list(sources.SOURCES).index("pairs") == list(sources.SOURCES).index("classes") - 1
    assert sources.detect_layout(tmp_path / "pairs") == "pairs"
    metrics = evaluate_main(["--checkpoint", str(run_dir), "--data", str(tmp_path / "pairs"), "--split=all",
                             "--out", str(tmp_path / "pairs.json")])
    assert metrics["images"] == len(chosen) and metrics["captions"] == sum(len(r.captions) for r in chosen)
    # the same images through a layout the package ships score the same: the new reader read them all, alike
    same = shutil.copytree(tmp_path / "pairs", tmp_path / "csv", ignore=shutil.ignore_patterns("pairs.tsv"))
    with open(same / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption")] + [(r.image.name, c) for r in chosen for c in r.captions])
    reference = evaluate_main(["--checkpoint", str(run_dir), "--data", str(same), "--split=all",
                               "--out", str(tmp_path / "csv.json")])
    assert {k: v for k, v in metrics.items() if k != "data"} == {k: v for k, v in reference.items() if k != "data"}


def test_an_undetected_folder_lists_the_registered_layout(tiny_run, pairs_layout, tmp_path):
    _, run_dir, _ = tiny_run
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--checkpoint", str(run_dir), "--data", str(tmp_path / "notes"), "--split=all"])
    assert "no known dataset layout" in str(e.value.code)
    assert f"  pairs: {PAIRS.description}" in str(e.value.code)
