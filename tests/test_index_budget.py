"""Large galleries: an index built from an embedding folder under a memory budget (budget.py,
embed/folder.py, search/mmap_index.py), searched by search.py, Gallery and the search page."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_foundation.search import command as search
from clip_foundation.search.kinds import open_index
from clip_foundation.search.mmap_index import INDEX_FILE, INFO_FILE, BigIndex, build_big_index
from clip_foundation.search.budget import parse_size, plans
from clip_foundation.embed.folder import EmbeddingFolder
from clip_foundation.search.index import BadIndexError, exact_topk, faiss_module, recall_at_k
from clip_foundation.common.files import model_digest
from clip_foundation.data.records import DataError
from clipModel import ConfigError

pytestmark = pytest.mark.skipif(faiss_module() is None, reason="faiss not installed")


def write_emb(folder: Path, rows: np.ndarray, paths: list[str], shard: int = 8000, checkpoint: str = "",
              model: str = "", names=lambda i: f"{i:06d}", complete: bool = True) -> Path:
    """An embedding folder as the embedder writes it: float16 shards, row-aligned metadata, embed.json
    with each part's record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clip_foundation.embed.format import VERSION, vouch
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    starts, parts = list(range(0, len(rows), shard)), []
    for i, s in enumerate(starts):
        files = [folder / "img_emb" / f"img_emb_{names(i)}.npy", folder / "metadata" / f"metadata_{names(i)}.parquet"]
        np.save(files[0], rows[s:s + shard].astype(np.float16))
        part = paths[s:s + shard]
        pq.write_table(pa.table({"image_path": part, "caption": [f"caption {s + j}" for j in range(len(part))],
                                 "key": [str(s + j) for j in range(len(part))]}), files[1])
        parts.append(vouch(folder, files, len(part)))
    (folder / "embed.json").write_text(json.dumps({"version": VERSION, "dim": rows.shape[1], "checkpoint": checkpoint,
                                                   "model": model, "shards": len(starts), "complete": complete,
                                                   "parts": parts}))
    return folder


def clustered(n, d, seed=0, clusters=300):
    centres = F.normalize(torch.randn(clusters, d, generator=torch.Generator().manual_seed(123)), dim=1)
    g = torch.Generator().manual_seed(seed)
    return F.normalize(centres[torch.randint(clusters, (n,), generator=g)] + 0.2 * torch.randn(n, d, generator=g), dim=1)


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    """20,000 clustered 32-d rows in three shards."""
    rows = clustered(20_000, 32).numpy()
    return write_emb(tmp_path_factory.mktemp("emb") / "emb", rows, [f"img/{i}.jpg" for i in range(len(rows))])


# ---------------------------------------------------------------- sizes and budgets

@pytest.mark.parametrize("text, size", [("2G", 2 * 2**30), ("500M", 500 * 2**20), ("64k", 64 * 2**10),
                                        ("1.5G", int(1.5 * 2**30)), ("123", 123), ("1T", 2**40)])
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["2X", "-1G", "0", "0G", "2 GB", "2GiB", "", "G", "nan", "1e9", "2G "])
def test_bad_sizes_are_one_line(text):
    with pytest.raises(ConfigError) as e:
        parse_size(text)
    assert str(e.value).startswith(f"--max_index_memory={text!r}: must be") and "\n" not in str(e.value)


def test_plans_shrink_in_order():
    for n, d in [(20_000, 32), (10_000_000, 256), (100_000_000, 768)]:
        sizes = [p.estimate for p in plans(n, d)]
        assert sizes == sorted(sizes, reverse=True), (n, d)


@pytest.mark.parametrize("budget, choice", [("3M", "exact"), pytest.param("1M", "ivf-pq+refine", marks=pytest.mark.slow),
                                            ("700K", "ivf-sq")])
def test_the_index_file_fits_the_budget(emb, tmp_path, budget, choice):
    index = build_big_index(emb, tmp_path / "index", parse_size(budget), budget, progress=False)
    size = (tmp_path / "index" / INDEX_FILE).stat().st_size
    assert index.meta["faiss"]["choice"] == choice
    assert size <= parse_size(budget)
    assert size <= index.meta["budget"]["estimate"] <= 1.25 * size  # an upper bound, not a wild one
    assert index.meta["budget"]["file_size"] == size


def test_an_impossible_budget_is_refused_in_one_line(emb, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        search.main(["--build_index", f"--embeddings={emb}", f"--index={tmp_path / 'index'}",
                     "--max_index_memory=100K"])
    message = str(e.value)
    assert message.startswith("error: --max_index_memory='100K': must be at least") and "\n" not in message
    assert "20,000 rows x 32" in message
    assert not (tmp_path / "index" / INFO_FILE).exists()


def test_a_bad_budget_is_a_usage_error(emb, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        search.main(["--build_index", f"--embeddings={emb}", f"--index={tmp_path}", "--max_index_memory=2GB"])
    assert e.value.code == 2
    assert "--max_index_memory='2GB': must be a size like 2G" in capsys.readouterr().err


def test_stored_recall_equals_recall_recomputed(big_gallery):
    index = BigIndex.open(big_gallery[0], verify=True)
    folder = EmbeddingFolder.open(index.meta["embeddings"])
    rows = index.meta["recall_rows"]
    queries = torch.from_numpy(folder.take(rows))
    every = torch.cat([torch.from_numpy(x) for _, x in folder.chunks(5000)])
    _, exact = exact_topk(queries, every, 11)
    _, found = index.search(queries, 11)
    recomputed = recall_at_k(found, exact, 10, torch.tensor(rows))
    assert recomputed == pytest.approx(index.meta["faiss"]["recall@10"], abs=1e-4)
    assert index.meta["faiss"]["choice"] == "ivf-pq+refine" and 0.5 < recomputed <= 1.0


# ---------------------------------------------------------------- the embedding folder

def test_shards_are_ordered_by_their_number_however_padded(tmp_path):
    rows = clustered(3000, 16).numpy()
    folder = write_emb(tmp_path / "emb", rows, [f"{i}.jpg" for i in range(3000)], shard=1000,
                       names=lambda i: ["7", "08", "000010"][i])  # 7 < 08 < 000010 by number, not by text
    emb = EmbeddingFolder.open(folder)
    assert [s.embeddings.name for s in emb.shards] == ["img_emb_7.npy", "img_emb_08.npy", "img_emb_000010.npy"]
    torch.testing.assert_close(torch.from_numpy(emb.take([2999, 0, 1500])),
                               torch.from_numpy(rows[[2999, 0, 1500]].astype(np.float16).astype(np.float32)))


@pytest.mark.parametrize("damage, said", [
    (lambda f: (f / "embed.json").write_text(json.dumps({**json.loads((f / "embed.json").read_text()),
                                                          "complete": False})), "is incomplete"),
    (lambda f: next((f / "metadata").glob("*.parquet")).unlink(), "has embeddings or metadata but not both"),
    (lambda f: np.save(next((f / "img_emb").glob("*.npy")), np.zeros((5, 16), np.float32)), "expected float16"),
    (lambda f: (f / "embed.json").unlink(), "embed.json: missing"),
])
def test_a_bad_embedding_folder_is_one_line(tmp_path, damage, said):
    folder = write_emb(tmp_path / "emb", clustered(2000, 16).numpy(), [f"{i}.jpg" for i in range(2000)], shard=1000)
    damage(folder)
    with pytest.raises(DataError, match=said) as e:
        EmbeddingFolder.open(folder)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- serving: search.py, Gallery, the page

QUERY, LINK_QUERY = "a red circle", "a small blue square"


@pytest.fixture(scope="module")
def big_gallery(tmp_path_factory):
    """A tiny model's text embeddings of two queries hidden as rows 1234 (a real image) and 3210
    (a URL) among 4,000 random rows -> (index folder, checkpoint, the target image)."""
    from PIL import Image

    from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig
    from clip_foundation.evaluate.metrics import embed_texts
    root = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(image=ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=1, heads=2),
                                 text=TextEncoderConfig(kind="scratch", width=32, depth=1, heads=2, vocab_size=100),
                                 projection_dim=32), captions=[QUERY, LINK_QUERY])
    checkpoint = model.save_pretrained(root / "run")
    with torch.no_grad():
        texts = embed_texts(model.eval(), [QUERY, LINK_QUERY]).float()  # (2, 32), normalised
    images = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        images.append(str(root / f"{colour}.png"))
        Image.new("RGB", (40, 40), colour).save(images[-1])
    rows = clustered(4000, 32, seed=1)
    rows[1234], rows[3210] = texts[0], texts[1]
    paths = [images[1 + i % 3] for i in range(len(rows))]
    paths[1234], paths[3210] = images[0], "https://example.com/blue-square.jpg"
    emb = write_emb(root / "emb", rows.numpy(), paths, shard=1500, checkpoint=str(checkpoint),
                    model=model_digest(checkpoint))
    assert search.main(["--build_index", f"--embeddings={emb}", f"--index={root / 'index'}",
                        "--max_index_memory=400K"]).meta["faiss"]["type"] == "IVF21,PQ8x4fs,Refine(SQfp16)"
    return root / "index", checkpoint, images[0]


def test_search_command_finds_the_image(big_gallery, tmp_path, capsys):
    folder, _, target = big_gallery
    results = search.main([QUERY, f"--index={folder}", "-n", "5", f"--out={tmp_path / 'grid.png'}"])
    assert results[0].path == target and results[0].score == pytest.approx(1.0, abs=2e-2)
    assert results[0].score > max(m.score for m in results[1:])
    out = capsys.readouterr()
    assert out.out.splitlines()[0].endswith(target) and "no longer exist" not in out.err
    assert (tmp_path / "grid.png").is_file()


def test_a_link_is_returned_not_fetched(big_gallery, tmp_path, capsys):
    folder, _, _ = big_gallery
    results = search.main([LINK_QUERY, f"--index={folder}", "-n", "3", "--json", f"--out={tmp_path / 'grid.png'}"])
    assert results[0].path == "https://example.com/blue-square.jpg"
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == [] and report["matches"][0]["path"] == results[0].path


def test_the_page_finds_the_image(big_gallery):
    from clip_foundation.search.gallery import Gallery
    from clip_foundation.app.loading import describe_run
    from clip_foundation.app.page import SearchPage
    folder, checkpoint, target = big_gallery
    gallery = Gallery.from_index(folder, engine="torch")
    assert gallery.checkpoint == str(checkpoint) and len(gallery) == 4000
    page = SearchPage(gallery, None, describe_run(gallery, None, "none", "", "test"))
    try:
        grid, paths, note = page.on_query(QUERY, 4)
        assert paths[0] == target and len(grid) == len(paths) >= 3  # the link row may be among the 4
        _, paths, note = page.on_query(LINK_QUERY, 4)
        assert "1 are links, not fetched by this page" in note and "blue-square.jpg" in note
        assert "https" not in " ".join(paths)
        assert "4,000 images (the index" in page.info["gallery"] and "recall@10" in page.info["index"]
    finally:
        page.close()


def test_another_model_is_refused(big_gallery, tmp_path):
    from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig
    folder, _, _ = big_gallery
    other = CLIPModel(CLIPConfig(image=ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=1, heads=2),
                                 text=TextEncoderConfig(kind="scratch", width=32, depth=1, heads=2, vocab_size=100),
                                 projection_dim=32), captions=[QUERY]).save_pretrained(tmp_path / "other")
    with pytest.raises(BadIndexError, match="built with another model"):
        open_index(folder, "images", other)
    with pytest.raises(BadIndexError, match="indexes images only"):
        open_index(folder, "captions")


def test_a_damaged_index_file_is_refused(big_gallery, tmp_path):
    import shutil
    folder, _, _ = big_gallery
    copy = shutil.copytree(folder, tmp_path / "copy")
    with open(copy / INDEX_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BadIndexError, match="differ from those recorded"):
        BigIndex.open(copy)
