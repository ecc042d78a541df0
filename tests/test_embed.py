"""clip_foundation.embed.writer: a gallery embedded into clip-retrieval's layout (img_emb/*.npy +
metadata/*.parquet + embed.json), equal to the model's own encode_image, the same files whatever
the number of ranks, resumable after kill -9, bad images skipped and counted, shards as input."""
import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CAPTIONS, wordpiece_tokenizer
from clip_foundation.embed import writer as embed
from clip_foundation.embed import format as fmt
from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig, resize_crop, to_model_input

pytest.importorskip("pyarrow")
ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 11
IMAGES = "--layout=images"  # the photos folder has a subfolder: auto would read it as class folders


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny scratch CLIP (untrained: its embeddings are as good a reference as a trained one's)."""
    torch.manual_seed(0)
    cfg = CLIPConfig(image=ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=1, heads=2,
                                              stem="linear"),
                     text=TextEncoderConfig(kind="scratch", width=32, depth=1, heads=2, vocab_size=100),
                     projection_dim=16)
    words = sorted({w for c in TINY_CAPTIONS for w in c.split()})
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    CLIPModel(cfg, tokenizer=wordpiece_tokenizer(words)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A plain folder of N_IMAGES noise images of different sizes, JPEG and PNG, one in a subfolder."""
    folder = tmp_path_factory.mktemp("photos") / "photos"
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        pixels = rng.integers(0, 256, (30 + 3 * i, 40 + i, 3), dtype=np.uint8)
        name = folder / ("sub" if i == 5 else "") / f"img{i:02d}.{'png' if i % 3 else 'jpg'}"
        name.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(name)
    return folder


def run(checkpoint, data, out, *options):
    return embed.main([f"--checkpoint={checkpoint}", f"--data={data}", f"--out={out}", "--engine=torch",
                       "--progress=false", "--device=cpu", *options])


def all_rows(out) -> tuple[np.ndarray, dict]:
    info = fmt.read_info(out)
    parts = [fmt.read_part(out, p) for p in range(info["shards"])]
    return np.concatenate([e for e, _ in parts]), {c: sum((m[c] for _, m in parts), []) for c in fmt.COLUMNS}


def reference(checkpoint, paths) -> torch.Tensor:
    model = CLIPModel.from_pretrained(checkpoint)
    cfg = model.config.image
    images = torch.stack([resize_crop(cfg.image_size)(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model.encode_image(to_model_input(images, cfg.mean, cfg.std))  # (N, D)


def test_embeddings_equal_encode_image_and_the_format_is_clip_retrievals(checkpoint, photos, tmp_path):
    out = tmp_path / "emb"
    info = run(checkpoint, photos, out, IMAGES, "--rows_per_shard=4", "--batch_size=3")
    assert info["complete"] and info["shards"] == 3 and info["rows"] == N_IMAGES and info["skipped"] == {}
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{i:06d}.npy" for i in range(3)]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [f"metadata_{i:06d}.parquet" for i in range(3)]
    assert [len(fmt.read_part(out, p)[0]) for p in range(3)] == [4, 4, 3]  # part i = images [4i, 4i + 4)
    on_disk = json.loads((out / "embed.json").read_text())
    assert on_disk["version"] == 2 and on_disk["dim"] == 16 and on_disk["rows_per_shard"] == 4
    assert [p["rows"] for p in on_disk["parts"]] == [4, 4, 3]  # each part's record, vouching for its files
    from clip_foundation.common.files import model_digest
    assert on_disk["model"] == model_digest(checkpoint)
    embeddings, meta = all_rows(out)
    assert embeddings.dtype == np.float16 and embeddings.shape == (N_IMAGES, 16)
    expected = reference(checkpoint, meta["image_path"])
    torch.testing.assert_close(torch.from_numpy(embeddings).float(), expected, atol=2e-3, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1, atol=2e-3)
    assert meta["key"] == [str(Path(p).relative_to(photos)) for p in meta["image_path"]]
    assert "sub/img05.png" in meta["key"] and meta["caption"] == [""] * N_IMAGES


def test_a_dataset_layout_keeps_every_split_and_its_captions(checkpoint, tmp_path):
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    data = generate(tmp_path / "synthetic", SyntheticConfig(n_train=6, n_val=2, n_test=2, image_size=32),
                    progress=False)
    info = run(checkpoint, data, tmp_path / "emb", "--rows_per_shard=3")
    _, meta = all_rows(tmp_path / "emb")
    assert info["rows"] == 10 and len(set(meta["key"])) == 10
    first_captions = {}
    with open(data / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):  # several rows per image: its first caption comes first
            first_captions.setdefault(row["image"], row["caption"])
    assert [first_captions[k] for k in meta["key"]] == meta["caption"]


def test_a_bad_image_is_skipped_counted_and_absent_from_both_files(checkpoint, photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(photos.rglob("*.*"))[:5]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "img01.png").write_bytes(b"not an image at all")
    info = run(checkpoint, folder, tmp_path / "emb", "--rows_per_shard=2")
    assert info["rows"] == 4 and info["skipped"] == {"undecodable image": 1} and info["skipped_total"] == 1
    assert "img01.png" in info["first_skipped"]["undecodable image"]
    embeddings, meta = all_rows(tmp_path / "emb")
    assert meta["key"] == ["img00.jpg", "img02.png", "img03.jpg", "img04.png"] and len(embeddings) == 4
    torch.testing.assert_close(torch.from_numpy(embeddings).float(), reference(checkpoint, meta["image_path"]),
                               atol=2e-3, rtol=0)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ranks_embed_disjoint_parts_that_cover_the_input(world):
    owned = [embed.parts_of_rank(7, r, world) for r in range(world)]
    assert sorted(sum(owned, [])) == list(range(7))
    assert all(i % world == r for r, parts in enumerate(owned) for i in parts)


def test_a_rerun_skips_finished_parts_and_redoes_one_cut_short(checkpoint, photos, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    run(checkpoint, photos, out, IMAGES, "--rows_per_shard=4")
    whole = {p: fmt.embeddings_path(out, p).read_bytes() for p in range(3)}
    # killed between the two renames of part 1: its parquet is there, its .npy is not; a temp file is left
    fmt.embeddings_path(out, 1).unlink()
    fmt.metadata_path(out, 1).write_bytes(b"half a parquet")
    (out / "img_emb" / ".img_emb_000001.npy.tmp999").write_bytes(b"partial")
    info = json.loads((out / "embed.json").read_text())
    (out / "embed.json").write_text(json.dumps({**info, "complete": False}))
    embedded = []
    original = embed.embed_part
    monkeypatch.setattr(embed, "embed_part", lambda model, parts, part, *a: embedded.append(part) or
                        original(model, parts, part, *a))
    info = run(checkpoint, photos, out, IMAGES, "--rows_per_shard=4")
    assert embedded == [1] and info["complete"] and info["rows"] == N_IMAGES
    assert {p: fmt.embeddings_path(out, p).read_bytes() for p in range(3)} == whole
    assert not list((out / "img_emb").glob(".*tmp*"))


@pytest.mark.parametrize("change, fault", [("--rows_per_shard=5", "--rows_per_shard"),
                                           ("other model", "model"), ("fewer images", "input")])
def test_a_folder_of_other_embeddings_is_refused(checkpoint, photos, tmp_path, change, fault, capsys):
    out = tmp_path / "emb"
    run(checkpoint, photos, out, IMAGES, "--rows_per_shard=4")
    options, data, ckpt = [], photos, checkpoint
    if change.startswith("--"):
        options = [change]
    elif change == "other model":
        ckpt = tmp_path / "other"
        model = CLIPModel.from_pretrained(checkpoint)
        torch.nn.init.normal_(model.image_projection.projection.weight)
        model.save_pretrained(ckpt)
    else:
        data = tmp_path / "fewer"
        data.mkdir()
        for p in sorted(photos.glob("*.*"))[:3]:
            (data / p.name).write_bytes(p.read_bytes())
    with pytest.raises(SystemExit) as e:
        run(ckpt, data, out, IMAGES, "--rows_per_shard=4", *options)
    assert f"holds embeddings of another {fault}" in str(e.value) and "new --out folder" in str(e.value)


@pytest.mark.parametrize("option", ["--rows_per_shard=0", "--batch_size=0", "--workers=-1", "--threads=-1", "--engine=tpu",
                                    "--row_per_shard=3"])
def test_bad_options_are_one_usage_line(checkpoint, photos, tmp_path, option, capsys):
    with pytest.raises(SystemExit) as e:
        run(checkpoint, photos, tmp_path / "emb", option)
    assert e.value.code == 2
    assert option.split("=")[0] in capsys.readouterr().err


def test_without_pyarrow_the_error_names_the_extra(checkpoint, photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as e:
        run(checkpoint, photos, tmp_path / "emb", IMAGES)
    assert 'pip install "clip-foundation[scale]"' in str(e.value) and not (tmp_path / "emb").exists()


def test_the_clip_embed_command_exits_0_when_main_returns(monkeypatch):
    from clip_foundation import commands
    monkeypatch.setattr(embed, "main", lambda: {"complete": True})
    assert commands.embed() == 0


@pytest.fixture(scope="module")
def shard_set(photos, tmp_path_factory):
    """The photos as 3 WebDataset shards (4, 4, 3 samples) written by the project's converter."""
    from clip_foundation.data.splits import image_folder_records
    from clip_foundation.data.records import Record
    from clip_foundation.data.shards import write_shards
    records = [Record(r.image, [f"caption {i}"]) for i, r in enumerate(image_folder_records(photos))]
    folder = tmp_path_factory.mktemp("shards") / "set"
    write_shards(records, folder, shard_size=4, progress=False)
    return folder


def test_webdataset_shards_give_one_part_per_shard_equal_to_the_image_files(checkpoint, photos, shard_set, tmp_path):
    info = run(checkpoint, f"{shard_set}/{{00000..00002}}.tar", tmp_path / "emb")
    assert info["complete"] and info["shards"] == 3 and info["rows"] == N_IMAGES and info["rows_per_shard"] is None
    embeddings, meta = all_rows(tmp_path / "emb")
    run(checkpoint, photos, tmp_path / "files", IMAGES, "--rows_per_shard=4")
    files, file_meta = all_rows(tmp_path / "files")
    np.testing.assert_array_equal(embeddings, files)  # the same bytes decode to the same pixels
    assert meta["image_path"] == file_meta["image_path"]  # shards.py keeps each image's source path
    assert meta["caption"] == [f"caption {i}" for i in range(N_IMAGES)]
    assert meta["key"][:5] == ["00000/000000000", "00000/000000001", "00000/000000002", "00000/000000003",
                               "00001/000000004"]


def test_a_bad_shard_sample_is_skipped_and_counted(checkpoint, tmp_path):
    import webdataset as wds
    good = Image.fromarray(np.full((20, 20, 3), 128, np.uint8))
    buffer = __import__("io").BytesIO()
    good.save(buffer, format="PNG")
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "a", "png": buffer.getvalue(), "txt": "a grey square"})
        sink.write({"__key__": "b", "png": b"garbage", "txt": "broken"})
        sink.write({"__key__": "c", "txt": "no image at all"})
        sink.write({"__key__": "d", "png": buffer.getvalue(), "json": json.dumps({"url": "https://x/d.png"})})
    info = run(checkpoint, tmp_path / "bad.tar", tmp_path / "emb")
    assert info["rows"] == 2 and info["skipped"] == {"undecodable image": 1, "no image": 1}
    assert "bad.tar:b.png" in info["first_skipped"]["undecodable image"]
    _, meta = all_rows(tmp_path / "emb")
    assert meta["image_path"] == [f"{tmp_path / 'bad.tar'}#a", "https://x/d.png"]
    assert meta["caption"] == ["a grey square", ""] and meta["key"] == ["bad/a", "bad/d"]


# ---------------------------------------------------------------- processes: kill -9, torchrun

def command(checkpoint, data, out, *options) -> list[str]:
    return [sys.executable, "-m", "clip_foundation.embed", f"--checkpoint={checkpoint}", f"--data={data}",
            f"--out={out}", "--engine=torch", "--device=cpu", "--progress=false", *options]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def one_thread():
    """This process encodes with one thread, as the subprocesses do, for byte-equal floats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_kill_9_mid_embedding_then_rerun_equals_an_uninterrupted_run(checkpoint, shard_set, tmp_path):
    # pipe: shards that each take 0.4 s to arrive, so the kill lands with parts still to write
    slow = f"pipe:sleep 0.4; cat {shard_set}/{{00000..00002}}.tar"
    out = tmp_path / "killed"
    process = subprocess.Popen(command(checkpoint, slow, out), cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not fmt.is_done(out, 0) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert fmt.is_done(out, 0) and not fmt.read_info(out)["complete"]
    assert not all(fmt.is_done(out, p) for p in range(3)), "the run finished before the kill"
    subprocess.run(command(checkpoint, slow, out), cwd=ROOT, env=ENV, check=True, capture_output=True)
    with one_thread():
        run(checkpoint, slow, tmp_path / "whole")
    assert fmt.read_info(out)["complete"]
    for p in range(3):
        assert fmt.embeddings_path(out, p).read_bytes() == fmt.embeddings_path(tmp_path / "whole", p).read_bytes()
        assert fmt.read_part(out, p)[1] == fmt.read_part(tmp_path / "whole", p)[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("source", ["files", "shards"])
def test_two_torchrun_ranks_write_exactly_the_files_of_one_process(checkpoint, photos, shard_set, tmp_path, source):
    data, options = (photos, [IMAGES, "--rows_per_shard=2"]) if source == "files" else (shard_set, [])
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port())]
    done = subprocess.run(launch + command(checkpoint, data, tmp_path / "two", *options)[1:],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with one_thread():  # as the ranks ran (OMP_NUM_THREADS=1)
        run(checkpoint, data, tmp_path / "one", *options)
    one, two = fmt.read_info(tmp_path / "one"), fmt.read_info(tmp_path / "two")
    assert two["complete"] and one == two and one["shards"] == (6 if source == "files" else 3)
    names = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*") if p.is_file())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.slow
def test_the_speed_benchmark_prints_a_rate_per_engine(photos, capsys):
    from benchmarks import embed_speed
    embed_speed.main([f"--images={photos}", "--n=6", "--models=tiny", "--engines=torch", "--workers=1",
                      "--batch_size=4", "--repeats=1"])
    lines = capsys.readouterr().out.splitlines()
    rates = {line[8:34].strip(): float(line.split()[-2]) for line in lines[2:]}
    assert set(rates) == {"(decode + resize only)", "torch"} and all(r > 0 for r in rates.values())
