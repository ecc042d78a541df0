"""The standard benchmark files as dataset layouts: Karpathy's split files (dataset_flickr8k.json,
dataset_flickr30k.json, dataset_coco.json) and the official MS-COCO captions, read alone or beside
a Kaggle copy; restval; bad input; their downloads offline; and the notebook's flows on them."""
import dataclasses
import io
import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from clip_foundation.common import cli
from clip_foundation.data import download
from clip_foundation.evaluate import command as evaluate
from clip_foundation.search import gallery
from clip_foundation import training as train
from clip_foundation.evaluate import zeroshot
from clip_foundation.data.splits import DataConfig, load_splits
from clip_foundation.data.sources import detect_layout, load_records, load_records_with_report
from clip_foundation.data.records import DataError, DataWarning, Record, open_rgb
from clip_foundation.evaluate.metrics import evaluate_records
from clipModel import CLIPModel
from conftest import SHARED, TINY_MODEL


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "JPEG")
    return buf.getvalue()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_json(path: Path, obj) -> Path:
    return put(path, json.dumps(obj).encode())


# ---------------------------------------------------------------- the exact file formats

def karpathy_file(dataset: str, images: list[dict]) -> dict:
    """caption_datasets.zip's format: {"images": [...], "dataset": NAME}; each image with its
    sentences (tokens, raw, imgid, sentid), sentids, imgid, split and filename (COCO: filepath
    and cocoid too)."""
    out, sentid = [], 0
    for imgid, im in enumerate(images):
        sentences = [{"tokens": raw.lower().replace(".", "").split(), "raw": raw, "imgid": imgid,
                      "sentid": sentid + k} for k, raw in enumerate(im["captions"])]
        entry = {"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
                 "split": im["split"], "filename": im["filename"]}
        if dataset == "coco":
            entry = {"filepath": im["filepath"], **entry, "cocoid": im["cocoid"]}
        out.append(entry)
        sentid += len(sentences)
    return {"images": out, "dataset": dataset}


def coco_file(year: str, split: str, images: list[dict]) -> dict:
    """The official captions_<split><year>.json: info, licenses, images, annotations."""
    return {"info": {"description": f"COCO {year} Dataset", "version": "1.0", "year": int(year)},
            "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                          "name": "Attribution-NonCommercial-ShareAlike License"}],
            "images": [{"license": 1, "file_name": im["file_name"], "coco_url": "", "height": 8, "width": 8,
                        "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": im["id"]} for im in images],
            "annotations": [{"image_id": im["id"], "id": 1000 * im["id"] + k, "caption": c}
                            for k_im, im in enumerate(images) for k, c in enumerate(im["captions"])]}


def captions_of(name: str, n: int = 5) -> list[str]:
    return [f"A photo {name} number {k} ." for k in range(n)]


# name, split as the file says, image folder: the published names of each dataset
FLICKR8K = [("1000268201_693b08cb0e.jpg", "train"), ("1001773457_577c3a7d70.jpg", "train"),
            ("1002674143_1b742ab4b8.jpg", "val"), ("1003163366_44323f5815.jpg", "test")]
FLICKR30K = [("1000092795.jpg", "train"), ("10002456.jpg", "train"), ("1000268201.jpg", "val"),
             ("1000344755.jpg", "test"), ("1000366164.jpg", "test")]
COCO = [(391895, "train2014", "train"), (522418, "train2014", "train"), (184613, "val2014", "restval"),
        (318219, "val2014", "val"), (554625, "val2014", "test")]


def make_karpathy(root: Path, dataset: str, image_dir: str = "") -> dict[str, str]:
    """A folder with one Karpathy split file and its images; -> {file name: split in the file}."""
    if dataset == "coco":
        entries = [{"filepath": folder, "filename": f"COCO_{folder}_{cid:012d}.jpg", "cocoid": cid, "split": split}
                   for cid, folder, split in COCO]
    else:
        entries = [{"filename": n, "split": s} for n, s in (FLICKR8K if dataset == "flickr8k" else FLICKR30K)]
    for i, e in enumerate(entries):
        e["captions"] = captions_of(e["filename"])
        put(root / image_dir / e.get("filepath", "") / e["filename"], _jpeg((40 * i, 0, 0)))
    write_json(root / f"dataset_{dataset}.json", karpathy_file(dataset, entries))
    return {e["filename"]: e["split"] for e in entries}


def make_kaggle_flickr8k(root: Path, names: list[str]) -> Path:
    """Kaggle adityajn105/flickr8k: captions.txt (image,caption) + Images/, no split lists."""
    rows = ["image,caption"] + [f"{n},Kaggle caption {k} of {n}" for n in names for k in range(5)]
    put(root / "captions.txt", ("\n".join(rows) + "\n").encode())
    for n in names:
        put(root / "Images" / n, _jpeg((1, 2, 3)))
    return root


def make_coco(root: Path, year: str = "2017") -> dict[str, str]:
    """annotations/captions_{train,val}YEAR.json + trainYEAR/, valYEAR/; -> {file name: split}."""
    names = {}
    for split, ids in (("train", (9, 25, 30)), ("val", (139, 285))):
        images = [{"id": i, "file_name": f"{i:012d}.jpg" if year == "2017" else f"COCO_{split}2014_{i:012d}.jpg",
                   "captions": captions_of(str(i), 5 + (i % 2))} for i in ids]  # COCO has 5-7 captions
        write_json(root / "annotations" / f"captions_{split}{year}.json", coco_file(year, split, images))
        for im in images:
            put(root / f"{split}{year}" / im["file_name"], _jpeg((im["id"], 0, 0)))
            names[im["file_name"]] = split
    return names


def splits_of(records: list[Record]) -> dict[str, str]:
    return {r.image.name: r.split for r in records}


# ---------------------------------------------------------------- Karpathy split files

@pytest.mark.parametrize("dataset,image_dir", [("flickr8k", "Images"), ("flickr8k", "Flicker8k_Dataset"),
                                               ("flickr30k", "flickr30k-images"),
                                               ("flickr30k", "flickr30k_images/flickr30k_images"),
                                               ("coco", ""), ("coco", "images")])
def test_karpathy_file_reads_its_own_splits_and_captions(tmp_path, dataset, image_dir):
    names = make_karpathy(tmp_path, dataset, image_dir)
    assert detect_layout(tmp_path) == "karpathy"
    records = load_records(tmp_path)
    assert splits_of(records) == {n: "train" if s == "restval" else s for n, s in names.items()}
    for r in records:  # the raw sentences, in order; the file found where the dataset keeps it
        assert r.captions == captions_of(r.image.name) and r.image.is_file() and r.image.is_absolute()
        assert r.extra["karpathy_split"] == names[r.image.name]
    if dataset == "coco":
        assert {r.image.parent.name for r in records if r.split == "test"} == {"val2014"}


def test_the_split_file_itself_can_be_the_dataset(tmp_path):
    names = make_karpathy(tmp_path, "flickr30k", "flickr30k-images")
    path = tmp_path / "dataset_flickr30k.json"
    assert detect_layout(path) == "karpathy"
    assert splits_of(load_records(path)) == names


@pytest.mark.parametrize("restval", [True, False])
def test_restval_joins_train_unless_asked_otherwise(tmp_path, restval):
    make_karpathy(tmp_path, "coco")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # leaving restval out is asked for: no warning
        splits = load_splits(DataConfig(path=str(tmp_path), restval=restval))
    restval_image = f"COCO_val2014_{184613:012d}.jpg"
    assert (restval_image in [r.image.name for r in splits["train"]]) == restval
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2 + restval, 1, 1]
    kept = load_records(tmp_path, restval=restval)
    assert {r.split for r in kept if r.image.name == restval_image} == {"train" if restval else "restval"}


@pytest.mark.parametrize("argv", [["--data.restval=false"], ["--restval=false"], ["--restval", "false"]])
def test_restval_is_a_data_option_of_the_command_line(argv):
    cfg = cli.apply_overrides(train.RunConfig(), argv, aliases=train.ALIASES)
    assert cfg.data.restval is False and train.RunConfig().data.restval is True


def test_a_split_file_beside_a_kaggle_flickr8k_gives_it_the_standard_split(tmp_path):
    names = [n for n, _ in FLICKR8K]
    make_kaggle_flickr8k(tmp_path, names)
    assert detect_layout(tmp_path) == "flickr8k"
    assert {r.split for r in load_records(tmp_path)} == {None}  # Kaggle's copy ships no split
    put(tmp_path / "splits" / "train.txt", "\n".join(names[1:]).encode())  # another split list: overruled
    write_json(tmp_path / "dataset_flickr8k.json", karpathy_file(
        "flickr8k", [{"filename": n, "split": s, "captions": captions_of(n)} for n, s in FLICKR8K]))
    assert detect_layout(tmp_path) == "karpathy"
    records = load_records(tmp_path)
    assert splits_of(records) == dict(FLICKR8K)
    assert {r.image.parent for r in records} == {(tmp_path / "Images").resolve()}
    assert records[0].captions == captions_of(names[0])  # the split file's sentences


def test_a_split_file_beside_a_kaggle_flickr30k(tmp_path):
    inner = tmp_path / "flickr30k_images"
    rows = ["image_name| comment_number| comment"] + [f"{n}| {k}| Kaggle {k} ." for n, _ in FLICKR30K for k in range(5)]
    put(inner / "results.csv", ("\n".join(rows) + "\n").encode())
    for n, _ in FLICKR30K:
        put(inner / "flickr30k_images" / n, _jpeg((5, 5, 5)))
    assert detect_layout(tmp_path) == "flickr30k"
    write_json(tmp_path / "dataset_flickr30k.json", karpathy_file(
        "flickr30k", [{"filename": n, "split": s, "captions": captions_of(n)} for n, s in FLICKR30K]))
    assert detect_layout(tmp_path) == "karpathy"
    assert splits_of(load_records(tmp_path)) == dict(FLICKR30K)


def test_coco_split_file_finds_the_2017_copies_of_its_2014_images(tmp_path):
    make_karpathy(tmp_path / "first", "coco")
    for cid, folder, _ in COCO:  # the same photos as cocodataset.org's 2017 zips name them
        put(tmp_path / "coco" / ("val2017" if cid == 554625 else "train2017") / f"{cid:012d}.jpg", _jpeg((9, 9, 9)))
    (tmp_path / "first" / "dataset_coco.json").rename(tmp_path / "coco" / "dataset_coco.json")
    records = load_records(tmp_path / "coco")
    assert sorted(r.image.name for r in records) == sorted(f"{cid:012d}.jpg" for cid, _, _ in COCO)
    assert {r.image.name: r.split for r in records}[f"{554625:012d}.jpg"] == "test"


def test_several_split_files_in_one_folder_is_a_clear_error(tmp_path):
    make_karpathy(tmp_path, "flickr8k")
    write_json(tmp_path / "dataset_flickr30k.json", karpathy_file("flickr30k", []))
    with pytest.raises(DataError, match=r"several split files \(dataset_flickr8k.json, dataset_flickr30k.json\)"
                                        r".*--data=FILE"):
        detect_layout(tmp_path)


def test_missing_image_is_named_or_skipped_and_counted(tmp_path):
    make_karpathy(tmp_path, "flickr8k", "Images")
    missing = FLICKR8K[2][0]
    (tmp_path / "Images" / missing).unlink()
    with pytest.raises(DataError, match=rf"dataset_flickr8k.json:images\[2\]: image file not found: {missing} "
                                        rf"\(looked in {tmp_path}/, {tmp_path / 'Images'}/\)"):
        load_records(tmp_path)
    records, report = load_records_with_report(tmp_path, skip_bad=True)
    assert report.layout == "karpathy" and report.skipped == {"missing image": 1}
    assert [r.image.name for r in records] == [n for n, _ in FLICKR8K if n != missing]


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change,where,kind,message", [
    (lambda d: d["images"][1].update(split="holdout"), "images[1]", "unknown split",
     "split 'holdout' is not one of train, restval, val, test"),
    (lambda d: d["images"][0]["sentences"][2].update(raw="  "), "images[0].sentences[2]", "empty caption",
     "empty caption for '1000268201_693b08cb0e.jpg'"),
    (lambda d: d["images"][3].pop("filename"), "images[3]", "bad entry", 'expected {"filename"'),
    (lambda d: d["images"].append(dict(d["images"][0])), "images[4]", "duplicate row",
     "1000268201_693b08cb0e.jpg already listed at"),
    (lambda d: d["images"][2].update(sentences=[]), "images[2]", "no captions", "has no usable captions"),
])
def test_bad_entries_are_named_by_their_place_in_the_file(tmp_path, change, where, kind, message):
    make_karpathy(tmp_path, "flickr8k", "Images")
    path = tmp_path / "dataset_flickr8k.json"
    _edit(path, change)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:{where}: ") + ".*" + re.escape(message)):
        load_records(path)
    _, report = load_records_with_report(path, skip_bad=True)
    assert report.skipped == {kind: 1}


def test_json_quirks_are_repaired_and_said(tmp_path):
    make_karpathy(tmp_path, "flickr8k", "Images")
    path = tmp_path / "dataset_flickr8k.json"
    _edit(path, lambda d: (d["images"][0]["sentences"][0].update(raw="A child\nclimbing stairs ."),
                           d["images"][1]["sentences"][1].update(raw=d["images"][1]["sentences"][0]["raw"])))
    records, report = load_records_with_report(path)
    assert records[0].captions[0] == "A child climbing stairs ."
    assert report.notes == {"joined multi-line caption": 1, "identical caption kept": 1}
    with pytest.raises(DataError, match="already has caption"):
        load_records(path, allow_duplicates=False)


def test_not_a_split_file_is_one_line(tmp_path):
    put(tmp_path / "dataset_coco.json", b'{"images": [\n{"filename": 1,}\n]}')
    with pytest.raises(DataError, match=rf"^{tmp_path / 'dataset_coco.json'}:2: not valid JSON"):
        load_records(tmp_path)
    write_json(tmp_path / "dataset_coco.json", {"annotations": []})
    with pytest.raises(DataError, match="expected a JSON object with an 'images' list"):
        load_records(tmp_path)


# ---------------------------------------------------------------- the official MS-COCO captions

@pytest.mark.parametrize("year", ["2017", "2014"])
def test_coco_captions_train_and_val_files(tmp_path, year):
    names = make_coco(tmp_path, year)
    assert detect_layout(tmp_path) == "coco"
    records = load_records(tmp_path)
    assert splits_of(records) == names
    by_name = {r.image.name: r for r in records}
    first = f"{9:012d}.jpg" if year == "2017" else f"COCO_train2014_{9:012d}.jpg"
    assert by_name[first].captions == captions_of("9", 6) and by_name[first].extra == {"coco_id": 9}
    assert by_name[first].image.parent.name == f"train{year}"
    splits = load_splits(DataConfig(path=str(tmp_path)))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 2, 0]  # no public test captions


def test_coco_reads_the_newest_year_and_a_split_file_wins(tmp_path):
    make_coco(tmp_path, "2014")
    names = make_coco(tmp_path, "2017")
    assert splits_of(load_records(tmp_path)) == names  # the same photos twice would leak
    make_karpathy(tmp_path, "coco")
    assert detect_layout(tmp_path) == "karpathy"


def test_coco_bad_annotations(tmp_path):
    make_coco(tmp_path)
    path = tmp_path / "annotations" / "captions_val2017.json"
    _edit(path, lambda d: d["annotations"].append({"image_id": 77, "id": 5, "caption": "a cat"}))
    with pytest.raises(DataError, match=rf"^{path}:annotations\[12\]: expected an \"image_id\" of"):
        load_records(tmp_path)
    (tmp_path / "train2017" / f"{25:012d}.jpg").unlink()
    records, report = load_records_with_report(tmp_path, skip_bad=True)
    assert report.skipped == {"bad entry": 1, "missing image": 1} and len(records) == 4


# ---------------------------------------------------------------- downloads, offline

def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def fake_fetch(calls):
    """Writes what each URL holds, as the real sites lay them out (caption_datasets.zip: the three
    files at its top; COCO's zips: annotations/, val2017/, train2017/)."""
    def fetch(url, out_dir, credentials):
        calls.append(url)
        name = url.rsplit("/", 1)[1]
        members = {"caption_datasets.zip": {f: json.dumps(karpathy_file(f[8:-5], [])).encode()
                                            for f in download.DATASETS["karpathy"].files},
                   "annotations_trainval2017.zip": {"annotations/captions_train2017.json": b"{}",
                                                    "annotations/captions_val2017.json": b"{}",
                                                    "annotations/instances_val2017.json": b"{}"},
                   "val2017.zip": {"val2017/000000000139.jpg": _jpeg((1, 1, 1))},
                   "train2017.zip": {f"train2017/{i:012d}.jpg": _jpeg((i, 1, 1)) for i in (9, 25)}}[name]
        zip_of(Path(out_dir) / name, members)
    return fetch


@pytest.mark.parametrize("name", ["karpathy", "coco"])
def test_download_standard_files_into_their_layout(tmp_path, monkeypatch, capsys, name):
    if name == "coco":  # the real check wants all 118,287 training images
        monkeypatch.setitem(download.DATASETS, name, dataclasses.replace(download.DATASETS[name], n_images=2))
    calls, dest = [], tmp_path / "data"
    root = download.download(name, dest, fetch=fake_fetch(calls))
    assert root == dest / name and calls == list(download.DATASETS[name].urls)
    for f in download.DATASETS[name].files:
        assert (root / f).exists()
    assert sorted(p.name for p in dest.iterdir()) == [name]  # no download or extract folder left
    assert "next: " in capsys.readouterr().out
    if name == "coco":
        assert not (root / "annotations" / "instances_val2017.json").exists()  # skipped: not captions
    assert download.download(name, dest, fetch=lambda *a: pytest.fail("downloaded again")) == root


def test_a_karpathy_download_placed_in_a_kaggle_copy_reads_as_the_standard_split(tmp_path):
    make_kaggle_flickr8k(tmp_path / "flickr8k", [n for n, _ in FLICKR8K])
    write_json(tmp_path / "karpathy" / "dataset_flickr8k.json", karpathy_file(
        "flickr8k", [{"filename": n, "split": s, "captions": captions_of(n)} for n, s in FLICKR8K]))
    (tmp_path / "karpathy" / "dataset_flickr8k.json").rename(tmp_path / "flickr8k" / "dataset_flickr8k.json")
    splits = load_splits(DataConfig(path=str(tmp_path / "flickr8k")))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 1, 1]


def test_offline_is_one_sentence_and_nothing_is_left(tmp_path, monkeypatch, capsys):
    url = "http://127.0.0.1:9/caption_datasets.zip"  # the discard port: refused at once, like no network
    monkeypatch.setitem(download.DATASETS, "karpathy", dataclasses.replace(download.DATASETS["karpathy"], urls=(url,)))
    assert download.main(["karpathy", f"--dest={tmp_path / 'data'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Could not reach 127.0.0.1:9 (network unavailable: ") and "Traceback" not in err
    assert err.endswith(f"download {url} on a machine with internet and unzip it into {tmp_path / 'data' / 'karpathy'}.")
    assert len(err.splitlines()) == 1 and not (tmp_path / "data" / ".karpathy-download").exists()


@pytest.fixture
def file_server():
    """A local HTTP server of one file (bytes), honouring `Range: bytes=N-` when asked to; -> (url, state)."""
    import http.server
    import threading
    state = {"data": os.urandom(3000), "ranges": True, "seen": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked = self.headers.get("Range")
            state["seen"].append(asked)
            start = int(asked[6:-1]) if asked and state["ranges"] else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(state["data"]) - start))
            self.end_headers()
            self.wfile.write(state["data"][start:])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/big.zip", state
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("ranges", [True, False])
def test_url_fetch_resumes_a_partial_file_where_the_server_allows(tmp_path, file_server, ranges):
    from clip_foundation.data.webfetch import url_fetch
    url, state = file_server
    state["ranges"] = ranges
    put(tmp_path / "big.zip.part", state["data"][:1000] if ranges else b"stale bytes")  # an interrupted run
    assert url_fetch(url, tmp_path) == tmp_path / "big.zip"
    assert (tmp_path / "big.zip").read_bytes() == state["data"] and not (tmp_path / "big.zip.part").exists()
    assert state["seen"] == ["bytes=1000-" if ranges else "bytes=11-"]
    url_fetch(url, tmp_path)  # a fresh download asks for the whole file
    assert state["seen"][-1] is None and (tmp_path / "big.zip").read_bytes() == state["data"]


# ---------------------------------------------------------------- the notebook's flows on them

def synthetic_standard_folder(root: Path, kind: str) -> Path:
    """The tiny synthetic shapes, written as a Karpathy split file (COCO-style, with restval) or as
    the official COCO captions, images as JPEGs under the datasets' own names."""
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    source = generate(root / "synthetic", SyntheticConfig(n_train=56, n_val=8, n_test=16, image_size=32), progress=False)
    records = load_records(source)
    data = root / kind
    entries, coco = [], {"train": [], "val": []}
    for i, r in enumerate(records):
        split = "restval" if r.split == "train" and i % 7 == 0 else r.split
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{i + 1:012d}.jpg" if kind == "karpathy" else f"{i + 1:012d}.jpg"
        if kind == "coco":  # the official files have no test split: test images join val
            folder = "train2017" if split in ("train", "restval") else "val2017"
            coco["train" if folder == "train2017" else "val"].append({"id": i + 1, "file_name": name, "captions": r.captions})
        entries.append({"filepath": folder, "filename": name, "cocoid": i + 1, "split": split, "captions": r.captions})
        (data / folder).mkdir(parents=True, exist_ok=True)
        open_rgb(r.image).save(data / folder / name, quality=95)
    if kind == "karpathy":
        write_json(data / "dataset_coco.json", karpathy_file("coco", entries))
    else:
        for split, images in coco.items():
            write_json(data / "annotations" / f"captions_{split}2017.json", coco_file("2017", split, images))
    return data


@pytest.mark.slow
@pytest.mark.parametrize("kind,split", [("karpathy", "test"), ("coco", "val")])
def test_train_evaluate_search_and_classify_on_a_standard_folder(tmp_path, kind, split):
    data = synthetic_standard_folder(tmp_path, kind)
    _, run, _ = train.main([f"--data={data}", f"--out_dir={tmp_path / 'runs'}", "--run_name=tiny", "--epochs=2",
                            "--batch_size=16", "--lr=2e-3", "--warmup_steps=2", "--progress=false",
                            f"--cache_dir={tmp_path / 'cache'}", *TINY_MODEL])
    # the split the run used is the one the files name (restval trained on)
    expected = {s: [] for s in ("train", "val", "test")}
    if kind == "karpathy":
        for e in json.loads((data / "dataset_coco.json").read_text())["images"]:
            expected["train" if e["split"] == "restval" else e["split"]].append(
                (data / e["filepath"] / e["filename"], [s["raw"] for s in e["sentences"]]))
    else:
        for s in ("train", "val"):
            d = json.loads((data / "annotations" / f"captions_{s}2017.json").read_text())
            for im in d["images"]:
                expected[s].append((data / f"{s}2017" / im["file_name"],
                                    [a["caption"] for a in d["annotations"] if a["image_id"] == im["id"]]))
    used = json.loads((run / "split.json").read_text())
    assert {s: sorted(used[s]) for s in expected} == {s: sorted(str(p) for p, _ in v) for s, v in expected.items()}
    # evaluate.py --data=DIR --split=S: both directions, on exactly those images and captions
    metrics = evaluate.main([f"--checkpoint={run}", f"--data={data}", f"--split={split}", f"--out={tmp_path / 'e.json'}"])
    model = CLIPModel.from_pretrained(run).eval()
    reference = evaluate_records(model, [Record(p, c) for p, c in expected[split]])
    for key in ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1", "image_to_text_R@5",
                "images", "captions"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-4), key
    assert metrics["images"] == len(expected[split])
    # a Gallery over the split's images: find_matches, find_captions, zero-shot classify
    g = gallery.Gallery.from_run(run, data=str(data), split=split, model=model)
    matches = g.find_matches("a red circle", n=3)
    paths = {str(p) for p, _ in expected[split]}
    assert len(matches) == 3 and {m.path for m in matches} <= paths
    with torch.no_grad():
        query = model.encode_text(["a red circle"])
        cosines = {str(r.image): (query @ model.encode_image(model.image_transform()(open_rgb(r.image))[None]).T).item()
                   for r in g.records}
    torch.testing.assert_close(torch.tensor([m.score for m in matches]),
                               torch.tensor(sorted(cosines.values(), reverse=True)[:3]), atol=5e-3, rtol=0)
    image = expected[split][0][0]
    captions = g.find_captions(image, n=2)
    assert {c.caption for c in captions} <= {c for _, cs in expected[split] for c in cs}
    labels = [expected[split][0][1][0], next(cs[0] for _, cs in expected[split] if cs[0] != expected[split][0][1][0])]
    probs = dict(zeroshot.classify(model, image, labels))
    with torch.no_grad():
        want = (model.scale() * model.encode_image(model.image_transform()(open_rgb(image))[None])
                @ model.encode_text(labels).T).softmax(-1)[0]
    assert [probs[label] for label in labels] == pytest.approx(want.tolist(), abs=1e-5)


def test_evaluate_on_coco_test_says_it_has_none(tmp_path, tiny_run_free_model):
    make_coco(tmp_path / "coco")
    with pytest.raises(SystemExit, match="the test split of .* is empty"):
        evaluate.main([f"--checkpoint={tiny_run_free_model}", f"--data={tmp_path / 'coco'}", "--split=test"])


@pytest.fixture
def tiny_run_free_model(tmp_path):
    """An untrained tiny CLIP saved as a run folder (nothing here depends on its quality)."""
    cfg = cli.apply_overrides(train.RunConfig(), list(TINY_MODEL)).model
    CLIPModel(cfg, captions=["a photo"]).save_pretrained(tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- the shared real copy

@pytest.mark.slow
def test_shared_flickr8k_with_a_split_file(tmp_path):
    shared = SHARED / "data" / "flickr8k"
    if not (shared / "captions.txt").is_file():
        pytest.skip(f"shared Flickr8k copy not found at {shared}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        kaggle = load_records(shared)  # its official train/dev lists
    absent = ["0000000001_absent.jpg", "0000000002_absent.jpg"]  # like the test images this copy lacks
    assert not any((shared / "Images" / n).exists() for n in absent)
    entries = [{"filename": r.image.name, "split": r.split, "captions": r.captions} for r in kaggle]
    entries += [{"filename": n, "split": "test", "captions": captions_of(n)} for n in absent]
    write_json(tmp_path / "dataset_flickr8k.json", karpathy_file("flickr8k", entries))
    (tmp_path / "Images").symlink_to(shared / "Images")
    records, report = load_records_with_report(tmp_path, skip_bad=True)
    assert report.layout == "karpathy" and report.skipped == {"missing image": 2}
    counts = {s: sum(r.split == s for r in records) for s in ("train", "val", "test")}
    assert counts == {"train": 6000, "val": 1000, "test": 0} and all(len(r.captions) == 5 for r in records)
    assert [(r.image, r.captions) for r in records] == [(r.image, r.captions) for r in kaggle]
