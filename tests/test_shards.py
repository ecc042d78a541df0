"""Shards: the converter, the streams' shard split, resume positions, bad samples, shard lists,
and a streamed run learning as well as the cached folder path."""
import hashlib
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL
from clip_foundation.data import shards
from clip_foundation.data import stream
from clip_foundation.data.records import DataError

wds = pytest.importorskip("webdataset", reason="webdataset is not installed (requirements.txt)")


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """A tiny synthetic set (48 train / 12 val / 12 test) as shards of 6: (source folder, shards folder)."""
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    root = tmp_path_factory.mktemp("shards")
    src = generate(root / "src", SyntheticConfig(n_train=48, n_val=12, n_test=12), progress=False)
    shards.main([str(src), str(root / "out"), "--shard_size", "6", "--progress=false"])
    return src, root / "out"


def take(urls, streams, s, n, start=(0, 0), buffer=5, counter=None):
    """The first n items of stream s: (image digest, (pass, url), position)."""
    reader = stream.read_stream(urls, streams, s, 0, 32, buffer, start, counter or stream.SampleCounter())
    items = [next(reader) for _ in range(n)]
    return [(hashlib.sha1(im.numpy().tobytes()).hexdigest(), read, pos) for im, _, read, pos in items]


def sizes(folder):
    return {str(folder / s["name"]): s["samples"] for s in json.loads((folder / "shards.json").read_text())["shards"]}


@pytest.mark.parametrize("shard_size", [5, 100])
def test_converter_writes_every_image_once_per_split(shard_set, tmp_path, shard_size):
    from clip_foundation.data.sources import load_records
    src, _ = shard_set
    written = shards.main([str(src), str(tmp_path), f"--shard_size={shard_size}", "--progress=false"])
    records = load_records(src)
    for split, n in (("train", 48), ("val", 12), ("test", 12)):
        index = written[str(tmp_path / split)]
        assert index["samples"] == n and len(index["shards"]) == -(-n // shard_size)
        got = {}
        for url in stream.shard_urls(str(tmp_path / split)):
            for sample in wds.tarfile_samples([{"url": url}]):
                meta = json.loads(sample["json"])
                got[meta["source"]] = (meta["captions"], sample["png"], sample["txt"].decode())
        want = {str(r.image): r for r in records if r.split == split}
        assert got.keys() == want.keys()  # every image once, in its own split
        for path, (captions, data, txt) in got.items():
            assert captions == want[path].captions and txt == captions[0]
            assert data == Path(path).read_bytes()  # the file's own bytes
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_streams_read_disjoint_shards_that_cover_each_pass(shard_set, streams):
    folder = shard_set[1] / "train"
    urls, n = stream.shard_urls(str(folder)), sizes(folder)
    seen = Counter()
    for s in range(streams):
        mine = stream.stream_shards(urls, streams, s, 0, 0)
        items = take(urls, streams, s, sum(n[u] for u in mine))
        assert {read for _, read, _ in items} == {(0, u) for u in mine}  # only its own shards, pass 0
        seen.update(read[1] for _, read, _ in items)
    assert seen == n  # together, every sample of the pass exactly once
    orders = [stream.stream_shards(urls, 1, 0, 0, p) for p in range(3)]
    assert sorted(orders[0]) == sorted(urls) and len({tuple(o) for o in orders}) == 3  # reshuffled each pass


@pytest.mark.parametrize("cut", [1, 7, 17])
def test_resume_position_skips_nothing_and_repeats_at_most_buffer_plus_shard(shard_set, cut):
    folder = shard_set[1] / "train"
    urls, buffer = stream.shard_urls(str(folder)), 5
    whole = take(urls, 2, 0, sum(sizes(folder)[u] for u in stream.stream_shards(urls, 2, 0, 0, 0)), buffer=buffer)
    before = take(urls, 2, 0, cut, buffer=buffer)
    position = before[-1][2]
    after = take(urls, 2, 0, len(whole), start=position, buffer=buffer)
    after = [a for a in after if a[1][0] == 0]  # the rest of pass 0
    pass0 = {d for d, _, _ in whole}
    got = Counter(d for d, _, _ in before + after)
    assert set(got) == pass0  # nothing of the pass skipped
    assert sum(got.values()) - len(pass0) <= buffer + 6  # repeats: at most the buffer and one shard (6)


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def jpeg(colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, "JPEG")
    return out.getvalue()


def bad_shards(folder: Path) -> list[str]:
    """Shard 0: good, truncated JPEG, no caption, good (img2dataset's json caption). Shard 1:
    two good samples, the file cut inside the second."""
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "00000.tar", [
        {"__key__": "a", "jpg": jpeg(), "txt": "a red box"},
        {"__key__": "b", "jpg": jpeg()[:300], "txt": "cut short"},
        {"__key__": "c", "jpg": jpeg()},
        {"__key__": "d", "jpg": jpeg((0, 0, 250)), "json": {"caption": "a blue box"}}])
    write_shard(folder / "00001.tar", [{"__key__": k, "jpg": jpeg((k == "e") * 250,) * 3, "txt": k} for k in "ef"])
    data = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(data[:data.index(jpeg((0, 0, 0))) + 200])  # inside f's image
    return [str(folder / "00000.tar"), str(folder / "00001.tar")]


def test_bad_samples_are_skipped_and_counted(tmp_path):
    urls, counter = bad_shards(tmp_path), stream.SampleCounter()
    reader = stream.read_stream(urls, 1, 0, 0, 32, 1, (0, 0), counter)
    captions = [next(reader)[1] for _ in range(6)]  # two passes' worth of good samples
    assert set(captions) == {"a red box", "a blue box", "e"}
    per_pass = {k: n // 2 for k, n in counter.counts.items()}
    assert per_pass["undecodable image"] >= 1 and per_pass["no caption"] == 1 and per_pass["unreadable shard"] == 1
    assert "00000.tar:b" in counter.first["undecodable image"] and "00000.tar:c" in counter.first["no caption"]


@pytest.mark.parametrize("listing", ["file", "brace"])
def test_a_missing_shard_is_one_error_naming_it(shard_set, tmp_path, listing, capsys):
    from clip_foundation import training as train
    folder = shard_set[1] / "train"
    missing = folder / "00042.tar"
    if listing == "file":
        source = tmp_path / "shards.txt"
        source.write_text("\n".join([str(folder / "00000.tar"), str(missing), str(folder / "00001.tar")]) + "\n")
    else:
        source = f"{folder}/{{00000..00042}}.tar"
    with pytest.raises(DataError, match=r"00008\.tar: shard not found \(and 34 more" if listing == "brace"
                       else r"00042\.tar: shard not found,"):
        stream.shard_urls(str(source))
    with pytest.raises(SystemExit, match="shard not found"):
        train.main([f"--data={source}", f"--val_data={shard_set[1] / 'val'}", f"--out_dir={tmp_path}"])


def test_feature_dropout_is_refused_on_a_streamed_training_set(shard_set, tmp_path):
    """Streamed batches are encoded as they come, never cached: --feature_dropout would do nothing."""
    from clip_foundation import training as train
    with pytest.raises(SystemExit, match=r"--feature_dropout=0.2: must be 0 when the training set streams"):
        train.main([f"--data={shard_set[1] / 'train'}", f"--val_data={shard_set[1] / 'val'}", f"--out_dir={tmp_path}",
                    "--freeze_image", "--augment=false", "--feature_dropout=0.2", "--progress=false"])
    assert not any(tmp_path.iterdir())  # refused before a run folder


@pytest.mark.parametrize("path,expected", [("{root}/train", True), ("{root}/train/00000.tar", True),
                                           ("{root}/x/{{00000..00003}}.tar", True), ("pipe:curl -s URL", True),
                                           ("{src}", False), ("", False), ("hf:user/set", False)])
def test_which_data_paths_stream(shard_set, path, expected):
    assert stream.is_shards(path.format(root=shard_set[1], src=shard_set[0])) is expected


def test_img2dataset_output_is_read_as_is(tmp_path):
    write_shard(tmp_path / "00000.tar", [{"__key__": f"{i:09d}", "jpg": jpeg(), "txt": f"caption {i}",
                                          "json": {"caption": f"caption {i}", "url": "http://x"}} for i in range(3)])
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 3, "count": 4}))
    urls = stream.shard_urls(str(tmp_path))
    assert stream.count_samples(urls) == 3
    images = [s for s in wds.tarfile_samples([{"url": urls[0]}])]
    image, caption = stream.decode_sample(images[1], 32, random.Random(0))
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and caption == "caption 1"


def run_args(data, out, name, *extra):
    return [f"--data={data}", f"--out_dir={out}", f"--run_name={name}", "--progress=false", "--device=cpu",
            "--tensorboard=false", *TINY_MODEL, *extra]


@pytest.mark.slow
def test_streamed_run_reports_skips_and_resumes_from_its_positions(tmp_path, shard_set, capsys):
    from clip_foundation import training as train
    urls = bad_shards(tmp_path / "bad") + stream.shard_urls(str(shard_set[1] / "train"))[:2]
    (tmp_path / "list.txt").write_text("\n".join(urls))
    common = run_args(tmp_path / "list.txt", tmp_path / "runs", "bad", f"--val_data={shard_set[1] / 'val'}",
                      "--batch_size=4", "--train_samples=12", "--shuffle_buffer=2", "--workers=1", "--warmup_steps=1")
    train.main(common + ["--epochs=1"])
    out = capsys.readouterr().out
    assert "streaming skipped" in out and "no caption" in out and "unreadable shard" in out
    state = torch.load(tmp_path / "runs/bad/last/trainer_state.pt", weights_only=False)["stream"]
    assert state["skipped"]["no caption"] >= 1 and state["streams"] == 1
    train.main(common + ["--epochs=2", f"--resume={tmp_path / 'runs/bad'}"])
    resumed = torch.load(tmp_path / "runs/bad/last/trainer_state.pt", weights_only=False)
    assert resumed["step"] == 6 and resumed["stream"]["skipped"]["no caption"] > state["skipped"]["no caption"]
    assert tuple(resumed["stream"]["positions"]["0"]) > tuple(state["positions"]["0"])


@pytest.mark.slow
def test_streamed_training_reaches_the_folder_recall(tiny_run, tmp_path):
    """The tiny_run fixture's data and recipe, streamed from shards instead of the decoded cache."""
    from clip_foundation import training as train
    data, _, folder_metrics = tiny_run
    shards.main([str(data), str(tmp_path / "shards"), "--shard_size=50", "--progress=false"])
    with pytest.warns(UserWarning, match="a streamed run keeps none, so no querybank was saved"):
        _, run_dir, metrics = train.main(run_args(
            tmp_path / "shards/train", tmp_path / "runs", "streamed", f"--val_data={tmp_path / 'shards/val'}",
            f"--test_data={tmp_path / 'shards/test'}", f"--cache_dir={tmp_path / 'cache'}", "--epochs=12",
            "--batch_size=50", "--lr=2e-3", "--warmup_steps=10", "--workers=2", "--querybank=100"))
    assert not (run_dir / "querybank.safetensors").exists() and "querybank" not in metrics
    chance = 100 * 3 * (1 + 5 + 10) / 60 / 6  # mean of R@1/5/10 over 60 test images, both directions
    assert metrics["mean_recall"] > 2 * chance
    assert metrics["mean_recall"] > folder_metrics["mean_recall"] - 12, (metrics, folder_metrics)


class Killed(BaseException):
    """A kill -9 stand-in: nothing in the converter catches it, so what it leaves is a kill's."""


def kill_after(monkeypatch, reads: int):
    """Make the converter's image reads die after `reads` images (the converter reads each image once)."""
    real, done = Path.read_bytes, []

    def read_bytes(self):
        if self.suffix == ".png":  # the synthetic set's images; its captions.csv is read too
            if len(done) == reads:
                raise Killed
            done.append(self)
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)


@pytest.mark.parametrize("where,args", [(".", ["--split=false"]), ("train", [])])
def test_the_converter_refuses_an_out_folder_holding_files_it_did_not_write(shard_set, tmp_path, where, args,
                                                                            capsys):
    foreign = tmp_path / where / "family_photos_2019.tar"
    foreign.parent.mkdir(exist_ok=True)
    foreign.write_text("x")
    with pytest.raises(SystemExit) as exit_:
        shards.main([str(shard_set[0]), str(tmp_path), "--shard_size=5", "--progress=false", *args])
    message = str(exit_.value.code)
    assert "family_photos_2019.tar" in message and "empty" in message and "\n" not in message
    assert foreign.read_text() == "x" and not list(tmp_path.rglob("0000*"))  # nothing deleted, nothing written


@pytest.mark.parametrize("earlier", [None, 20])
def test_an_interrupted_conversion_is_refused_until_converted_again(shard_set, tmp_path, monkeypatch, earlier,
                                                                    capsys):
    from clip_foundation import training as train
    src, convert = shard_set[0], [str(shard_set[0]), str(tmp_path), "--shard_size=5", "--progress=false"]
    if earlier:  # a whole earlier conversion into the same OUT, with other shard sizes
        shards.main([str(src), str(tmp_path), f"--shard_size={earlier}", "--progress=false"])
    with monkeypatch.context() as m:
        kill_after(m, 6 * 5)  # dies while writing the 7th shard of train
        with pytest.raises(Killed):
            shards.main(convert)
    folder = tmp_path / "train"
    assert len(list(folder.glob("*.tar"))) == 6
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder))}: its conversion did not finish .*convert it again"):
        stream.shard_urls(str(folder))
    with pytest.raises(SystemExit, match="did not finish"):  # --train_samples does not make it usable
        train.main([f"--data={folder}", f"--val_data={src}", "--train_samples=200", f"--out_dir={tmp_path}"])
    shards.main(convert)  # converting again finishes the set
    urls = stream.shard_urls(str(folder))
    assert len(urls) == 10 and stream.count_samples(urls) == 48


def spoil_truncate(folder):
    index = folder / "shards.json"
    index.write_text(index.read_text()[:30])


def spoil_extra_shard(folder):
    (folder / "00099.tar").write_bytes((folder / "00000.tar").read_bytes())


def spoil_missing_shard(folder):
    (folder / "00001.tar").unlink()


def spoil_replaced_shard(folder):
    (folder / "00001.tar").write_bytes(b"x" * 100)


@pytest.mark.parametrize("spoil,fault", [
    (spoil_truncate, r"not valid JSON \(Expecting .* line \d+ column \d+"),
    (spoil_extra_shard, r"does not list 00099\.tar"),
    (spoil_missing_shard, r"lists 00001\.tar, which is missing"),
    (spoil_replaced_shard, r"lists 00001\.tar with \d+ bytes, but it has 100"),
])
def test_a_shard_set_that_disagrees_with_its_shards_json_is_one_error_naming_it(shard_set, tmp_path, spoil, fault):
    shards.main([str(shard_set[0]), str(tmp_path), "--shard_size=20", "--progress=false"])
    folder = tmp_path / "train"
    spoil(folder)
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder / 'shards.json'))}: {fault}.*convert .* again") as error:
        stream.count_samples(stream.shard_urls(str(folder)))
    assert "\n" not in str(error.value)


def test_a_full_disk_while_converting_names_the_shard_and_leaves_no_temp_file(shard_set, tmp_path, monkeypatch):
    import errno
    real, calls = wds.TarWriter.write, []

    def write(self, obj):
        calls.append(obj)
        if len(calls) == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, obj)
    monkeypatch.setattr(wds.TarWriter, "write", write)
    with pytest.raises(SystemExit) as exit_:
        shards.main([str(shard_set[0]), str(tmp_path), "--shard_size=5", "--progress=false"])
    assert str(exit_.value.code) == (f"error: {tmp_path / 'train' / '00001.tar'}: cannot write the shard "
                                     "(No space left on device)")
    assert not list(tmp_path.rglob("*.tmp*"))
    with pytest.raises(DataError, match="did not finish"):
        stream.shard_urls(str(tmp_path / "train"))


def bomb_png() -> bytes:
    out = io.BytesIO()
    Image.new("1", (9000, 9000)).save(out, "PNG")  # a few KB declaring 81 MP
    return out.getvalue()


BAD_CAPTIONS = [  # (.txt bytes, the skip's kind, its message)
    (b"caf\xe9 au lait", "not utf-8", "bytes that are not UTF-8: b'\\xe9'"),
    (b"x" * 1_000_001, "caption too long", "caption is 1000001 characters"),
    (b"two\nlines", "multi-line caption", "caption has a line break"),
    ("\u200b\u200b".encode(), "no caption", "no caption"),
]


@pytest.mark.parametrize("txt,kind,message", BAD_CAPTIONS)
def test_shard_captions_follow_the_readers_rule(tmp_path, txt, kind, message):
    write_shard(tmp_path / "00000.tar", [{"__key__": "a", "jpg": jpeg(), "txt": txt}])
    sample = next(iter(wds.tarfile_samples([{"url": str(tmp_path / "00000.tar")}])))
    with pytest.raises(ValueError) as error:
        stream.decode_sample(sample, 32, random.Random(0))
    assert error.value.args[0] == kind
    assert "00000.tar:a" in error.value.args[1] and message in error.value.args[1]


def test_bad_evaluation_samples_are_skipped_and_counted_by_shard_and_key(tmp_path):
    from clip_foundation.data.records import DataWarning
    (tmp_path / "s").mkdir()
    write_shard(tmp_path / "s/00000.tar", [
        {"__key__": "a", "jpg": jpeg(), "txt": "a red box"},
        {"__key__": "b", "png": bomb_png(), "txt": "a bomb"},
        {"__key__": "c", "jpg": jpeg(), "txt": BAD_CAPTIONS[1][0]},
        {"__key__": "d", "jpg": jpeg((0, 0, 250)), "txt": "a blue box"}])
    with pytest.warns(DataWarning, match=r"skipped 1 undecodable image, 1 caption too long .*"
                                         r"00000\.tar:b\.png: image is 9000x9000"):
        records = shards.extract(stream.shard_urls(str(tmp_path / "s")), tmp_path / "cache")
    assert [r.captions for r in records] == [["a red box"], ["a blue box"]]
    assert len(list((tmp_path / "cache").rglob("*.*g"))) == 2  # only the good images extracted
