"""Issue #29, the data side: no entry of a dataset file reads an image from outside its folder,
another folder's test split needs none of the run's training-split options, evaluate's --skip_bad
skips what it is offered for in every layout, data warnings are one plain line, and split files
are read within a documented size."""
import json
import re
import tracemalloc
import warnings
from pathlib import Path

import pytest

from clip_foundation.common import cli
from clip_foundation.evaluate import command as evaluate
from clip_foundation.data import standard as readers_standard
from clip_foundation.search import command as search
from clip_foundation.data.splits import DataConfig, load_split
from clip_foundation.data.sources import load_records, load_records_with_report, read_class_folders
from clip_foundation.data.hf import _write_image
from clip_foundation.data.records import DataError, DatasetFolders, LoadReport, open_rgb
from test_readers import _png_header, make_flickr8k, make_flickr30k
from test_standard_splits import (_jpeg, captions_of, coco_file, karpathy_file, make_karpathy, put,  # noqa: F401
                                  tiny_run_free_model, write_json)  # (a fixture, used by name)

# ---------------------------------------------------------------- 1. entries that lead outside

# Every dataset lives at ROOT = tmp/x/data; tmp/outside.jpg is a photo beside it, not in it.
INSIDE = "1000268201_693b08cb0e.jpg"


def karpathy_entries(root: Path, *names: str, filepath: str = "") -> Path:
    """dataset_coco.json (with filepath) or dataset_flickr8k.json: INSIDE, then `names` (test split)."""
    put(root / "Images" / INSIDE, _jpeg((1, 2, 3)))
    entries = [{"filename": INSIDE, "split": "test", "filepath": "Images"}]
    entries += [{"filename": n, "split": "test", "filepath": filepath} for n in names]
    for e in entries:
        e.update(captions=captions_of(e["filename"]), cocoid=len(e["filename"]))
        if not filepath:
            e.pop("filepath")
    return write_json(root / ("dataset_coco.json" if filepath else "dataset_flickr8k.json"),
                      karpathy_file("coco" if filepath else "flickr8k", entries))


def coco_entries(root: Path, name: str) -> Path:
    put(root / "val2017" / "000000000139.jpg", _jpeg((1, 2, 3)))
    write_json(root / "annotations" / "captions_val2017.json", coco_file("2017", "val", [
        {"id": 139, "file_name": "000000000139.jpg", "captions": captions_of("139")}]))
    return write_json(root / "annotations" / "captions_train2017.json", coco_file("2017", "train", [
        {"id": 9, "file_name": name, "captions": captions_of("9")}]))


def csv_entries(root: Path, name: str) -> Path:
    put(root / "images" / "a.jpg", _jpeg((1, 2, 3)))
    return put(root / "captions.csv", f"image,caption\nimages/a.jpg,a photo\n{name},a stolen photo\n".encode())


def linked_image(folder: Path, outside: Path) -> None:
    """A file in the dataset's image folder that is a link to a photo outside the dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "2199200615.jpg").unlink(missing_ok=True)
    (folder / "2199200615.jpg").symlink_to(outside)


def flickr8k_link(root: Path, outside: Path) -> Path:
    make_flickr8k(root)
    linked_image(root / "Images", outside)
    with open(root / "captions.txt", "a") as f:
        f.write("2199200615.jpg,A dog plays .\n")
    return root / "captions.txt"


def flickr30k_link(root: Path, outside: Path) -> Path:
    make_flickr30k(root)  # its 2199200615.jpg, captioned, becomes the link
    linked_image(root / "flickr30k_images" / "flickr30k_images", outside)
    return root / "flickr30k_images" / "results.csv"


CASES = {  # name -> (write ROOT's files given tmp/outside.jpg, -> the file at fault; where in it, a regex)
    "karpathy absolute filename": (lambda r, o: karpathy_entries(r, str(o)), r":images\[1\]"),
    "karpathy ../ filename": (lambda r, o: karpathy_entries(r, "../../outside.jpg"), r":images\[1\]"),
    "karpathy ../ filepath": (lambda r, o: karpathy_entries(r, "outside.jpg", filepath="../.."), r":images\[1\]"),
    "karpathy linked image": (lambda r, o: (linked_image(r / "Images", o), karpathy_entries(r, "2199200615.jpg"))[1],
                              r":images\[1\]"),
    "coco absolute file_name": (lambda r, o: coco_entries(r, str(o)), r":images\[0\]"),
    "coco ../ file_name": (lambda r, o: coco_entries(r, "../../outside.jpg"), r":images\[0\]"),
    "csv absolute image": (lambda r, o: csv_entries(r, str(o)), ":3"),
    "csv ../ image": (lambda r, o: csv_entries(r, "../../outside.jpg"), ":3"),
    "flickr8k linked image": (flickr8k_link, r":\d+"),
    "flickr30k linked image": (flickr30k_link, r":\d+"),
}


@pytest.mark.parametrize("case", CASES)
def test_an_entry_leading_outside_the_dataset_folder_is_refused(tmp_path, case):
    write, where = CASES[case]
    outside = put(tmp_path / "outside.jpg", _jpeg((9, 9, 9)))
    root = tmp_path / "x" / "data"
    source = write(root, outside)
    with pytest.raises(DataError, match=rf"^{re.escape(str(source))}{where}: .*outside the dataset folder "
                                        rf"{re.escape(str(root))} ") as e:
        load_records(root)
    assert len(str(e.value).splitlines()) == 1
    records, report = load_records_with_report(root, skip_bad=True)  # skipped and counted instead
    assert report.skipped == {"outside the dataset": 1}
    assert records and all(r.image.resolve().is_relative_to(root.resolve()) for r in records)


def test_class_folders_refuse_an_image_linked_from_elsewhere(tmp_path):
    outside = put(tmp_path / "outside.jpg", _jpeg((9, 9, 9)))
    root = tmp_path / "classes"
    put(root / "cat" / "a.jpg", _jpeg((1, 2, 3)))
    (root / "cat" / "b.jpg").symlink_to(outside)
    with pytest.raises(DataError, match=rf"^{re.escape(str(root / 'cat' / 'b.jpg'))}: .*outside the dataset folder"):
        read_class_folders(root)
    records, _ = read_class_folders(root, report=LoadReport(skip_bad=True))
    assert [r.image.name for r in records] == ["a.jpg"]


def test_linked_dataset_folders_and_image_folders_still_read(tmp_path):
    # the dataset folder itself a link, and image folders that are links to a shared copy: the
    # user's own links, as in tests/test_standard_splits.py's shared Flickr8k check
    shared = tmp_path / "shared"
    names = make_karpathy(shared / "flickr8k", "flickr8k", "Images")
    (tmp_path / "linked").symlink_to(shared / "flickr8k")
    assert sorted(r.image.name for r in load_records(tmp_path / "linked")) == sorted(names)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "dataset_flickr8k.json").write_bytes((shared / "flickr8k" / "dataset_flickr8k.json").read_bytes())
    (copy / "Images").symlink_to(shared / "flickr8k" / "Images")
    assert sorted(r.image.name for r in load_records(copy)) == sorted(names)
    make_flickr8k(shared / "kaggle")
    (tmp_path / "kaggle").mkdir()
    (tmp_path / "kaggle" / "captions.txt").symlink_to(shared / "kaggle" / "captions.txt")
    (tmp_path / "kaggle" / "Images").symlink_to(shared / "kaggle" / "Images")
    assert len(load_records(tmp_path / "kaggle")) == 2


def test_dataset_folders_refuse_what_resolves_elsewhere(tmp_path):
    root = tmp_path / "data"
    (root / "Images").mkdir(parents=True)
    folders = DatasetFolders(root, root / "Images")
    assert folders.outside(root / "Images" / "a.jpg", "a.jpg") is None
    assert folders.outside(root / "Images" / ".." / "b.jpg", "../b.jpg") is None  # still inside
    for name in ("../../etc/passwd", "/etc/passwd", "Images/../../data2/x.jpg"):
        assert "outside the dataset folder" in folders.outside(root / name, name)


def test_hf_image_paths_outside_the_dataset_are_refused(tmp_path):
    outside = put(tmp_path / "outside.jpg", _jpeg((9, 9, 9)))
    inside = put(tmp_path / "src" / "a.jpg", _jpeg((1, 2, 3)))
    folders = DatasetFolders(tmp_path / "src")
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match=r"^src\[train\]:row 3: .*outside the dataset folder"):
        _write_image({"bytes": None, "path": str(outside)}, tmp_path / "out" / "3", "src[train]:row 3",
                      LoadReport(), folders)
    written = _write_image({"bytes": None, "path": str(inside)}, tmp_path / "out" / "4", "src[train]:row 4",
                           LoadReport(), folders)
    assert written.read_bytes() == inside.read_bytes()


# ---------------------------------------------------------------- 11. another folder's test split

def test_another_folders_test_split_needs_none_of_the_training_split_options(tmp_path, tiny_run_free_model):
    # the published protocol's part: a Karpathy file holding only a test split
    names = [f"{i}.jpg" for i in range(4)]
    for i, n in enumerate(names):
        put(tmp_path / "test_only" / "Images" / n, _jpeg((60 * i, 0, 0)))
    write_json(tmp_path / "test_only" / "dataset_flickr8k.json", karpathy_file("flickr8k", [
        {"filename": n, "split": "test", "captions": captions_of(n)} for n in names]))
    preset = DataConfig(path=str(tmp_path / "test_only"), val_from_train=500, restval=False)
    assert sorted(r.image.name for r in load_split(preset, "test")) == names
    with pytest.raises(DataError, match="--val_from_train=500 leaves no training images"):
        load_split(preset, "train")  # the training split still needs its images
    # evaluate.py --data=DIR --split=test on a run trained with --val_from_train=500 (a preset run)
    config = tiny_run_free_model / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "data": {"val_from_train": 500}}))
    metrics = evaluate.main([f"--checkpoint={tiny_run_free_model}", f"--data={tmp_path / 'test_only'}",
                             "--split=test", f"--out={tmp_path / 'm.json'}"])
    assert metrics["images"] == 4 and metrics["captions"] == 20


# ---------------------------------------------------------------- 23. evaluate --skip_bad

@pytest.mark.parametrize("fault, message", [
    (lambda e: e[1].update(filename="gone.jpg"), "image file not found: gone.jpg"),
    (lambda e: e[1]["sentences"][2].update(raw="  "), "empty caption"),
    (lambda e: e[1].update(filename=e[0]["filename"]), "already listed at"),
], ids=["missing image", "empty caption", "duplicate"])
def test_evaluate_skip_bad_skips_what_it_is_offered_for_in_a_karpathy_file(tmp_path, tiny_run_free_model,
                                                                           fault, message):
    names = make_karpathy(tmp_path / "data", "flickr30k", "flickr30k-images")
    path = tmp_path / "data" / "dataset_flickr30k.json"
    data = json.loads(path.read_text())
    tests = [e for e in data["images"] if e["split"] == "test"]  # two test images
    fault(tests)
    path.write_text(json.dumps(data))
    args = [f"--checkpoint={tiny_run_free_model}", f"--data={tmp_path / 'data'}", "--split=test",
            f"--out={tmp_path / 'm.json'}"]
    with pytest.raises(SystemExit, match=rf"{message}.*\(--skip_bad"):
        evaluate.main(args)
    with cli.reported_warnings() as seen:
        metrics = evaluate.main(args + ["--skip_bad"])
    kept = 1 if message != "empty caption" else 2  # a blank caption drops that caption only
    assert metrics["images"] == kept and sum(s == "test" for s in names.values()) == 2
    assert len(seen) == 1 and "skipped 1" in seen[0]
    with cli.reported_warnings():  # search too
        matches = search.main(["a photo", *args[:3], "--skip_bad", f"--out={tmp_path / 'grid.png'}"])
    assert len(matches) == kept


# ---------------------------------------------------------------- 24. one plain line per data warning

def test_identical_captions_are_one_warning_line_per_load(tmp_path, capsys):
    rows = ["image,caption"] + [f"{n},{c}" for n in ("1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg")
                                for c in ("A dog .", "A dog .", "A cat .")]
    make_flickr8k(tmp_path, rows=rows)
    with cli.reported_warnings() as seen:
        load_records(tmp_path)
    err = capsys.readouterr().err
    assert len(seen) == 1 and "2 identical caption kept" in seen[0]  # one line for both, not one each
    assert err.splitlines() == [f"warning: {seen[0]}"]


@pytest.mark.parametrize("side", [10_000, 14_000])  # 100 MP: PIL warns; 196 MP: PIL refuses
def test_decompression_bombs_are_refused_in_one_line_without_pil_warnings(tmp_path, side):
    path = put(tmp_path / "bomb.png", _png_header(side, side))
    with warnings.catch_warnings(record=True) as caught:
        with pytest.raises(DataError, match=rf"^{path}: image .*more than the 64 MP this loader decodes"):
            open_rgb(path)
    assert [w.category.__name__ for w in caught] == []


# ---------------------------------------------------------------- 30. split files within a size

def test_a_split_file_over_the_limit_is_refused_in_one_line(tmp_path, monkeypatch):
    make_karpathy(tmp_path / "k", "flickr8k", "Images")
    path = tmp_path / "k" / "dataset_flickr8k.json"
    monkeypatch.setattr(readers_standard, "MAX_SPLIT_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(DataError, match=rf"^{path}: {path.stat().st_size:,} bytes, more than the "
                                        r".* a split or caption file may have .*shards") as e:
        load_records(path)
    assert len(str(e.value).splitlines()) == 1
    monkeypatch.setattr(readers_standard, "MAX_SPLIT_FILE_BYTES", path.stat().st_size)
    assert len(load_records(path)) == 4  # at the limit: read


@pytest.mark.slow  # writes and parses a 20 MB split file, measuring the memory it takes
def test_a_split_file_is_read_in_a_few_times_its_size(tmp_path):
    # Karpathy's files carry tokens, ids and a sentence object per caption that nobody reads: a
    # 148 MB dataset_coco.json took 975 MB to parse whole (200 MB: 2.2 GB, the report)
    put(tmp_path / "Images" / "a.jpg", _jpeg((1, 2, 3)))
    entries = [{"filename": "a.jpg", "split": "train", "captions": [
        f"A man with a red helmet on a small moped on a dirt road, take {i}.{k} ." for k in range(5)]}
        for i in range(5000)]  # COCO's captions, as long as theirs
    path = write_json(tmp_path / "dataset_flickr8k.json", karpathy_file("flickr8k", entries))
    tracemalloc.start()
    try:
        records, report = load_records_with_report(path, skip_bad=True)  # every image but the first repeats it
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(records) == 1 and report.skipped == {"duplicate row": 4999}
    assert peak < 3 * path.stat().st_size, f"{peak:,} bytes to read a {path.stat().st_size:,}-byte file"
