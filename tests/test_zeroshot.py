"""zeroshot: metrics against hand-built and brute-force answers, prompt ensembling,
classify() on every input kind, and evaluate --zeroshot end to end on class folders and a
fake CIFAR-10 in torchvision's exact file layout."""
import json
import math
import pickle
import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_foundation.evaluate import command as evaluate
from clip_foundation.evaluate import metrics as retrieval
from clip_foundation.evaluate import zeroshot
from clipModel import CLIPModel, resize_crop
from clip_foundation.data.sources import read_caption_csv
from test_model import scratch_config
from clip_foundation.evaluate.zeroshot import confusion, per_class_accuracy, topk_accuracy

CLASSES = ["red circle", "blue_square", "green star"]


# ---------------------------------------------------------------- pure metric functions

def test_topk_accuracy_hand_built():
    logits = torch.tensor([[0.1, 0.9, 0.0],   # label 1: rank 1
                           [0.8, 0.1, 0.1],   # label 2: rank 3 (the equal 0.1 counts against it)
                           [0.2, 0.3, 0.5],   # label 2: rank 1
                           [0.5, 0.4, 0.3]])  # label 2: rank 3
    acc = topk_accuracy(logits, torch.tensor([1, 2, 2, 2]), ks=(1, 2, 3))
    assert acc == pytest.approx({1: 50.0, 2: 50.0, 3: 100.0})
    assert topk_accuracy(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1]), ks=(1, 2)) == {1: 0.0, 2: 100.0}
    assert topk_accuracy(torch.ones(4, 10), torch.arange(4), ks=(1, 9, 10)) == {1: 0.0, 9: 0.0, 10: 100.0}


def test_topk_accuracy_refuses_non_finite_logits():
    logits = torch.zeros(3, 4)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        topk_accuracy(logits, torch.tensor([0, 2, 1]))


def test_confusion_and_per_class_hand_built():
    matrix = confusion(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 2]), 4)
    assert matrix.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    acc = per_class_accuracy(matrix)
    assert acc[:3].tolist() == pytest.approx([100.0, 100.0, 100 / 3]) and math.isnan(acc[3])


@pytest.mark.parametrize("n,c,seed,integer", [(1, 2, 0, False), (50, 3, 1, False), (200, 10, 2, False),
                                              (300, 7, 3, True), (64, 100, 4, True)])
def test_metrics_match_brute_force(n, c, seed, integer):
    g = torch.Generator().manual_seed(seed)
    # integer logits make ties common: a tie must count against the label (never a free win)
    logits = torch.randint(0, 4, (n, c), generator=g).float() if integer else torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    ks = sorted({1, min(5, c), c})
    # brute force in plain Python numbers: pytest.approx compares numbers, not tensors
    rows, truth = logits.tolist(), labels.tolist()
    ranks = [sum(rows[i][j] >= rows[i][truth[i]] for j in range(c)) for i in range(n)]
    expected = {k: 100.0 * sum(r <= k for r in ranks) / n for k in ks}
    assert topk_accuracy(logits, labels, ks) == pytest.approx(expected)
    pred = logits.argmax(1)
    brute = [[0] * c for _ in range(c)]
    for p, t in zip(pred.tolist(), labels.tolist()):
        brute[t][p] += 1
    assert confusion(pred, labels, c).tolist() == brute
    for t in range(c):
        got = per_class_accuracy(confusion(pred, labels, c))[t].item()
        total = sum(brute[t])
        assert math.isnan(got) if total == 0 else got == pytest.approx(100.0 * brute[t][t] / total)


# ---------------------------------------------------------------- prompts and classify

@pytest.fixture(scope="module")
def scratch_model():
    torch.manual_seed(0)
    captions = [t.format(c.replace("_", " ")) for c in CLASSES for t in zeroshot.TEMPLATES]
    return CLIPModel(scratch_config(), captions=captions).eval()


def test_classifier_is_the_normalised_mean_of_normalised_template_embeddings(scratch_model):
    templates = zeroshot.TEMPLATES[:4]
    got = zeroshot.zeroshot_classifier(scratch_model, CLASSES, templates)
    assert got.shape == (3, scratch_model.config.projection_dim)
    with torch.no_grad():
        for row, name in zip(got, ["red circle", "blue square", "green star"]):  # "_" cleaned
            emb = scratch_model.encode_text([t.format(name) for t in templates], normalize=False)
            expected = F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(row, expected)


def test_class_name_cleanup_and_templates_file(tmp_path):
    assert zeroshot.clean_class_name(" golden__retriever ") == "golden retriever"
    path = tmp_path / "t.txt"
    path.write_text("# mine\na photo of a {}.\n\n  a sketch of a {}  \n")
    assert zeroshot.read_templates(path) == ["a photo of a {}.", "a sketch of a {}"]
    path.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(zeroshot.DataError, match=r"t.txt:2: .*exactly one"):
        zeroshot.read_templates(path)


def test_classify_every_input_kind_gives_one_sorted_distribution(scratch_model, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "im.png")
    uint8 = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W)
    inputs = {"pil": Image.fromarray(pixels), "path": tmp_path / "im.png", "str": str(tmp_path / "im.png"),
              "uint8": uint8, "batch of one": uint8[None], "float": uint8.float() / 255}
    results = {k: zeroshot.classify(scratch_model, v, CLASSES) for k, v in inputs.items()}
    for kind, result in results.items():
        probs = [p for _, p in result]
        assert sorted(label for label, _ in result) == sorted(CLASSES), kind
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True), kind
        # a float image is resized in float, the others in uint8 (rounded): nearly equal
        tol = 1e-3 if kind == "float" else 1e-6
        assert dict(result) == pytest.approx(dict(results["pil"]), abs=tol), kind
    ensembled = zeroshot.classify(scratch_model, uint8, CLASSES, templates=zeroshot.TEMPLATES)
    assert sum(p for _, p in ensembled) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="one image"):
        zeroshot.classify(scratch_model, uint8[None].repeat(2, 1, 1, 1), CLASSES)


def test_classify_uses_the_clamped_logit_scale(scratch_model):
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        scratch_model.logit_scale.fill_(math.log(1000.0))  # clamped to the config's 100
        img = scratch_model.encode_image(scratch_model.image_transform()(image)[None])
        text = scratch_model.encode_text(CLASSES)
        expected = (100.0 * img @ text.T).softmax(-1)[0]
        got = dict(zeroshot.classify(scratch_model, image, CLASSES))
        scratch_model.logit_scale.fill_(math.log(1 / 0.07))
    assert [got[c] for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-5)


def test_embedding_resizes_other_sizes_in_chunks(scratch_model):
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    resized = torch.stack([resize_crop(32)(im) for im in images])
    torch.testing.assert_close(zeroshot._embed(scratch_model, images, 2),
                               retrieval.embed_images(scratch_model, resized))


# ---------------------------------------------------------------- end to end on the tiny run

def single_shape_by_colour(data, split="test"):
    """{colour: [image paths]} of the synthetic split's one-shape images."""
    by_colour = defaultdict(list)
    for rec in read_caption_csv(data):
        if rec.split == split and rec.extra["n_shapes"] == "1":
            by_colour[rec.extra["color1"]].append(rec.image)
    return dict(sorted(by_colour.items()))


@pytest.fixture(scope="module")
def colour_folders(tiny_run, tmp_path_factory):
    """colours/<colour>/*.png from the tiny run's one-shape test images (colours with >= 2)."""
    root = tmp_path_factory.mktemp("zs") / "colours"
    for colour, paths in single_shape_by_colour(tiny_run[0]).items():
        if len(paths) >= 2:
            (root / colour).mkdir(parents=True)
            for p in paths:
                shutil.copy(p, root / colour / p.name)
    return root


def test_zeroshot_on_colour_folders_is_far_above_chance(tiny_run, colour_folders, capsys):
    _, run_dir, _ = tiny_run
    metrics = evaluate.main(["--checkpoint", str(run_dir), "--zeroshot", str(colour_folders)])
    out = capsys.readouterr().out
    C = len(metrics["class_names"])
    n = sum(len(list(d.iterdir())) for d in colour_folders.iterdir())
    assert C >= 4 and metrics["images"] == n and metrics["split"] == "all"
    assert metrics["top1"] >= 2.5 * 100 / C and metrics["top1"] == pytest.approx(
        100 * sum(row[i] for i, row in enumerate(metrics["confusion"])) / n)
    assert f"top{min(5, C)}" in metrics and "top-1" in out and "red" in out
    saved = json.loads((run_dir / "zeroshot_colours.json").read_text())
    assert saved["top1"] == metrics["top1"] and saved["templates"] == list(zeroshot.TEMPLATES)
    assert (run_dir / "zeroshot_colours.png").stat().st_size > 1000


def test_classify_names_the_right_colour_on_the_tiny_run(tiny_run):
    data, run_dir, _ = tiny_run
    model = CLIPModel.from_pretrained(run_dir)
    by_colour = single_shape_by_colour(data)
    labels = [f"a {c} shape" for c in by_colour]
    hits = [zeroshot.classify(model, p, labels)[0][0] == f"a {c} shape"
            for c, paths in by_colour.items() for p in paths]
    assert sum(hits) >= 0.6 * len(hits)


def test_train_test_folders_use_the_test_split_and_custom_templates(tiny_run, colour_folders, tmp_path):
    _, run_dir, _ = tiny_run
    root = tmp_path / "split"
    for d in colour_folders.iterdir():
        files = sorted(d.iterdir())
        for split, chosen in (("train", files[:1]), ("test", files[1:])):
            (root / split / d.name).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, root / split / d.name / f.name)
    (tmp_path / "t.txt").write_text("a {} shape\n")
    out = tmp_path / "out" / "zs.json"
    metrics = evaluate.main(["--checkpoint", str(run_dir), "--zeroshot", str(root),
                             "--templates", str(tmp_path / "t.txt"), "--out", str(out)])
    assert metrics["split"] == "test" and metrics["templates"] == ["a {} shape"]
    assert metrics["images"] == sum(len(list(d.iterdir())) for d in (root / "test").iterdir())
    assert out.is_file() and out.with_suffix(".png").is_file()


def write_fake_cifar10(root, images: np.ndarray, labels: list[int], names: list[str]):
    """cifar-10-batches-py/{test_batch, batches.meta} in the pickle layout torchvision reads:
    test_batch {"data": uint8 (N, 3072) rows of R, G, B planes, "labels": [...]}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {"batch_label": "testing batch 1 of 1", "labels": labels,
             "data": images.reshape(len(images), -1), "filenames": [f"{i}.png" for i in range(len(labels))]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": names, "num_cases_per_batch": len(labels), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_zeroshot_on_a_fake_cifar10(tiny_run, tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    data, run_dir, _ = tiny_run
    by_colour = single_shape_by_colour(data)
    names = list(by_colour)
    images, labels = [], []
    for i, (colour, paths) in enumerate(by_colour.items()):
        for p in paths:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB").resize((32, 32))).transpose(2, 0, 1))
            labels.append(i)
    write_fake_cifar10(tmp_path, np.stack(images), labels, names)
    argv = ["--checkpoint", str(run_dir), "--zeroshot", f"cifar10:{tmp_path}",
            "--out", str(tmp_path / "c.json")]
    with pytest.raises(SystemExit, match="torchvision cannot read CIFAR-10"):
        evaluate.main(argv)  # md5 of the real files is checked: a fake fails...
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # ...unless told not to
    metrics = evaluate.main(argv)
    assert metrics["class_names"] == names and metrics["images"] == len(labels)
    assert metrics["top1"] >= 2 * 100 / len(names)
    assert (tmp_path / "c.png").is_file()


@pytest.mark.parametrize("case,message", [
    ("no class folders", "no class folders with images"),
    ("missing folder", "folder not found"),
    ("missing cifar", "CIFAR-10 not found"),
    ("missing checkpoint", "not a saved CLIPModel folder"),
    ("bad templates", "exactly one"),
])
def test_bad_inputs_exit_with_a_clear_message(tiny_run, tmp_path, case, message):
    _, run_dir, _ = tiny_run
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")  # an image, but no class folder
    (tmp_path / "t.txt").write_text("no placeholder\n")
    checkpoint, target, extra = str(run_dir), str(tmp_path), []
    if case == "missing folder":
        target = str(tmp_path / "nope")
    elif case == "missing cifar":
        target = f"cifar10:{tmp_path}"
    elif case == "missing checkpoint":
        checkpoint = str(tmp_path / "nope")
    elif case == "bad templates":
        extra = ["--templates", str(tmp_path / "t.txt")]
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", checkpoint, "--zeroshot", target, *extra])
    assert message in str(exc.value)
    if case == "missing cifar":
        assert str(tmp_path / "cifar-10-batches-py" / "test_batch") in str(exc.value)
        assert "nothing is downloaded" in str(exc.value)
