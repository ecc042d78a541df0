"""search.py and index.py: exact and FAISS top-k, the index files, caching, image -> text, the CLI."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from clip_foundation.search import command as search
from clip_foundation.data.splits import gallery_records, image_folder_records
from clip_foundation.search import gallery
from clip_foundation.data.records import DataError
from clip_foundation.search.index import GalleryIndex, build_faiss, exact_topk, faiss_module, load_index, recall_at_k, save_index

needs_faiss = pytest.mark.skipif(faiss_module() is None, reason="faiss not installed")


def unit(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def clustered(n, d=64, clusters=200, seed=0):
    """Unit vectors around `clusters` random centres (the same centres for every `seed`):
    the shape of real embedding galleries."""
    centres = F.normalize(torch.randn(clusters, d, generator=torch.Generator().manual_seed(123)), dim=1)
    g = torch.Generator().manual_seed(seed)
    points = centres[torch.randint(clusters, (n,), generator=g)] + 0.15 * torch.randn(n, d, generator=g)
    return F.normalize(points, dim=1)


# ---------------------------------------------------------------- top-k

@pytest.mark.parametrize("chunk", [1, 7, 100, 999, 10_000])
def test_exact_topk_equals_brute_force(chunk):
    gallery, queries = unit(1000, 32), unit(6, 32, seed=1)
    scores, indices = exact_topk(queries, gallery, 10, chunk)
    brute = (queries @ gallery.T).topk(10, dim=1)
    assert torch.equal(indices, brute.indices)
    assert torch.allclose(scores, brute.values, atol=1e-6)


def test_exact_topk_k_larger_than_gallery():
    scores, indices = exact_topk(unit(2, 8, seed=1), unit(5, 8), k=10, chunk=2)
    assert indices.shape == (2, 5) and sorted(indices[0].tolist()) == list(range(5))
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_gallery_index_search_matches_float16_brute_force():
    emb = unit(500, 16).half()
    index = GalleryIndex(emb, [f"{i}.png" for i in range(500)], "id")
    q = unit(3, 16, seed=2)
    scores, indices = index.search(q, 5, backend="exact", chunk=64)
    assert torch.equal(indices, (q @ emb.float().T).topk(5, dim=1).indices)


@needs_faiss
def test_faiss_flat_gives_the_exact_results():
    emb, q = unit(3000, 48), unit(20, 48, seed=3)
    flat, info = build_faiss(emb, kind="flat")
    index = GalleryIndex(emb.half(), [str(i) for i in range(3000)], "id", faiss_index=flat)
    exact = index.search(q, 10, backend="exact")
    approx = index.search(q, 10, backend="faiss")
    assert info["type"] == "IndexFlatIP"
    assert torch.equal(approx[1], exact[1])
    assert torch.allclose(approx[0], exact[0], atol=1e-3)  # float16 rows vs float32 copies


@needs_faiss
def test_ivf_recall_is_measured_and_high_on_a_clustered_gallery():
    emb = clustered(20_000)
    ivf, info = build_faiss(emb, kind="ivf", verbose=False)
    assert info["type"] == "IndexIVFFlat" and 400 <= info["nlist"] <= 600  # ~4 sqrt(20k) = 566
    assert info["recall@10"] >= 0.9 and info["recall_queries"] == 200
    fresh = clustered(300, seed=7)  # new points around the same centres: queries the build never saw
    _, exact = exact_topk(fresh, emb, 10)
    _, approx = GalleryIndex(emb.half(), [""] * len(emb), "", faiss_index=ivf).search(fresh, 10)
    assert recall_at_k(approx, exact, 10) >= 0.9


def test_recall_at_k_counts_overlap_and_drops_the_query_row():
    exact = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert recall_at_k(torch.tensor([[0, 1, 9], [5, 4, 3]]), exact, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert recall_at_k(torch.tensor([[0, 2, 1]]), torch.tensor([[0, 1, 2]]), 2, self_rows=[0]) == 1.0


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("with_faiss", [False, True])
def test_index_round_trip(tmp_path, with_faiss):
    if with_faiss and faiss_module() is None:
        pytest.skip("faiss not installed")
    emb = clustered(2000, d=32)
    index = GalleryIndex(emb.half(), [f"/x/{i}.png" for i in range(2000)], "v2:abc:def",
                         captions=[f"caption {i}" for i in range(2000)],
                         meta={"kind": "captions", "checkpoint": "/ck", "model": "abc"})
    if with_faiss:
        index.faiss_index, index.meta["faiss"] = build_faiss(emb, kind="ivf", verbose=False)
    save_index(index, tmp_path / "captions")
    back = load_index(tmp_path / "captions", "v2:abc:def")
    assert torch.equal(back.embeddings, index.embeddings) and back.embeddings.dtype == torch.float16
    assert (back.paths, back.identity, back.captions, back.meta) == (
        index.paths, index.identity, index.captions, index.meta)
    q = unit(5, 32, seed=4)
    assert torch.equal(back.search(q, 10)[1], index.search(q, 10)[1])
    if with_faiss:
        assert back.faiss_index.nprobe == index.meta["faiss"]["nprobe"]
    assert load_index(tmp_path / "captions", "v2:other:def") is None  # stale identity
    (tmp_path / "captions.json").unlink()
    assert load_index(tmp_path / "captions") is None  # incomplete: the JSON is written last


def test_build_index_in_chunks_equals_one_pass(tiny_run):
    from clipModel import CLIPModel
    data, run_dir, _ = tiny_run
    model = CLIPModel.from_pretrained(run_dir)
    records = gallery_records(run_dir, str(data), "test")[:20]
    one = gallery.build_index(model, records, progress=False)
    chunked = gallery.build_index(model, records, batch_size=3, chunk=7, progress=False)
    assert one.paths == chunked.paths == [str(r.image) for r in records]
    assert torch.allclose(one.embeddings.float(), chunked.embeddings.float(), atol=2e-3)


def test_index_from_cached_tower_features_equals_encoding_the_images(tiny_run):
    from clip_foundation.data.splits import decode_images
    from clip_foundation.training.features import image_tower_features
    from clipModel import CLIPModel
    data, run_dir, _ = tiny_run
    model = CLIPModel.from_pretrained(run_dir)
    records = gallery_records(run_dir, str(data), "test")[:20]
    images, records = decode_images(records, model.config.image.image_size, progress=False)
    features = image_tower_features(model, records, images, cache_dir=None, progress=False)
    encoded = gallery.build_index(model, records, images=images, progress=False)
    projected = gallery.index_from_tower_features(model, records, features)
    assert projected.paths == encoded.paths and projected.identity == encoded.identity
    assert torch.allclose(projected.embeddings.float(), encoded.embeddings.float(), atol=2e-3)


def test_cache_is_reused_then_rebuilt_when_a_gallery_file_or_the_model_changes(tiny_run, checkpoint):
    from clipModel import CLIPModel
    data, _, _ = tiny_run
    model = CLIPModel.from_pretrained(checkpoint)
    records = gallery_records(checkpoint, str(data), "test")[:12]
    first = gallery.load_or_build_index(model, checkpoint, records)
    meta = next((checkpoint / "index").glob("images-*.json"))
    stamp = meta.stat().st_mtime_ns
    assert gallery.load_or_build_index(model, checkpoint, records).identity == first.identity
    assert meta.stat().st_mtime_ns == stamp  # served from the cache
    st = records[3].image.stat()
    os.utime(records[3].image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        touched = gallery.load_or_build_index(model, checkpoint, records)
    finally:
        os.utime(records[3].image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert touched.identity != first.identity and meta.stat().st_mtime_ns != stamp
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    model.save_pretrained(checkpoint)  # new weights, same folder
    assert gallery.load_or_build_index(model, checkpoint, records).identity.split(":")[1] != \
        first.identity.split(":")[1]


def test_caption_index_is_rebuilt_when_a_caption_changes(tiny_run, checkpoint):
    from dataclasses import replace

    from clipModel import CLIPModel
    data, _, _ = tiny_run
    model = CLIPModel.from_pretrained(checkpoint)
    records = gallery_records(checkpoint, str(data), "test")[:5]
    first = gallery.load_or_build_caption_index(model, checkpoint, records)
    assert len(first) == sum(len(r.captions) for r in records) and first.captions[0] == records[0].captions[0]
    assert first.paths[0] == str(records[0].image)
    edited = [replace(records[0], captions=["a purple triangle"] + records[0].captions[1:])] + records[1:]
    again = gallery.load_or_build_caption_index(model, checkpoint, edited)
    assert again.identity != first.identity and again.captions[0] == "a purple triangle"
    assert len(list((checkpoint / "index").glob("captions-*.json"))) == 1  # replaced, not piled up


# ---------------------------------------------------------------- galleries, image -> text

@pytest.fixture
def photo_folder(tiny_run, tmp_path):
    """A plain nested folder of images, no captions anywhere (plus a hidden file and a text file)."""
    data, _, _ = tiny_run
    folder = tmp_path / "photos"
    (folder / "2020" / "june").mkdir(parents=True)
    (folder / ".thumbs").mkdir()
    images = sorted((data / "images").glob("*.png"))
    for i, src in enumerate(images[:6]):
        shutil.copy2(src, folder / ("2020/june" if i % 2 else "") / src.name)
    shutil.copy2(images[7], folder / ".thumbs" / images[7].name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_a_plain_image_folder_is_a_gallery(tiny_run, photo_folder):
    _, run_dir, _ = tiny_run
    records = gallery_records(run_dir, str(photo_folder), "test")
    assert len(records) == 6 and all(r.captions == [] for r in records)
    assert all(".thumbs" not in str(r.image) for r in records)
    assert image_folder_records(photo_folder) == records
    (photo_folder / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        image_folder_records(photo_folder / "empty")
    with pytest.raises(DataError, match="not found"):
        image_folder_records(photo_folder / "missing")


def test_embed_image_accepts_a_path_a_pil_image_and_tensors(tiny_run):
    from clipModel import CLIPModel
    from clip_foundation.data.records import open_rgb
    data, run_dir, _ = tiny_run
    model = CLIPModel.from_pretrained(run_dir)
    records = gallery_records(run_dir, str(data), "test")[:4]
    index = gallery.build_index(model, records, progress=False)
    path = records[2].image
    from_path = gallery.embed_image(model, path)
    pil = open_rgb(path)
    uint8 = torch.from_numpy(__import__("numpy").array(pil)).permute(2, 0, 1)  # (3, H, W)
    for other in (gallery.embed_image(model, str(path)), gallery.embed_image(model, pil),
                  gallery.embed_image(model, uint8),
                  gallery.embed_image(model, model.image_transform()(pil))):
        assert torch.allclose(other, from_path, atol=1e-5)
    assert torch.allclose(from_path[0], index.embeddings[2].float(), atol=2e-3)  # same as the gallery path
    with pytest.raises(FileNotFoundError, match="not found"):
        gallery.embed_image(model, path.with_name("nope.png"))


def test_find_captions_names_the_colour_of_single_shape_images(tiny_run):
    from clipModel import CLIPModel
    from clip_foundation.data.synthetic import COLORS
    data, run_dir, _ = tiny_run
    model = CLIPModel.from_pretrained(run_dir)
    records = gallery_records(run_dir, str(data), "test")
    captions = gallery.build_caption_index(model, records, progress=False)
    singles = [r for r in records if r.extra["n_shapes"] == "1"][:20]
    hits = 0
    for r in singles:
        matches = gallery.find_captions(model, captions, r.image, n=5)
        assert len(matches) == 5 and len({m.caption.lower() for m in matches}) == 5  # distinct
        assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
        assert all(m.image_path in captions.paths for m in matches)
        hits += r.extra["color1"] in matches[0].caption.split()
    assert len(singles) == 20
    assert hits / len(singles) >= 0.6, f"{hits}/20 (chance {1 / len(COLORS):.2f})"


# ---------------------------------------------------------------- the command line

@pytest.mark.slow
def test_image_to_text_cli(tiny_run, checkpoint, tmp_path, capsys):
    data, _, _ = tiny_run
    image = next(iter(sorted((data / "images").glob("*.png"))))
    out = tmp_path / "captions.png"
    matches = search.main(["--image", str(image), "--checkpoint", str(checkpoint), "--data", str(data),
                           "-n", "3", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(matches) == 3 and len(lines) == 4 and out.is_file()
    assert lines[0].endswith(matches[0].caption)
    again = search.main(["--image", str(image), "--checkpoint", str(checkpoint), "--data", str(data),
                         "-n", "3", "--out", str(out), "--json"])
    assert again == matches
    assert json.loads(capsys.readouterr().out)["matches"][0]["caption"] == matches[0].caption


@pytest.mark.slow
def test_prebuilt_index_cli(checkpoint, photo_folder, tmp_path, capsys):
    out = tmp_path / "photo_index"
    search.main(["--build-index", "--checkpoint", str(checkpoint), "--data", str(photo_folder),
                 "--out", str(out)])
    assert "images: 6 rows" in capsys.readouterr().out
    assert sorted(f.name for f in out.iterdir()) == ["images.json", "images.safetensors"]
    meta = json.loads((out / "images.json").read_text())
    assert meta["checkpoint"] == str(checkpoint.resolve()) and meta["kind"] == "images"
    grid = tmp_path / "grid.png"
    matches = search.main(["a red circle", "--index", str(out), "-n", "4", "--out", str(grid)])
    assert len(matches) == 4 and grid.is_file() and all(m.path in meta["paths"] for m in matches)
    direct = search.main(["a red circle", "--checkpoint", str(checkpoint), "--data", str(photo_folder),
                          "-n", "4", "--out", str(grid)])
    assert direct == matches
    with torch.no_grad():  # the same weights file changed: the index is for another model now
        from clipModel import CLIPModel
        other = CLIPModel.from_pretrained(checkpoint)
        other.logit_scale.add_(1.0)
        other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit) as exc:
        search.main(["a red circle", "--index", str(out), "--checkpoint", str(tmp_path / "other")])
    assert "built with another model" in str(exc.value) and "--build-index" in str(exc.value)
    other.save_pretrained(checkpoint)  # its own checkpoint retrained since: the same error
    with pytest.raises(SystemExit) as exc:
        search.main(["a red circle", "--index", str(out)])
    assert "built with another model" in str(exc.value)
    with pytest.raises(SystemExit) as exc:  # no captions in a plain folder: no image -> text
        search.main(["--image", str(meta["paths"][0]), "--index", str(out)])
    assert "no caption index" in str(exc.value)


@pytest.mark.slow
@needs_faiss
def test_faiss_backend_cli_agrees_with_exact(tiny_run, checkpoint, tmp_path, capsys):
    data, _, _ = tiny_run
    base = ["a blue square", "--checkpoint", str(checkpoint), "--data", str(data), "-n", "6",
            "--out", str(tmp_path / "g.png")]
    exact = search.main(base + ["--backend", "exact"])
    flat = search.main(base + ["--backend", "faiss"])
    assert [m.path for m in flat] == [m.path for m in exact]
    assert [m.score for m in flat] == pytest.approx([m.score for m in exact], abs=1e-3)
    assert list((checkpoint / "index").glob("images-*.faiss"))


@pytest.mark.parametrize("argv,message", [
    (["   ", "--checkpoint", "x"], "empty query"),
    (["\u200b\u200b", "--checkpoint", "x"], "empty query"),  # zero-width spaces: nothing visible
    (["\t\n \u00a0", "--checkpoint", "x"], "empty query"),
    (["a dog\non a beach", "--checkpoint", "x"], "line break"),
    (["x" * 1200, "--checkpoint", "x"], "1200 characters"),
    (["a dog", "--index", "/no/such/index"], "index folder not found"),
])
def test_bad_input_exits_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit) as exc:
        search.main(argv)
    assert message in str(exc.value)


@pytest.mark.parametrize("argv,message", [
    (["a dog", "--checkpoint", "x", "--split", "dev"], "--split='dev': must be"),
    (["a dog", "--checkpoint", "x", "--backend", "annoy"], "--backend='annoy': must be"),
    (["--checkpoint", "x"], "exactly one of"),
    (["a dog", "--image", "x.png", "--checkpoint", "x"], "exactly one of"),
    (["a dog"], "--checkpoint=DIR is required"),
    (["--build-index", "--index", "x"], "--out=DIR"),
    (["a dog", "--checkpoint", "x", "--no_such_option=1"], "unknown option --no_such_option"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        search.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_find_functions_reject_bad_arguments():
    index = GalleryIndex(unit(3, 8).half(), ["a", "b", "c"], "id")
    for query in ("  ", "\u200b", "\u200b \u200c"):  # the readers' rule: no visible text is no caption
        with pytest.raises(ValueError, match="empty query"):
            gallery.find_matches(None, index, query)
    with pytest.raises(ValueError, match="must be 1 to 1000"):
        gallery.find_matches(None, index, "a dog", n=0)
    with pytest.raises(ValueError, match="not a caption index"):
        gallery.find_captions(None, index, "x.png")


@pytest.mark.slow
def test_gallery_object_matches_the_functions(tiny_run, checkpoint, tmp_path):
    from clipModel import CLIPModel
    data, _, _ = tiny_run
    g = gallery.Gallery.from_run(checkpoint, str(data))  # loads the model itself
    records = gallery_records(checkpoint, str(data), "test")
    model = CLIPModel.from_pretrained(checkpoint)
    index = gallery.load_or_build_index(model, checkpoint, records)
    assert len(g) == len(records)
    got, want = g.find_matches("a red circle", n=5), gallery.find_matches(model, index, "a red circle", n=5)
    assert [m.path for m in got] == [m.path for m in want]  # the gallery's engine (auto) and torch: scores within 1e-4
    assert [m.score for m in got] == pytest.approx([m.score for m in want], abs=1e-4)
    shown = g.show("a red circle", n=4, path=tmp_path / "grid.png")
    assert len(shown) == 4 and (tmp_path / "grid.png").stat().st_size > 1000
    captions = g.find_captions(records[0].image, n=3)
    assert len(captions) == 3 and all(c.caption for c in captions)


# ---------------------------------------------------------------- a damaged querybank

def _bank_file(path, dim, bank=None, meta=None, key="bank"):
    from safetensors.torch import save_file
    bank = unit(6, dim) if bank is None else bank
    save_file({key: bank.half().contiguous()}, str(path), metadata=meta if meta is not None else
              {"alpha": "1.0", "beta": "10.0"})


def _truncated(path, dim):
    _bank_file(path, dim)
    path.write_bytes(path.read_bytes()[:100])


BAD_BANKS = {  # case -> (write it at path for a model of `dim`, a word the error line must hold)
    "NaN row": (lambda p, d: _bank_file(p, d, torch.cat([unit(3, d), torch.full((1, d), float("nan"))])),
                "non-finite"),
    "inf": (lambda p, d: _bank_file(p, d, unit(4, d) * float("inf")), "non-finite"),
    "zero rows": (lambda p, d: _bank_file(p, d, torch.cat([unit(3, d), torch.zeros(2, d)])), "unit-length"),
    "alpha=nan": (lambda p, d: _bank_file(p, d, meta={"alpha": "nan", "beta": "10"}), "alpha=nan"),
    "beta=0": (lambda p, d: _bank_file(p, d, meta={"alpha": "1", "beta": "0"}), "beta=0.0"),
    "no metadata": (lambda p, d: _bank_file(p, d, meta={}), "alpha"),
    "no bank key": (lambda p, d: _bank_file(p, d, key="embeddings"), '"bank"'),
    "wrong dimension": (lambda p, d: _bank_file(p, d, unit(6, d + 3)), "(6, "),
    "3-D": (lambda p, d: _bank_file(p, d, unit(6, d).reshape(2, 3, d)), "(2, 3, "),
    "empty bank": (lambda p, d: _bank_file(p, d, torch.zeros(0, d)), "(0, "),
    "truncated": (_truncated, "not a readable"),
    "0-byte": (lambda p, d: p.write_bytes(b""), "not a readable"),
    "garbage": (lambda p, d: p.write_bytes(b"GIF89a not a tensor file" * 20), "not a readable"),
}


@pytest.mark.parametrize("tool", ["evaluate", "search"])
@pytest.mark.parametrize("case", list(BAD_BANKS))
def test_a_bad_querybank_is_one_line_naming_the_file(tiny_run, checkpoint, tool, case):
    from clip_foundation.evaluate import command as evaluate
    from clipModel import CLIPConfig
    data, _, _ = tiny_run
    write, fault = BAD_BANKS[case]
    bank = checkpoint / "querybank.safetensors"
    write(bank, CLIPConfig.from_pretrained(checkpoint).projection_dim)
    args = ["--checkpoint", str(checkpoint), "--data", str(data)]
    with pytest.raises(SystemExit) as exc:
        evaluate.main(args) if tool == "evaluate" else search.main(["a red circle", *args])
    message = str(exc.value)
    assert message.startswith(f"error: {bank}: ") and fault in message and "\n" not in message
    assert "weights are corrupt" not in message  # the bank is at fault, not the model


def test_non_finite_scores_are_an_error_not_a_ranking():
    emb = unit(4, 8)
    emb[2] = float("nan")  # a damaged row would score NaN and sort anywhere
    with pytest.raises(ValueError, match="non-finite scores"):
        gallery.nearest_images(GalleryIndex(emb.half(), list("abcd"), "id"), unit(1, 8, seed=1), 3)


def test_json_output_is_valid_json_or_one_error_line(tmp_path, capsys):
    from types import SimpleNamespace
    args = SimpleNamespace(image="", query="a dog", out=str(tmp_path / "g.png"), checkpoint=str(tmp_path),
                           json=True, index="")
    with pytest.raises(SystemExit) as exc:
        search._report(args, [gallery.Match(str(tmp_path / "a.png"), float("nan"))])
    assert "non-finite" in str(exc.value) and "\n" not in str(exc.value)
    assert "NaN" not in capsys.readouterr().out  # nothing half-printed that a JSON reader would choke on


# ---------------------------------------------------------------- a damaged index file

def _zero_vectors(path):
    """Overwrite the second half of an index file, all vectors, with zeros: the file still parses."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))


@pytest.mark.slow
@needs_faiss
@pytest.mark.parametrize("suffix", ["safetensors", "faiss"])
def test_an_index_file_changed_since_it_was_built_is_never_searched(checkpoint, photo_folder, tmp_path,
                                                                    suffix):
    from clipModel import CLIPModel
    out = tmp_path / "photo_index"
    search.main(["--build-index", "--checkpoint", str(checkpoint), "--data", str(photo_folder),
                 "--out", str(out), "--backend", "faiss"])
    _zero_vectors(out / f"images.{suffix}")
    with pytest.raises(SystemExit) as exc:  # a prebuilt index: its images are not re-embedded here
        search.main(["a red circle", "--index", str(out)])
    message = str(exc.value)
    assert message.startswith(f"error: {out / f'images.{suffix}'}: ") and "--build-index" in message
    assert "\n" not in message
    model = CLIPModel.from_pretrained(checkpoint)  # a cache: rebuilt, the same results as before
    records = gallery_records(checkpoint, str(photo_folder), "test")
    first = gallery.load_or_build_index(model, checkpoint, records, backend="faiss")
    stem = next((checkpoint / "index").glob("images-*.json")).with_suffix("")
    _zero_vectors(stem.with_suffix(f".{suffix}"))
    again = gallery.load_or_build_index(model, checkpoint, records, backend="faiss")
    q = unit(2, first.embeddings.shape[1])
    assert torch.equal(again.embeddings, first.embeddings)
    assert torch.equal(again.search(q, 3, "faiss")[1], first.search(q, 3, "faiss")[1])


@pytest.mark.slow
@pytest.mark.parametrize("left", [[], ["captions.safetensors"]])
def test_an_index_build_killed_after_its_image_index_says_it_is_incomplete(tiny_run, checkpoint, tmp_path, left):
    data, _, _ = tiny_run
    out = tmp_path / "index"
    search.main(["--build-index", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)])
    for f in out.glob("captions.*"):  # killed before the caption index was complete
        if f.name not in left:
            f.unlink()
    image = json.loads((out / "images.json").read_text())["paths"][0]
    with pytest.raises(SystemExit) as exc:
        search.main(["--image", image, "--index", str(out)])
    message = str(exc.value)
    assert "incomplete" in message and "--build-index" in message and "no captions" not in message


def test_find_matches_is_a_list_that_a_notebook_draws_as_a_grid(tiny_run):
    from PIL import Image
    from clipModel import CLIPModel
    data, run_dir, _ = tiny_run
    found = gallery.Gallery.from_run(run_dir, model=CLIPModel.from_pretrained(run_dir)).find_matches("a red circle", n=9)
    assert isinstance(found, list) and len(found) == 9  # still the list of Match(path, score) code reads
    assert all(isinstance(m, gallery.Match) for m in found) and found[0].score >= found[-1].score
    png = found._repr_png_()  # what Jupyter shows for the cell's value
    import io
    grid = Image.open(io.BytesIO(png))
    assert grid.format == "PNG" and grid.width > 3 * 100 and grid.height > 3 * 100  # three rows of three
    assert gallery.Matches([], "nothing")._repr_png_() is None  # an empty result draws nothing
