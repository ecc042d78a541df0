import csv
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_foundation.data import synthetic  # noqa: E402
from clip_foundation.data.synthetic import COLORS, SIZES, SyntheticConfig, ensure_synthetic, generate, main  # noqa: E402

SIZE_WORDS = {w for ws in synthetic.SIZE_WORDS.values() for w in ws}
TINY = SyntheticConfig(n_train=20, n_val=5, n_test=5, image_size=64, captions_per_image=5, seed=0)


def read_rows(root):
    with open(Path(root) / "captions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def by_image(rows):
    groups = defaultdict(list)
    for row in rows:
        groups[row["image"]].append(row)
    return groups


def shapes_of(row):
    """The (color, shape, size, x, y) of each shape in an image row."""
    return [(row[f"color{i}"], row[f"shape{i}"], row[f"size{i}"],
             float(row[f"x{i}"]), float(row[f"y{i}"])) for i in range(1, int(row["n_shapes"]) + 1)]


def image_size(root):
    return json.loads((Path(root) / "synthetic.json").read_text())["image_size"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn") / "data", TINY, progress=False)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    # more images, so attribute/caption checks see every relation, position and template
    return generate(tmp_path_factory.mktemp("syn") / "data",
                    SyntheticConfig(n_train=200, n_val=0, n_test=0, seed=3), progress=False)


def test_deterministic_for_a_seed(tiny, tmp_path):
    again = generate(tmp_path / "again", TINY, progress=False)
    assert (again / "captions.csv").read_bytes() == (tiny / "captions.csv").read_bytes()
    for name in sorted(p.name for p in (tiny / "images").glob("*.png")):
        a = np.asarray(Image.open(tiny / "images" / name))
        b = np.asarray(Image.open(again / "images" / name))
        assert np.array_equal(a, b), name


def test_different_seed_differs(tiny, tmp_path):
    other = generate(tmp_path / "other", replace(TINY, seed=1), progress=False)
    assert (other / "captions.csv").read_bytes() != (tiny / "captions.csv").read_bytes()
    a = np.asarray(Image.open(tiny / "images" / "00000.png"))
    b = np.asarray(Image.open(other / "images" / "00000.png"))
    assert not np.array_equal(a, b)


def test_layout(tiny):
    rows = read_rows(tiny)
    assert list(rows[0].keys()) == synthetic.COLUMNS
    assert synthetic.COLUMNS[:3] == ["image", "caption", "split"]
    groups = by_image(rows)
    n = TINY.n_train + TINY.n_val + TINY.n_test
    assert sorted(groups) == [f"images/{i:05d}.png" for i in range(n)]
    files = sorted(p.name for p in (tiny / "images").glob("*.png"))
    assert files == [f"{i:05d}.png" for i in range(n)]
    for name, group in groups.items():
        assert len(group) == TINY.captions_per_image
        assert len({r["split"] for r in group}) == 1, f"{name} is in two splits"
        assert len({tuple(r[c] for c in synthetic.COLUMNS[3:]) for r in group}) == 1
        with Image.open(tiny / name) as im:
            assert im.mode == "RGB" and im.size == (TINY.image_size, TINY.image_size)
    splits = [g[0]["split"] for g in groups.values()]
    assert {s: splits.count(s) for s in set(splits)} == {"train": 20, "val": 5, "test": 5}
    assert json.loads((tiny / "synthetic.json").read_text()) == asdict(TINY)


def test_readable_by_readers(tiny):
    from clip_foundation.data.sources import load_records
    records = load_records(tiny)
    assert len(records) == 30 and all(len(r.captions) == 5 for r in records)
    assert records[0].split == "train" and "color1" in records[0].extra


def test_attribute_columns_are_consistent(big):
    groups = by_image(read_rows(big))
    seen_rel, seen_pos = set(), set()
    for group in groups.values():
        row = group[0]
        if row["n_shapes"] == "1":
            assert row["relation"] == "" and row["color2"] == row["shape2"] == row["x2"] == ""
            assert row["position"] in synthetic.POSITIONS
            seen_pos.add(row["position"])
        else:
            assert row["n_shapes"] == "2" and row["position"] == ""
            (c1, s1, *_), (c2, s2, *_) = shapes_of(row)
            assert (c1, s1) != (c2, s2)
            seen_rel.add(row["relation"])
    assert seen_rel == set(synthetic.RELATION_WORDS) and seen_pos == set(synthetic.POSITIONS)
    n_two = sum(g[0]["n_shapes"] == "2" for g in groups.values())
    assert 0.3 < n_two / len(groups) < 0.7


def nearest_color(rgb):
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], rgb)))


def test_colors_and_sizes_match_pixels(big):
    for name, group in by_image(read_rows(big)).items():
        pixels = np.asarray(Image.open(big / name), dtype=np.float32)
        shapes = shapes_of(group[0])
        for color, shape, size, x, y in shapes:
            assert nearest_color(pixels[int(y), int(x)]) == color, (name, color, shape)
            if len({s[0] for s in shapes}) < len(shapes):
                continue  # two shapes of one colour: their areas can't be told apart
            # pixel area / r^2 is ~1.3 (triangle) .. ~3.1 (circle); the wrong size is 4x off
            area = (np.linalg.norm(pixels - COLORS[color], axis=2) < 60).sum()
            r = SIZES[size] * image_size(big)
            assert 1.0 < area / r ** 2 < 4.0, (name, shape, size, area / r ** 2)



def test_positions_and_relations_match_coordinates(big):
    s = image_size(big)
    for group in by_image(read_rows(big)).values():
        row = group[0]
        shapes = shapes_of(row)
        if len(shapes) == 1:
            x, y = shapes[0][3] / s, shapes[0][4] / s
            mid_x, mid_y = abs(x - 0.5) < 0.15, abs(y - 0.5) < 0.15
            expected = {"left": x < 0.35 and mid_y, "right": x > 0.65 and mid_y,
                        "top": y < 0.35 and mid_x, "bottom": y > 0.65 and mid_x,
                        "center": abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1}
            assert expected[row["position"]], row
            continue
        (_, _, z1, x1, y1), (_, _, z2, x2, y2) = shapes
        dx, dy = x2 - x1, y2 - y1  # from shape1 to shape2
        along, across = {"above": (dy, dx), "below": (-dy, dx),
                         "left of": (dx, dy), "right of": (-dx, dy)}[row["relation"]]
        # separated along the relation axis by more than both radii (no overlap) ...
        assert along > (SIZES[z1] + SIZES[z2]) * s, row
        # ... and clearly more than across it, so the relation is unambiguous
        assert along > 2 * abs(across), row


def skeleton(caption):
    """A caption with its content words blanked out: what template it came from."""
    words = set(COLORS) | set(synthetic.SHAPES) | SIZE_WORDS
    return " ".join("_" if w in words else w for w in caption.split())


def test_captions_name_every_shape_and_vary(big):
    groups = by_image(read_rows(big))
    skeletons = set()
    for group in groups.values():
        shapes = shapes_of(group[0])
        assert len({r["caption"] for r in group}) == len(group)  # distinct phrasings
        for row in group:
            cap = row["caption"]
            assert cap == cap.lower().strip() and not cap.endswith(".")
            for color, shape, *_ in shapes:
                assert re.search(rf"\b{color} {shape}\b", cap), (cap, color, shape)
            skeletons.add(skeleton(cap))
    assert len(skeletons) >= 10


def test_caption_words_agree_with_attributes(big):
    rel_words = {w: rel for rel, ws in synthetic.RELATION_WORDS.items() for w in ws}
    all_pos_words = [w for ws in synthetic.POSITION_WORDS.values() for w in ws]
    for group in by_image(read_rows(big)).values():
        row = group[0]
        for cap in (r["caption"] for r in group):
            if row["n_shapes"] == "1":  # a position phrase, if any, is the right one
                if any(w in cap for w in all_pos_words):
                    assert any(w in cap for w in synthetic.POSITION_WORDS[row["position"]]), cap
                continue
            found = sorted((cap.find(f" {w} "), -len(w), w) for w in rel_words if f" {w} " in cap)
            if not found:
                continue  # "x and y": relation left out
            word = rel_words[found[0][2]]
            p1 = cap.find(f"{row['color1']} {row['shape1']}")
            p2 = cap.find(f"{row['color2']} {row['shape2']}")
            # "x <rel> y" says where x is; "x with y <rel> it" says where y is
            subject_is_1 = (p1 < p2) != cap.endswith(" it")
            assert (word if subject_is_1 else synthetic.INVERSE[word]) == row["relation"], cap


def test_sizes_in_captions_agree(big):
    for row in read_rows(big):
        for color, shape, size, *_ in shapes_of(row):
            m = re.search(rf"(\w+) {color} {shape}", row["caption"])
            if m and m.group(1) in SIZE_WORDS:
                assert m.group(1) in synthetic.SIZE_WORDS[size], row["caption"]


def test_ensure_synthetic_reuses_and_regenerates(tmp_path):
    out = tmp_path / "data"
    ensure_synthetic(out, TINY)
    csv_path = out / "captions.csv"
    first = csv_path.stat().st_mtime_ns
    os.utime(csv_path, ns=(first - 10**9, first - 10**9))  # make a rewrite detectable
    stamp = csv_path.stat().st_mtime_ns
    assert ensure_synthetic(out, TINY) == out
    assert csv_path.stat().st_mtime_ns == stamp  # config matches: nothing rewritten
    other = replace(TINY, n_train=10)
    ensure_synthetic(out, other)
    assert csv_path.stat().st_mtime_ns != stamp
    assert json.loads((out / "synthetic.json").read_text())["n_train"] == 10
    assert len(list((out / "images").glob("*.png"))) == 20  # stale images removed


def test_ensure_synthetic_redoes_half_written_folder(tmp_path):
    out = generate(tmp_path / "data", TINY, progress=False)
    (out / "synthetic.json").unlink()  # as if generation had been interrupted
    stamp = (out / "captions.csv").stat().st_mtime_ns
    os.utime(out / "captions.csv", ns=(stamp - 10**9, stamp - 10**9))
    ensure_synthetic(out, TINY)
    assert (out / "synthetic.json").is_file()
    assert (out / "captions.csv").stat().st_mtime_ns != stamp - 10**9


@pytest.mark.parametrize("style", ["equals", "space"])
def test_main(tmp_path, capsys, style):
    out = tmp_path / "cli"
    args = {"out": str(out), "n_train": "4", "n_val": "1", "n_test": "2", "seed": "5"}
    argv = [f"--{k}={v}" for k, v in args.items()] if style == "equals" else \
        [x for k, v in args.items() for x in (f"--{k}", v)]
    main(argv)
    assert str(out) in capsys.readouterr().out
    assert len(by_image(read_rows(out))) == 7
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 5


@pytest.mark.parametrize("argv", [["--bogus=1"], ["--n_trai=3"], ["--n_train=x"], ["--n_val=-1"]])
def test_main_rejects_bad_args(tmp_path, argv):
    with pytest.raises(SystemExit) as e:
        main([f"--out={tmp_path}"] + argv)
    assert e.value.code != 0


def test_bad_config_rejected(tmp_path):
    with pytest.raises(ValueError):
        generate(tmp_path, SyntheticConfig(captions_per_image=0), progress=False)
