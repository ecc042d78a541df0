"""Issue #29, nothing read from outside the dataset, nothing stale served: an embedding folder
keeps only the parts its records vouch for (model, inputs, digests), embeds again the images that
changed and never finishes a part whose shard was not read to the end; an index folder is
verified when opened, and a tampered index.json, a folder of other files, non-finite rows or a
budget too small are each one line saying what to do."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_foundation.embed import writer as embed
from clip_foundation.embed import format as fmt
from clip_foundation.search import command as search
from clip_foundation.search.mmap_index import INDEX_FILE, INFO_FILE, METADATA_FILE, build_big_index
from clip_foundation.search.budget import choose_index, parse_size, plans
from clip_foundation.search.index import BadIndexError, faiss_module
from clip_foundation.common.files import model_digest
from clip_foundation.data.records import DataError
from clipModel import CLIPModel, ConfigError
from test_embed import IMAGES, N_IMAGES, checkpoint, photos, run, shard_set  # noqa: F401 (fixtures)
from test_index_budget import QUERY, big_gallery, clustered, write_emb  # noqa: F401 (fixtures)

needs_faiss = pytest.mark.skipif(faiss_module() is None, reason="faiss not installed")


def npy_bytes(out) -> list[bytes]:
    return [fmt.embeddings_path(out, p).read_bytes() for p in range(fmt.read_info(out)["shards"])]


def other_model(checkpoint, folder):
    model = CLIPModel.from_pretrained(checkpoint)
    torch.nn.init.normal_(model.image_projection.projection.weight)
    return model.save_pretrained(folder)


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


# ---------------------------------------------------------------- item 3: parts OUT did not write

def test_a_foreign_part_in_out_is_embedded_again(checkpoint, photos, tmp_path):
    out = tmp_path / "emb"
    for path in (fmt.embeddings_path(out, 0), fmt.metadata_path(out, 0)):
        path.parent.mkdir(parents=True, exist_ok=True)
    np.save(fmt.embeddings_path(out, 0), np.ones((2, 16), np.float16))  # someone else's part 0
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({c: ["x", "y"] for c in fmt.COLUMNS}), fmt.metadata_path(out, 0))
    info = run(checkpoint, photos, out, IMAGES, "--rows_per_shard=4")
    run(checkpoint, photos, tmp_path / "clean", IMAGES, "--rows_per_shard=4")
    assert info["complete"] and info["rows"] == N_IMAGES
    assert npy_bytes(out) == npy_bytes(tmp_path / "clean")


def test_resuming_with_another_model_after_embed_json_was_deleted_mixes_nothing(checkpoint, photos, tmp_path):
    out = tmp_path / "emb"
    run(checkpoint, photos, out, IMAGES, "--rows_per_shard=4")
    (out / fmt.INFO).unlink()
    other = other_model(checkpoint, tmp_path / "other")
    info = run(other, photos, out, IMAGES, "--rows_per_shard=4")
    run(other, photos, tmp_path / "clean", IMAGES, "--rows_per_shard=4")
    assert info["complete"] and info["model"] == model_digest(other)
    assert npy_bytes(out) == npy_bytes(tmp_path / "clean")


# ---------------------------------------------------------------- item 4: images changed since

def test_images_changed_since_are_embedded_again(checkpoint, photos, tmp_path, monkeypatch):
    folder = shutil.copytree(photos, tmp_path / "photos")
    out = tmp_path / "emb"
    run(checkpoint, folder, out, IMAGES, "--rows_per_shard=4")
    _, meta = fmt.read_part(out, 1)
    rng = np.random.default_rng(7)
    for path in meta["image_path"]:  # part 1's images, overwritten under the same names
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(path)
    embedded, original = [], embed.embed_part
    monkeypatch.setattr(embed, "embed_part", lambda model, parts, part, *a: embedded.append(part) or
                        original(model, parts, part, *a))
    info = run(checkpoint, folder, out, IMAGES, "--rows_per_shard=4")
    assert embedded == [1] and info["complete"]
    run(checkpoint, folder, tmp_path / "clean", IMAGES, "--rows_per_shard=4")
    assert npy_bytes(out) == npy_bytes(tmp_path / "clean")


# ---------------------------------------------------------------- item 5: a shard not read to the end

def test_a_shard_that_cannot_be_read_is_not_a_finished_part(checkpoint, shard_set, tmp_path):
    late = tmp_path / "late"
    late.mkdir()
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{shard_set / '00000.tar'}\npipe:cat {late / '00001.tar'}\n")  # not there yet: exit 1
    out = tmp_path / "emb"
    with pytest.raises(SystemExit) as e:
        run(checkpoint, listing, out)
    message = str(e.value)
    assert "00001.tar" in message and "not read to the end" in message and "\n" not in message
    assert fmt.is_done(out, 0) and not fmt.is_done(out, 1) and not fmt.read_info(out)["complete"]
    shutil.copy(shard_set / "00001.tar", late / "00001.tar")  # the source is back: a rerun retries it
    info = run(checkpoint, listing, out)
    assert info["complete"] and info["rows"] == 8 and info["skipped"] == {}


# ---------------------------------------------------------------- item 28: --out naming a file

def test_embedding_into_a_file_is_one_line(checkpoint, photos, tmp_path):
    (tmp_path / "emb").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        run(checkpoint, photos, tmp_path / "emb", IMAGES)
    assert "--out" in str(e.value) and "must be a folder" in str(e.value) and "Errno" not in str(e.value)


# ---------------------------------------------------------------- item 29: parts checked before building

def _swap_parquets(folder):
    a, b = sorted((folder / "metadata").glob("*.parquet"))[:2]
    a.write_bytes(b.read_bytes())  # equal lengths: only the digests can tell


def _shorter_parquet(folder):
    import pyarrow.parquet as pq
    path = sorted((folder / "metadata").glob("*.parquet"))[1]
    pq.write_table(pq.read_table(path).slice(0, 10), path)


def _no_part_digests(folder):
    info = json.loads((folder / "embed.json").read_text())
    del info["parts"]
    (folder / "embed.json").write_text(json.dumps(info))


@needs_faiss
@pytest.mark.parametrize("damage, said", [(_swap_parquets, "metadata_000000.parquet: differs from"),
                                          (_shorter_parquet, "10 rows for the 1000"),
                                          (_no_part_digests, "lists no parts")])
def test_a_part_not_as_embedded_is_refused_before_building(tmp_path, damage, said, monkeypatch):
    folder = write_emb(tmp_path / "emb", clustered(3000, 16).numpy(), [f"{i}.jpg" for i in range(3000)], shard=1000)
    damage(folder)
    faiss = faiss_module()
    monkeypatch.setattr(faiss, "index_factory", lambda *a: pytest.fail("built before the folder was checked"))
    with pytest.raises(DataError, match=re.escape(said)) as e:
        build_big_index(folder, tmp_path / "index", parse_size("10M"), progress=False)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- item 8: non-finite rows

@needs_faiss
@pytest.mark.parametrize("value, plan", [(np.inf, 0), (np.nan, -1)])  # the largest (exact) and smallest index
def test_a_non_finite_row_is_refused_in_one_line(tmp_path, value, plan):
    rows = clustered(3000, 16).numpy()
    rows[2345, 3] = value
    folder = write_emb(tmp_path / "emb", rows, [f"{i}.jpg" for i in range(3000)], shard=1000)
    budget = plans(3000, 16)[plan].estimate
    with pytest.raises(DataError) as e:
        build_big_index(folder, tmp_path / "index", budget, progress=False)
    assert str(e.value).startswith(f"{folder / 'img_emb' / 'img_emb_000002.npy'}: row 345 is not finite")
    assert "\n" not in str(e.value) and not (tmp_path / "index" / INFO_FILE).exists()


# ---------------------------------------------------------------- item 26: the budget's figure works

@pytest.mark.parametrize("rows", [3000, 4321, 20_000, 123_457, 1_000_003])
def test_the_smallest_budget_named_is_enough(rows):
    with pytest.raises(ConfigError) as e:
        choose_index(rows, 64, 1)
    figure = re.search(r"must be at least (\S+) for", str(e.value)).group(1)
    assert choose_index(rows, 64, parse_size(figure)) == min(plans(rows, 64), key=lambda p: p.estimate)


# ---------------------------------------------------------------- index folders: verified when opened

def _overwrite_a_row(folder):
    path = folder / INDEX_FILE
    data = bytearray(path.read_bytes())
    data[-200:-100] = bytes(100)  # size kept
    path.write_bytes(bytes(data))


def _edit_info(**changes):
    def edit(folder):
        meta = json.loads((folder / INFO_FILE).read_text())
        for key, value in changes.items():
            target, _, leaf = key.rpartition(".")
            owner = meta[target] if target else meta
            if value is del_:
                del owner[leaf]
            else:
                owner[leaf] = value
        (folder / INFO_FILE).write_text(json.dumps(meta))
    return edit


del_ = object()


@needs_faiss
@pytest.mark.parametrize("tamper, said", [
    (_overwrite_a_row, f"{INDEX_FILE}: missing, or its contents differ"),
    (_edit_info(files={}), "files"),
    (_edit_info(files=del_), "files"),
    (_edit_info(faiss=del_), "faiss"),
    (_edit_info(**{"faiss.search": "nprobe=abc"}), "'nprobe=abc'"),
    (_edit_info(**{"faiss.search": "nprobe=-5"}), "'nprobe=-5'"),
    (_edit_info(**{"faiss.search": "x=3"}), "'x=3'"),
    (_edit_info(rows="4000"), "rows is '4000'"),
    (_edit_info(checkpoint=None), "--checkpoint"),
    (_edit_info(building=True), "its build did not finish"),  # killed while replacing its files
])
def test_a_tampered_index_is_one_line_in_search_and_the_page(big_gallery, tmp_path, tamper, said):
    from clip_foundation.search.gallery import Gallery
    folder = copy_of(big_gallery[0], tmp_path)
    tamper(folder)
    with pytest.raises(SystemExit) as e:
        search.main([QUERY, f"--index={folder}", f"--out={tmp_path / 'grid.png'}"])
    message = str(e.value)
    assert message.startswith(f"error: {folder}") and said in message and "\n" not in message
    with pytest.raises(BadIndexError, match=re.escape(said)):  # what app.py --index opens
        Gallery.from_index(folder, engine="torch")


@needs_faiss
def test_an_index_is_read_whole_only_when_its_files_were_written_since_the_build(big_gallery, tmp_path, monkeypatch):
    # opening a 5 GB index must not hash 5 GB each time: an untouched file (size and time as built)
    # is trusted; a file whose time moved is hashed, and opens if its bytes are still the built ones
    import os
    from clip_foundation.common import files as index
    from clip_foundation.search.kinds import open_index
    folder = copy_of(big_gallery[0], tmp_path)  # copy2 keeps the files' times
    hashed, real = [], index.file_digest
    monkeypatch.setattr(index, "file_digest", lambda path, *a: (Path(path).parent == folder and hashed.append(
        Path(path).name)) or real(path))  # the index's own files (the model's weights are hashed apart)
    open_index(folder)
    assert hashed == []
    os.utime(folder / INDEX_FILE)  # touched: same bytes, a new time
    open_index(folder)
    assert hashed == [INDEX_FILE]
    _overwrite_a_row(folder)
    with pytest.raises(BadIndexError, match="its contents differ"):
        open_index(folder)


@needs_faiss
def test_a_moved_checkpoint_gets_the_hint_to_name_it(big_gallery, tmp_path):
    folder = copy_of(big_gallery[0], tmp_path)
    _edit_info(checkpoint=str(tmp_path / "moved"))(folder)
    with pytest.raises(SystemExit) as e:
        search.main([QUERY, f"--index={folder}", f"--out={tmp_path / 'grid.png'}"])
    assert "moved" in str(e.value) and "--checkpoint=" in str(e.value)
    results = search.main([QUERY, f"--index={folder}", f"--checkpoint={big_gallery[1]}",
                           f"--out={tmp_path / 'grid.png'}"])
    assert results[0].path == big_gallery[2]


@needs_faiss
def test_another_models_index_advises_the_big_index_commands(big_gallery, checkpoint, tmp_path):
    with pytest.raises(SystemExit) as e:
        search.main([QUERY, f"--index={big_gallery[0]}", f"--checkpoint={checkpoint}",
                     f"--out={tmp_path / 'grid.png'}"])
    message = str(e.value)
    assert "built with another model" in message and "--embeddings=" in message
    assert "--build-index --checkpoint" not in message


@needs_faiss
def test_a_half_written_index_folder_is_named_as_one(big_gallery, tmp_path):
    folder = copy_of(big_gallery[0], tmp_path)
    (folder / INFO_FILE).unlink()
    (folder / INDEX_FILE).unlink()
    with pytest.raises(SystemExit) as e:
        search.main([QUERY, f"--index={folder}", f"--out={tmp_path / 'grid.png'}"])
    assert "--embeddings=" in str(e.value) and "images.json" not in str(e.value)


# ---------------------------------------------------------------- --build_index --embeddings --index=DIR

@needs_faiss
@pytest.mark.parametrize("foreign", [INFO_FILE, "family_photos_2019.jpg", "notes.txt as a folder"])
def test_an_index_folder_holding_other_files_is_refused(big_gallery, tmp_path, foreign):
    emb = json.loads((big_gallery[0] / INFO_FILE).read_text())["embeddings"]
    folder = tmp_path / "index"
    folder.mkdir()
    if foreign.endswith("folder"):
        (folder / "notes.txt").mkdir()
    else:
        (folder / foreign).write_text('{"mine": true}')
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SystemExit) as e:
        search.main(["--build_index", f"--embeddings={emb}", f"--index={folder}", "--max_index_memory=400K"])
    assert "did not write" in str(e.value) and foreign.split()[0] in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in folder.iterdir()) == before and not (folder / INDEX_FILE).exists()


@needs_faiss
def test_an_index_folder_of_its_own_is_rebuilt(big_gallery, tmp_path):
    emb = json.loads((big_gallery[0] / INFO_FILE).read_text())["embeddings"]
    folder = copy_of(big_gallery[0], tmp_path)
    index = search.main(["--build_index", f"--embeddings={emb}", f"--index={folder}", "--max_index_memory=3M"])
    assert index.meta["faiss"]["choice"] == "exact"
    assert sorted(p.name for p in folder.iterdir()) == sorted([INDEX_FILE, INFO_FILE, METADATA_FILE])


@needs_faiss
def test_an_index_path_naming_a_file_is_one_line(big_gallery, tmp_path):
    emb = json.loads((big_gallery[0] / INFO_FILE).read_text())["embeddings"]
    (tmp_path / "index").write_text("a file")
    with pytest.raises(SystemExit) as e:
        search.main(["--build_index", f"--embeddings={emb}", f"--index={tmp_path / 'index'}"])
    assert "--index" in str(e.value) and "must be a folder" in str(e.value) and "Errno" not in str(e.value)
