"""data/sources.py: every layout, auto-detect, bad input (strict and skip_bad), open_rgb."""
import io
import re
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_foundation.data.sources import (MAX_CAPTION_CHARS, detect_layout, load_records,  # noqa: E402
                                     load_records_with_report, read_caption_csv, read_class_folders)
from clip_foundation.data.records import DataError, DataWarning, LoadReport, open_rgb  # noqa: E402

SHARED_FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def _jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else r.encode()) + b"\n" for r in rows)


def images(folder: Path, *names):
    for n in names:
        write(folder / n, JPEG)


# ---------------------------------------------------------------- layout fixtures (exact on-disk formats)

def make_synthetic(root: Path, rows=None) -> Path:
    images(root / "images", "0.png", "1.png")
    write(root / "captions.csv", lines(*(rows or (
        "image,caption,split,n_shapes,color1",
        "images/0.png,a red circle,train,1,red",
        "images/0.png,one red circle,train,1,red",
        "images/1.png,two blue squares,val,2,blue"))))
    return root


def make_flickr30k(root: Path, rows=None) -> Path:
    inner = root / "flickr30k_images"
    images(inner / "flickr30k_images", "1000092795.jpg", "2199200615.jpg")
    default = ["image_name| comment_number| comment"]
    default += [f"1000092795.jpg| {i}| Two young guys with shaggy hair number {i} ."
                for i in range(5)]
    default += [f"2199200615.jpg| {i}| A dog {i} plays ." for i in range(4)]
    default += ["2199200615.jpg| 4   A dog runs across the grass ."]  # the real malformed row
    write(inner / "results.csv", lines(*(rows or default)))
    return root


def make_flickr8k(root: Path, rows=None, splits=None) -> Path:
    images(root / "Images", "1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg")
    write(root / "captions.txt", lines(*(rows or (
        "image,caption",
        *[f"1000268201_693b08cb0e.jpg,A child climbing stairs {i} ." for i in range(5)],
        '1001773457_577c3a7d70.jpg,"A black dog and a spotted dog are fighting , outside"',
        *[f"1001773457_577c3a7d70.jpg,Two dogs {i} ." for i in range(4)]))))
    for name, names in (splits or {}).items():
        write(root / name, lines(*names))
    return root


def make_flickr8k_token(root: Path) -> Path:
    images(root / "Flicker8k_Dataset", "1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg",
           "1002674143_1b742ab4b8.jpg")
    write(root / "Flickr8k.token.txt", lines(
        *[f"1000268201_693b08cb0e.jpg#{i}\tA child in a pink dress {i} ." for i in range(5)],
        *[f"1001773457_577c3a7d70.jpg#{i}\tA black dog {i} ." for i in range(5)],
        *[f"1002674143_1b742ab4b8.jpg#{i}\tA little girl {i} ." for i in range(5)],
        # the real token file names an image that is not in the distribution:
        *[f"2258277193_586949ec62.jpg.1#{i}\tPeople sit on a bench {i} ." for i in range(5)]))
    write(root / "Flickr_8k.trainImages.txt", lines("1000268201_693b08cb0e.jpg"))
    write(root / "Flickr_8k.devImages.txt", lines("1001773457_577c3a7d70.jpg"))
    write(root / "Flickr_8k.testImages.txt", lines("1002674143_1b742ab4b8.jpg"))
    return root


def make_photos(root: Path) -> Path:
    """The tutorial's own-photos CSV: id,image,caption, several captions per image."""
    images(root / "pics", "beach.jpg", "dog.jpg")
    write(root / "my_photos.csv", lines(
        "id,image,caption", "1,pics/beach.jpg,a sunny beach", "2,pics/dog.jpg,my dog",
        "3,pics/beach.jpg,the sea at noon"))
    return root


def make_classes(root: Path, splits=False) -> Path:
    for split in (("train", "test") if splits else ("",)):
        images(root / split / "cat", "a.jpg", "b.jpg")
        images(root / split / "pickup_truck", "c.png")
    return root


def make_hf(root: Path, kind: str, captions=None) -> Path:
    datasets = pytest.importorskip("datasets")
    pics = [Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("L", (6, 6), 90)]
    ds = datasets.Dataset.from_dict({"id": [7, 8], "picture": pics, "captions": captions or [
        ["a red square", "red"], ["a grey square"]]})
    ds = ds.cast_column("picture", datasets.Image())
    if kind == "disk":
        ds.save_to_disk(str(root))
    elif kind == "dict":
        datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(root))
    else:
        root.mkdir(parents=True)
        ds.to_parquet(str(root / "train-00000-of-00001.parquet"))
    return root


# ---------------------------------------------------------------- layouts

def test_synthetic_csv_keeps_loading(tmp_path):
    recs = load_records(make_synthetic(tmp_path))
    assert [r.captions for r in recs] == [["a red circle", "one red circle"], ["two blue squares"]]
    assert [r.split for r in recs] == ["train", "val"]
    assert recs[0].extra == {"n_shapes": "1", "color1": "red"} and recs[0].line == 2
    assert recs[1].image == (tmp_path / "images" / "1.png").resolve()
    assert read_caption_csv(tmp_path)[1].captions == ["two blue squares"]


def test_own_photos_csv(tmp_path):
    recs = load_records(make_photos(tmp_path))  # the only CSV in the folder, any name
    assert [(r.image.name, r.captions) for r in recs] == [
        ("beach.jpg", ["a sunny beach", "the sea at noon"]), ("dog.jpg", ["my dog"])]
    assert recs[0].extra == {"id": "1"} and recs[0].split is None
    assert len(load_records(tmp_path / "my_photos.csv")) == 2  # the CSV file itself


def test_csv_options_image_dir_and_absolute_paths(tmp_path):
    images(tmp_path / "elsewhere", "x.jpg")
    write(tmp_path / "data" / "pairs.csv", lines(
        "file,text", "x.jpg,an x", f"{(tmp_path / 'elsewhere' / 'x.jpg').resolve()},abs x"))
    recs = load_records(tmp_path / "data", "csv", csv_name="pairs.csv", image_column="file",
                        caption_column="text", image_dir=str(tmp_path / "elsewhere"))
    assert len(recs) == 1 and recs[0].captions == ["an x", "abs x"]


@pytest.mark.parametrize("inner", [False, True])
def test_flickr30k_repairs_the_malformed_row(tmp_path, inner):
    root = make_flickr30k(tmp_path)
    root = root / "flickr30k_images" if inner else root
    with pytest.warns(DataWarning, match=r"results\.csv:11: missing '\|'"):
        recs = load_records(root)
    assert [len(r.captions) for r in recs] == [5, 5]
    assert recs[1].captions[-1] == "A dog runs across the grass ."
    _, report = load_records_with_report(root)
    assert report.layout == "flickr30k" and report.notes == {"repaired row": 1}


def test_flickr8k_kaggle_without_splits(tmp_path):
    recs = load_records(make_flickr8k(tmp_path))
    assert [len(r.captions) for r in recs] == [5, 5] and {r.split for r in recs} == {None}
    assert recs[1].captions[0] == "A black dog and a spotted dog are fighting , outside"


@pytest.mark.parametrize("files", [
    ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt"), ("splits/train.txt", "splits/dev.txt")])
def test_flickr8k_split_lists(tmp_path, files):
    root = make_flickr8k(tmp_path, splits={files[0]: ["1000268201_693b08cb0e.jpg"],
                                           files[1]: ["1001773457_577c3a7d70.jpg"]})
    assert [r.split for r in load_records(root)] == ["train", "val"]


def test_flickr8k_original_token_file_and_shared_copy_rules(tmp_path):
    root = make_flickr8k_token(tmp_path)
    recs, report = load_records_with_report(root)
    assert report.layout == "flickr8k"
    assert [(r.split, len(r.captions)) for r in recs] == [("train", 5), ("val", 5), ("test", 5)]
    # named in captions, in no split list, absent on disk: dropped, and said so
    assert report.notes == {"dropped, not on disk nor in a split list": 1}
    assert "2258277193_586949ec62.jpg.1" in report.summary()


def test_flickr8k_unlisted_image_on_disk_is_kept_and_noted(tmp_path):
    root = make_flickr8k(tmp_path, splits={"splits/train.txt": ["1000268201_693b08cb0e.jpg"]})
    recs, report = load_records_with_report(root)
    assert [r.split for r in recs] == ["train", None]
    assert report.notes == {"kept with split=None, in no split list": 1}


@pytest.mark.parametrize("splits", [False, True])
def test_class_folders(tmp_path, splits):
    root = make_classes(tmp_path, splits)
    recs, classes = read_class_folders(root)
    assert classes == ["cat", "pickup_truck"]
    assert len(recs) == (6 if splits else 3)
    truck = next(r for r in recs if r.extra["label"] == "pickup_truck")
    assert truck.captions[0] == "a photo of a pickup truck." and len(truck.captions) >= 3
    assert {r.split for r in recs} == ({"train", "test"} if splits else {None})
    assert len(load_records(root)) == len(recs)


@pytest.mark.parametrize("kind", ["disk", "dict", "parquet"])
def test_hf_datasets_materialized_once(tmp_path, kind):
    src = make_hf(tmp_path / "src", kind)
    cache = tmp_path / "cache"
    recs = load_records(src, cache_dir=cache)
    n = 2 if kind == "dict" else 1
    assert len(recs) == 2 * n and recs[0].captions == ["a red square", "red"]
    assert recs[0].image.parent == (cache / "images").resolve() and recs[0].image.is_file()
    assert open_rgb(recs[1].image).getpixel((0, 0)) == (90, 90, 90)
    assert {r.split for r in recs} == ({"train", "val"} if kind == "dict" else
                                       {"train"} if kind == "parquet" else {None})
    mtime = recs[0].image.stat().st_mtime_ns
    again = load_records(src, cache_dir=cache)  # from the manifest: nothing rewritten
    assert [(r.image, r.captions) for r in again] == [(r.image, r.captions) for r in recs]
    assert again[0].image.stat().st_mtime_ns == mtime


def test_hf_parquet_file_and_column_options(tmp_path):
    src = make_hf(tmp_path / "src", "parquet", captions=["one", "two"])
    recs = load_records(src / "train-00000-of-00001.parquet", "hf", image_column="picture",
                        caption_column="captions", cache_dir=tmp_path / "c")
    assert [r.captions for r in recs] == [["one"], ["two"]]
    with pytest.raises(DataError, match="no caption column 'nope'"):
        load_records(src, caption_column="nope", cache_dir=tmp_path / "d")


def test_hf_without_datasets_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r'pip install "clip-foundation\[hf\]"'):
        load_records("hf:someone/some-dataset", cache_dir=tmp_path)


# ---------------------------------------------------------------- auto-detect

@pytest.mark.parametrize("make, layout", [
    (make_synthetic, "csv"), (make_photos, "csv"), (make_flickr30k, "flickr30k"),
    (make_flickr8k, "flickr8k"), (make_flickr8k_token, "flickr8k"), (make_classes, "classes"),
    (lambda p: make_hf(p, "disk"), "hf"), (lambda p: make_hf(p, "parquet"), "hf")])
def test_auto_detect(tmp_path, make, layout):
    assert detect_layout(make(tmp_path / "ds")) == layout
    assert detect_layout("hf:user/name") == "hf"


def test_unknown_folder_lists_expected_layouts(tmp_path):
    write(tmp_path / "notes.txt", "hello")
    with pytest.raises(DataError) as e:
        load_records(tmp_path)
    for layout in ("csv", "flickr30k", "flickr8k", "classes", "hf", "results.csv", "captions.txt"):
        assert layout in str(e.value)
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "absent")
    with pytest.raises(DataError, match="unknown layout"):
        load_records(tmp_path, "xml")


# ---------------------------------------------------------------- bad input

CSV_HEAD = "image,caption,split"
F30_HEAD = "image_name| comment_number| comment"
F8_HEAD = "image,caption"
A, B = "1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"


def _csv(rows):
    return lambda p: make_synthetic(p, [CSV_HEAD, "images/0.png,ok,train", *rows])


def _f30(rows):
    return lambda p: make_flickr30k(p, [F30_HEAD, "1000092795.jpg| 0| ok .", *rows])


def _f8(rows, splits=None):
    return lambda p: make_flickr8k(p, [F8_HEAD, f"{A},ok .", *rows], splits)


BAD = [  # (make, bad line "file:line", kind[, options])
    (_csv(["images/missing.png,a cat,train"]), "captions.csv:3", "missing image"),
    (_csv(["images/1.png,   ,train"]), "captions.csv:3", "empty caption"),
    (_csv(["images/1.png,a,b,c"]), "captions.csv:3", "wrong field count"),
    (_csv([b"images/1.png,caf\xe9 au lait,train"]), "captions.csv:3", "not utf-8"),
    (_csv(["images/1.png,x,train", "images/0.png,ok,train"]), "captions.csv:4", "duplicate row"),
    (_f30(["9999.jpg| 0| a cat ."]), "results.csv:3", "missing image"),
    (_f30(["2199200615.jpg| 0|  "]), "results.csv:3", "empty caption"),
    (_f30(["2199200615.jpg| a dog"]), "results.csv:3", "wrong field count"),
    (_f30([b"2199200615.jpg| 0| a \xff dog"]), "results.csv:3", "not utf-8"),
    (_f30(["1000092795.jpg| 0| ok ."]), "results.csv:3", "duplicate row"),
    (_f30(["1000092795.jpg| 1| ok ."]), "results.csv:3", "duplicate row", {"allow_duplicates": False}),
    (_f8(["404.jpg,a cat ."]), "captions.txt:3", "missing image"),
    (_f8([f"{B},"]), "captions.txt:3", "empty caption"),
    (_f8([f"{B},a,b"]), "captions.txt:3", "wrong field count"),
    (_f8([b"1001773457_577c3a7d70.jpg,na\xefve dog"]), "captions.txt:3", "not utf-8"),
    (_f8([f"{A},ok ."]), "captions.txt:3", "duplicate row", {"allow_duplicates": False}),
    (_f8([], {"splits/train.txt": [A, B]}), "train.txt:2", "no captions"),
    (_f8(["404.jpg,a cat ."], {"splits/train.txt": [A, "404.jpg"]}), "captions.txt:3",
     "missing image"),
    # a stray quote makes the caption run on over the next lines (csv lets quotes span lines)
    (_f8([f'{B},"never closed', f"{A},lost ."]), "captions.txt:3", "multi-line caption"),
    (_csv([f"images/1.png,{'x' * (MAX_CAPTION_CHARS + 1)},train"]), "captions.csv:3",
     "caption too long"),
    (_f30([f"2199200615.jpg| 0| {'x' * (MAX_CAPTION_CHARS + 1)}"]), "results.csv:3",
     "caption too long"),
    (_f8([f"{B},{'x' * (MAX_CAPTION_CHARS + 1)}"]), "captions.txt:3", "caption too long"),
    # only invisible characters (zero-width space, joiners, BOM, word joiner): empty
    (_csv(["images/1.png,\u200b\u200c\ufeff,train"]), "captions.csv:3", "empty caption"),
    (_f30(["2199200615.jpg| 0| \u200b \t\u2060"]), "results.csv:3", "empty caption"),
    (_f8([f"{B},\u200b"]), "captions.txt:3", "empty caption"),
]


@pytest.mark.parametrize("make, where, kind, options", [(*c, {})[:4] for c in BAD],
                         ids=[f"{c[1]}-{c[2]}{'-strict' if c[3:] else ''}" for c in BAD])
def test_bad_input_raises_with_file_and_line(tmp_path, make, where, kind, options):
    root = make(tmp_path)
    with pytest.raises(DataError, match=rf"{where.replace('.', '[.]')}: "):
        load_records(root, **options)
    with pytest.warns(DataWarning, match=rf"skipped 1: 1 {kind} \(first: .*{where}"):
        recs = load_records(root, skip_bad=True, **options)
    assert recs  # the good rows still load
    _, report = load_records_with_report(root, skip_bad=True, **options)
    assert report.skipped == {kind: 1}


@pytest.mark.parametrize("make, where", [(_f8([f"{A},ok ."]), "captions.txt:3"),
                                         (_f30(["1000092795.jpg| 1| ok ."]), "results.csv:3")])
def test_flickr_identical_captions_are_kept_and_noted(tmp_path, make, where):
    # the published Flickr8k has 9 images with one caption written twice by annotators
    recs, report = load_records_with_report(make(tmp_path))
    assert recs[0].captions == ["ok .", "ok ."]
    assert report.notes == {"identical caption kept": 1} and where in report.summary()


def test_non_utf8_is_not_a_traceback_and_token_file_errors(tmp_path):
    root = make_flickr8k_token(tmp_path)
    token = root / "Flickr8k.token.txt"
    token.write_bytes(token.read_bytes() + lines(f"{A}#9\t", "no tab here", b"x.jpg#0\t\xff"))
    _, report = load_records_with_report(root, skip_bad=True)
    assert report.skipped == {"empty caption": 1, "wrong field count": 1, "not utf-8": 1}
    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt:21: empty caption"):
        load_records(root)


def test_hf_bad_rows(tmp_path):
    src = make_hf(tmp_path / "src", "disk", captions=[["ok", "ok", " "], []])
    with pytest.raises(DataError, match=r"\[unsplit\]:row 0: duplicate caption"):
        load_records(src, cache_dir=tmp_path / "c")
    recs, report = load_records_with_report(src, skip_bad=True, cache_dir=tmp_path / "c")
    assert [r.captions for r in recs] == [["ok"]]
    assert report.skipped == {"duplicate row": 1, "empty caption": 1, "no captions": 1}
    _, again = load_records_with_report(src, skip_bad=True, cache_dir=tmp_path / "c")
    assert again.skipped == report.skipped  # replayed from the manifest, still reported


@pytest.mark.parametrize("rows", [300, 14_000])  # 14,000: the swallowed field passes csv's 128 KB field limit
@pytest.mark.parametrize("split, kind, error", [
    ("", "multi-line caption", "caption spans lines 12-{last}"),  # caption last: it eats the rest
    (",split", "wrong field count", "expected 3 fields .*, got 2; the row spans lines 12-{last}")])
def test_stray_quote_is_named_not_swallowed(tmp_path, split, kind, error, rows):
    # row 11 opens a quote it never closes: csv reads the rest of the file into it
    images(tmp_path / "images", *[f"{i:05d}.png" for i in range(11)])
    write(tmp_path / "captions.csv", lines(f"image,caption{split}", *[
        f'images/{i:05d}.png,"quote never closed' if i == 10 else f"images/{i:05d}.png,photo {i}"
        + (",train" if split else "") for i in range(rows)]))
    error = error.format(last=rows + 1)
    with pytest.raises(DataError, match=rf"captions\.csv:12: {error}: an unclosed quote\?$"):
        load_records(tmp_path)
    recs, report = load_records_with_report(tmp_path, skip_bad=True)
    assert len(recs) == 10 and report.skipped == {kind: 1}


def test_caption_limits_keep_real_captions_unchanged(tmp_path):
    real = ["x" * MAX_CAPTION_CHARS,
            "a family \U0001f468\u200d\U0001f469\u200d\U0001f467 on a beach",  # joined emoji
            "caf\u00e9\u200b au lait", '"quoted" one, on one line']
    quoted = ['"' + c.replace('"', '""') + '"' for c in real]  # as a spreadsheet writes them
    make_synthetic(tmp_path, [CSV_HEAD, *[f"images/0.png,{q},train" for q in quoted]])
    assert load_records(tmp_path)[0].captions == real


@pytest.mark.parametrize("header, row, repeated", [
    ("image,caption,caption", "images/0.png,first,second", "['caption']"),
    ("image,image,caption,split,split", "images/0.png,images/1.png,a,train,val",
     "['image', 'split']"),
    (" caption,image,caption ", "first,images/0.png,second", "['caption']")])
def test_csv_repeated_column_is_an_error(tmp_path, header, row, repeated):
    # each row is well formed: without the check the last column of a name silently wins
    make_synthetic(tmp_path, [header, row])
    with pytest.raises(DataError,
                       match=rf"captions\.csv:1: repeated column\(s\) {re.escape(repeated)}"):
        load_records(tmp_path)


def test_csv_blank_trailing_columns_still_load(tmp_path):
    # spreadsheets export "image,caption,," when cells right of the data were once touched
    make_synthetic(tmp_path, ["image,caption,,", "images/0.png,a red circle,,"])
    assert load_records(tmp_path)[0].captions == ["a red circle"]


def test_report_summary_is_one_line():
    report = LoadReport(skip_bad=True)
    report.bad("missing image", "a.csv:3", "image file not found: x.jpg")
    report.bad("missing image", "a.csv:9", "image file not found: y.jpg")
    report.bad("empty caption", "a.csv:5", "empty caption")
    assert report.summary() == ("skipped 3: 2 missing image, 1 empty caption (first: "
                                "a.csv:3: image file not found: x.jpg; a.csv:5: empty caption)")
    assert LoadReport().summary() == ""


# ---------------------------------------------------------------- open_rgb

def _saved(tmp_path, name, im, **kw) -> Path:
    im.save(tmp_path / name, **kw)
    return tmp_path / name


@pytest.mark.parametrize("name, image, expect", [
    ("grey.png", Image.new("L", (4, 4), 77), (77, 77, 77)),
    ("cmyk.jpg", Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ("rgba.png", Image.new("RGBA", (4, 4), (0, 0, 255, 0)), (255, 255, 255)),
    ("half.png", Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),
    ("la.png", Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    ("pal.png", Image.new("P", (4, 4), 0), (0, 0, 0)),
    ("grey16.png", Image.new("I;16", (4, 4), 51400), (200, 200, 200)),
])
def test_open_rgb_converts(tmp_path, name, image, expect):
    im = open_rgb(_saved(tmp_path, name, image))
    assert im.mode == "RGB" and im.size == (4, 4)
    assert all(abs(a - b) <= 3 for a, b in zip(im.getpixel((1, 1)), expect))


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")  # noise: many bytes
    return buf.getvalue()[:len(buf.getvalue()) // 2]


@pytest.mark.parametrize("data", [_truncated_jpeg(), b"this is not an image", b""],
                         ids=["truncated", "garbage", "empty"])
def test_open_rgb_corrupt_raises(tmp_path, monkeypatch, data):
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # someone else's setting
    path = write(tmp_path / "bad.jpg", data)
    with pytest.raises(DataError, match=r"bad\.jpg: cannot decode image \(.+\)"):
        open_rgb(path)


@pytest.mark.parametrize("values, expect", [
    ([[0.0, 0.7], [1.0, 0.25]], [0, 178, 255, 63]),       # 0-1, as scientific images store them
    ([[0.0, 178.5], [300.0, -5.0]], [0, 178, 255, 0])],   # already 0-255: clipped
    ids=["unit", "0-255"])
def test_open_rgb_float_tiff(tmp_path, values, expect):
    np = pytest.importorskip("numpy")
    path = _saved(tmp_path, "float.tiff", Image.fromarray(np.array(values, np.float32), mode="F"))
    with Image.open(path) as stored:
        assert stored.mode == "F"  # a real 32-bit float TIFF
    im = open_rgb(path)
    assert im.mode == "RGB"
    assert [im.getpixel((x, y)) for y in (0, 1) for x in (0, 1)] == [(v, v, v) for v in expect]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixels: tiny, and decoding it fails."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, > 89 MP
@pytest.mark.parametrize("width, height, error", [
    (12000, 12000, r"image is 12000x12000 \(144 MP\), more than the 64 MP this loader decodes"),
    (8001, 8000, r"image is 8001x8000 \(65 MP\), more than the 64 MP"),
    (8000, 8000, r"cannot decode image"),  # at the limit: decoded (and this one has no pixels)
])
def test_open_rgb_refuses_huge_images_from_the_header(tmp_path, width, height, error):
    pixels_limit = Image.MAX_IMAGE_PIXELS
    path = write(tmp_path / "huge.png", _png_header(width, height))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {error}"):
        open_rgb(path)
    assert Image.MAX_IMAGE_PIXELS == pixels_limit  # PIL's global setting is left alone


# ---------------------------------------------------------------- the shared real copy

def test_shared_flickr8k():
    if not (SHARED_FLICKR8K / "captions.txt").is_file():
        pytest.skip(f"shared Flickr8k copy not found at {SHARED_FLICKR8K}")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        recs, report = load_records_with_report(SHARED_FLICKR8K)
    seconds = time.perf_counter() - start
    assert report.layout == "flickr8k" and not report.skipped
    by_split = {s: [r for r in recs if r.split == s] for s in ("train", "val", "test", None)}
    assert (len(by_split["train"]), len(by_split["val"])) == (6000, 1000)
    assert not by_split["test"] and not by_split[None]
    assert all(len(r.captions) == 5 for r in recs)
    assert seconds < 10, f"loading took {seconds:.1f}s"


def test_hf_images_go_to_the_repository_data_folder():
    from clip_foundation.data.hf import default_cache_dir
    root = Path(__file__).resolve().parents[1]
    assert default_cache_dir("hf:user/set") == root / "data" / "hf" / "user_set"
