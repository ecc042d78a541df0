"""CLIP_benchmark, the field's evaluation harness, scores a project model with its own code: its
zeroshot_retrieval and zeroshot_classification `evaluate` on the tiny run, through the small
adapter any outside client writes, give the numbers `evaluate.py --format=clip_benchmark` writes.
Also: the recall definitions agree on random embeddings, mean per-class recall is sklearn's
balanced accuracy, and an unknown --format is refused in one line."""
import json
import math
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from torchvision.datasets import ImageFolder

from clip_foundation.evaluate import benchmark_format
from clip_foundation.evaluate import command as evaluate
from clip_foundation.evaluate import metrics as retrieval
from clip_foundation.evaluate import zeroshot
from clip_foundation.data.sources import read_caption_csv
from clipModel import CLIPModel


# ---------------------------------------------------------------- the outside client's adapter

class OutsideModel(torch.nn.Module):
    """What CLIP_benchmark calls: encode_image(normalised images) and encode_text(token ids), the
    attention mask rebuilt from the padding as open_clip's Hugging Face text towers do."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model, self.pad_id = model, model.tokenizer.pad_token_id

    def encode_image(self, images):
        return self.model.encode_image(images)

    def encode_text(self, ids):
        return self.model.encode_text(ids, attention_mask=(ids != self.pad_id).long())


def outside_client(run_dir):
    """-> (model, tokenizer, image transform) as a CLIP_benchmark user would wire a project model."""
    model = CLIPModel.from_pretrained(run_dir).eval()
    return OutsideModel(model), lambda texts: model.tokenize(texts)["input_ids"], model.image_transform()


def top_k_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's `accuracy` (top-k hits / n) with `.item()` where it calls float() on a
    one-element array, which NumPy 2.4 refuses (LAION-AI/CLIP_benchmark#147)."""
    hits = output.topk(max(topk), 1)[1].t() == target[None]  # (k, N): row j = j-th guess right
    return [hits[:k].sum().item() / len(target) for k in topk]


def with_working_accuracy(monkeypatch):
    """Their `accuracy` if it runs on this NumPy, else `top_k_accuracy` in its place."""
    try:
        zeroshot_classification.accuracy(torch.eye(2), torch.arange(2))
    except TypeError:
        monkeypatch.setattr(zeroshot_classification, "accuracy", top_k_accuracy)


def one_shape_test_images(data):
    """[(path, colour, shape)] of the synthetic test split's one-shape images."""
    return [(rec.image, rec.extra["color1"], rec.extra["shape1"]) for rec in read_caption_csv(data)
            if rec.split == "test" and rec.extra["n_shapes"] == "1"]


# ---------------------------------------------------------------- the same numbers, end to end

def flickr8k_copy(data, root, shared_captions: bool) -> float:
    """The synthetic test split in Kaggle's Flickr8k layout (Images/*.jpg, captions.txt), which
    both the project and CLIP_benchmark's Flickr dataset read. Unless `shared_captions`, a caption
    that is word for word another image's is left out. -> the share of images with such a caption."""
    records = [r for r in read_caption_csv(data) if r.split == "test"]
    images_of = Counter(c for r in records for c in set(r.captions))
    (root / "Images").mkdir(parents=True)
    lines, touched = ["image,caption"], 0
    for rec in records:
        touched += any(images_of[c] > 1 for c in rec.captions)
        captions = [c for c in rec.captions if shared_captions or images_of[c] == 1]
        if captions:
            with Image.open(rec.image) as im:
                im.convert("RGB").save(root / "Images" / f"{rec.image.stem}.jpg", quality=95)
            assert not any(ch in c for c in captions for ch in ',"'), "captions both readers split alike"
            lines += [f"{rec.image.stem}.jpg,{c}" for c in captions]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return touched / len(records)


@pytest.mark.parametrize("shared_captions", [False, True])
def test_clip_benchmark_retrieval_scores_a_project_model_as_evaluate_does(tiny_run, tmp_path, shared_captions):
    # Two images sharing a caption word for word tie on it: the project counts the tie against the
    # image query, CLIP_benchmark's top-k picks either. Without such captions the numbers are equal;
    # with them, text_retrieval_recall differs by at most the share of images that have one.
    data, run_dir, _ = tiny_run
    touched = flickr8k_copy(data, tmp_path / "flickr8k", shared_captions)
    out = tmp_path / "cb.json"
    written = evaluate.main(["--checkpoint", str(run_dir), "--data", str(tmp_path / "flickr8k"), "--split=all",
                             "--format=clip_benchmark", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == written and list(saved) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert (saved["dataset"], saved["task"], saved["pretrained"]) == ("flickr8k", "zeroshot_retrieval", str(run_dir))

    model, tokenizer, transform = outside_client(run_dir)
    dataset = build_dataset("flickr8k", root=str(tmp_path / "flickr8k" / "Images"), transform=transform,
                            annotation_file=str(tmp_path / "flickr8k" / "captions.txt"), task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=get_dataset_collate_fn("flickr8k"))
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert list(saved["metrics"]) == list(theirs)  # the same keys, in the same order
    for key, value in theirs.items():
        ties = touched if shared_captions and key.startswith("text_retrieval") else 0
        assert abs(saved["metrics"][key] - value) <= ties + 1e-4, key
    assert 0 < theirs["image_retrieval_recall@1"] < theirs["image_retrieval_recall@10"]  # not a degenerate case


@pytest.mark.parametrize("classes", ["four_colours", "colour_shape"])
def test_clip_benchmark_classification_scores_a_project_model_as_evaluate_does(tiny_run, tmp_path, classes,
                                                                             monkeypatch):
    # four colours: under 5 classes, where acc5 is NaN; colour_shape: more, named with "_"
    data, run_dir, _ = tiny_run
    root = tmp_path / classes
    images = one_shape_test_images(data)
    four = sorted({colour for _, colour, _ in images})[:4]
    for path, colour, shape in images:
        if classes == "four_colours" and colour not in four:
            continue
        folder = root / (colour if classes == "four_colours" else f"{colour}_{shape}")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    written = evaluate.main(["--checkpoint", str(run_dir), "--zeroshot", str(root), "--format=clip_benchmark",
                             "--out", str(tmp_path / "cb.json")])
    saved = json.loads((tmp_path / "cb.json").read_text())  # NaN comes back as NaN, as CLIP_benchmark's files
    assert saved["task"] == "zeroshot_classification" and saved["dataset"] == classes

    model, tokenizer, transform = outside_client(run_dir)
    dataset = ImageFolder(str(root), transform=transform)  # the same sorted class folders
    names = [zeroshot.clean_class_name(c) for c in dataset.classes]
    templates = [t.replace("{}", "{c}") for t in zeroshot.TEMPLATES]  # CLIP_benchmark's placeholder
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    with_working_accuracy(monkeypatch)
    theirs = zeroshot_classification.evaluate(model, loader, tokenizer, names, templates, "cpu", amp=False)
    assert list(saved["metrics"]) == list(theirs) == list(written["metrics"])
    assert math.isnan(theirs["acc5"]) == (len(names) < 5)
    for key, value in theirs.items():
        assert saved["metrics"][key] == pytest.approx(value, abs=1e-4, nan_ok=True), key
    assert theirs["acc1"] > 1.5 / len(names)  # a model that learnt something, not chance


# ---------------------------------------------------------------- the definitions, without a model

def their_recall(image_features, text_features, text_to_image, k):
    """CLIP_benchmark's recall@k both ways, from its own recall_at_k (as its evaluate calls it)."""
    scores = text_features @ image_features.T  # (N_txt, N_img)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_to_image] = True
    return ((zeroshot_retrieval.recall_at_k(scores, positive, k) > 0).float().mean().item(),
            (zeroshot_retrieval.recall_at_k(scores.T, positive.T, k) > 0).float().mean().item())


@pytest.mark.parametrize("seed", range(4))
def test_recall_keys_mean_what_clip_benchmark_computes(seed):
    g = torch.Generator().manual_seed(seed)
    n_img = 40
    text_to_image = torch.repeat_interleave(torch.arange(n_img), torch.randint(1, 6, (n_img,), generator=g))
    image_features = F.normalize(torch.randn(n_img, 8, generator=g), dim=-1)
    text_features = F.normalize(image_features[text_to_image] + 0.8 * torch.randn(len(text_to_image), 8, generator=g),
                                dim=-1)  # captions near their image: recall well above chance
    ours = benchmark_format.retrieval_metrics(retrieval.retrieval_metrics(image_features, text_features, text_to_image))
    for k in (1, 5, 10):
        expected = their_recall(image_features, text_features, text_to_image, k)
        got = (ours[f"image_retrieval_recall@{k}"], ours[f"text_retrieval_recall@{k}"])
        assert got == pytest.approx(expected, abs=1e-6), k


@pytest.mark.parametrize("seed", range(4))
def test_mean_per_class_recall_is_balanced_accuracy(seed):
    g = torch.Generator().manual_seed(seed)
    C = 7
    labels = torch.randint(0, C - 2, (60,), generator=g)  # the last two classes have no image
    pred = torch.where(torch.rand(60, generator=g) < 0.5, labels, torch.randint(0, C, (60,), generator=g))
    got = zeroshot.mean_per_class_recall(zeroshot.confusion(pred, labels, C))
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        expected = balanced_accuracy_score(labels.numpy(), pred.numpy())
    assert got / 100 == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("classes,acc5", [(5, 0.75), (4, math.nan)])
def test_classification_keys_follow_clip_benchmark(classes, acc5):
    ours = {"top1": 50.0, "top5": 75.0, "top4": 75.0, "classes": classes, "mean_per_class_recall": 40.0}
    got = benchmark_format.classification_metrics(ours)
    assert list(got) == ["acc1", "acc5", "mean_per_class_recall"] and got["acc1"] == 0.5
    assert got["mean_per_class_recall"] == 0.4 and (got["acc5"] == acc5 or math.isnan(acc5) and math.isnan(got["acc5"]))


def test_an_unknown_format_is_refused_in_one_line(tiny_run, capsys):
    _, run_dir, _ = tiny_run
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(run_dir), "--format=clip-benchmark"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == ("error: --format='clip-benchmark': must be "
                                                       "clip_foundation | clip_benchmark")
