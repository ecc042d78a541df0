"""Sampler, splits, recall@K and the --key=value parser."""
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from clip_foundation.common import cli
from clip_foundation.data.splits import UniqueImageBatchSampler, carve_val_from_train, check_captions, split_by_image
from clip_foundation.evaluate.metrics import retrieval_metrics
from clip_foundation.data.records import DataError, Record


@pytest.mark.parametrize("counts,batch,rounds", [([5] * 40, 8, 5), ([1, 2, 3, 5] * 10, 7, 3), ([3] * 9, 4, 1)])
def test_sampler_never_puts_one_image_twice_in_a_batch(counts, batch, rounds):
    sampler = UniqueImageBatchSampler(counts, batch, captions_per_epoch=rounds, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for b in batches:
        images = [i for i, _ in b]
        assert len(images) == len(set(images)) == batch
        assert all(0 <= c < counts[i] for i, c in b)


def test_sampler_covers_every_caption_once_per_epoch():
    counts = [5] * 16
    pairs = [p for b in UniqueImageBatchSampler(counts, 4, captions_per_epoch=5, seed=0) for p in b]
    assert Counter(pairs) == Counter({(i, c): 1 for i in range(16) for c in range(5)})


def test_sampler_reshuffles_each_epoch_deterministically():
    sampler = UniqueImageBatchSampler([2] * 20, 5, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert first != second and list(sampler) == first


def records(n, split=None):
    return [Record(image=f"/x/{i}.jpg", captions=[f"c{i}"], split=split) for i in range(n)]


def test_split_uses_the_dataset_split_when_shipped():
    recs = records(3, "train") + records(2, "val") + records(1, "test")
    splits = split_by_image(recs, 100, 100)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 2, 1]


def test_images_outside_the_shipped_split_lists_are_left_out_with_a_warning():
    recs = records(3, "train") + records(2, "val") + records(4)
    with pytest.warns(UserWarning, match="4 images are in none"):
        splits = split_by_image(recs, 100, 100)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 2, 0]


def test_seeded_split_is_by_image_disjoint_and_reproducible():
    recs = records(50)
    a, b = split_by_image(recs, 5, 10, seed=0), split_by_image(recs, 5, 10, seed=0)
    assert [len(a[s]) for s in ("train", "val", "test")] == [35, 5, 10]
    images = [r.image for s in a.values() for r in s]
    assert len(images) == len(set(images)) == 50
    assert a == b and a != split_by_image(recs, 5, 10, seed=1)


@pytest.mark.parametrize("shipped_test", [0, 3])
def test_val_carved_from_train_keeps_the_dataset_val_for_scoring(shipped_test):
    """The epoch is chosen on images carved from train; the dataset's own val (Flickr8k's dev) is
    then the held-out score when the dataset ships no test split."""
    recs = (records(40, "train") + [Record(f"/dev/{i}.jpg", ["d"], "val") for i in range(6)]
            + [Record(f"/test/{i}.jpg", ["t"], "test") for i in range(shipped_test)])
    splits = carve_val_from_train(split_by_image(recs, 100, 100), 8, seed=0)
    train, val, test = (splits[s] for s in ("train", "val", "test"))
    assert len(train) == 32 and len(val) == 8 and all(r.split == "train" for r in train + val)
    assert not {r.image for r in train} & {r.image for r in val}
    assert [r.image for r in test] == ([f"/test/{i}.jpg" for i in range(3)] if shipped_test
                                       else [f"/dev/{i}.jpg" for i in range(6)])
    assert splits == carve_val_from_train(split_by_image(recs, 100, 100), 8, seed=0)  # seeded
    with pytest.raises(DataError, match="val_from_train"):
        carve_val_from_train(split_by_image(recs, 100, 100), 40, seed=0)


def test_split_too_small_is_a_clear_error():
    with pytest.raises(DataError, match="too few"):
        split_by_image(records(10), 5, 5)


# ---------------------------------------------------------------- recall@K

def brute_force(image_f, text_f, t2i, k):
    """Reference: sort every score list, find where the true item lands."""
    sims = text_f @ image_f.T
    t2i_hits = [t2i[t].item() in sims[t].argsort(descending=True)[:k].tolist() for t in range(len(text_f))]
    i2t_hits = [any(t2i[t].item() == i for t in sims[:, i].argsort(descending=True)[:k].tolist())
                for i in range(len(image_f))]
    return 100 * sum(t2i_hits) / len(t2i_hits), 100 * sum(i2t_hits) / len(i2t_hits)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_brute_force_on_random_embeddings(chunk, seed):
    g = torch.Generator().manual_seed(seed)
    n_img, per = 30, 5
    image_f = F.normalize(torch.randn(n_img, 16, generator=g), dim=-1)
    t2i = torch.arange(n_img).repeat_interleave(per)
    text_f = F.normalize(image_f[t2i] + 1.2 * torch.randn(len(t2i), 16, generator=g), dim=-1)
    m = retrieval_metrics(image_f, text_f, t2i, ks=(1, 5, 10), chunk=chunk)
    for k in (1, 5, 10):
        t2i_ref, i2t_ref = brute_force(image_f, text_f, t2i, k)
        assert m[f"text_to_image_R@{k}"] == pytest.approx(t2i_ref)
        assert m[f"image_to_text_R@{k}"] == pytest.approx(i2t_ref)


def test_recall_on_a_hand_built_example():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2.
    image_f = torch.eye(3)
    text_f = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0.6, 0, 0.8]])
    m = retrieval_metrics(image_f, text_f, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
    # text ranks: caption0 -> 1, caption1 -> image0 scores 0 vs image1 1 and image2 0 (a tie,
    # counted against it) -> rank 3, caption2 -> 1, caption3 -> image2 0.8 beats image0 0.6 -> rank 1
    assert m["text_to_image_R@1"] == pytest.approx(75.0)
    assert m["text_to_image_R@2"] == pytest.approx(75.0)
    assert m["text_to_image_mean_rank"] == pytest.approx(1.5)
    # image0: its best caption (caption0, 1.0) is top; image1: caption1 (image0's) ties its own
    # caption2 at 1.0 and a tie counts against the query -> rank 2; image2: caption3 (0.8) is top -> rank 1
    assert m["image_to_text_R@1"] == pytest.approx(200 / 3)
    assert m["image_to_text_mean_rank"] == pytest.approx(4 / 3)
    assert m["image_to_text_median_rank"] == 1


def test_collapsed_embeddings_score_like_a_constant_model():
    # every image and caption identical: each query ties with the whole gallery, which must not be a win
    m = retrieval_metrics(F.normalize(torch.ones(100, 8)), F.normalize(torch.ones(500, 8)),
                          torch.arange(500) // 5)
    for d in ("text_to_image", "image_to_text"):
        assert m[f"{d}_R@1"] == m[f"{d}_R@5"] == m[f"{d}_R@10"] == 0.0
    assert m["text_to_image_median_rank"] == 100 and m["image_to_text_median_rank"] == 496


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["image", "text"])
def test_non_finite_features_are_an_error(bad, which):
    image_f, text_f = torch.eye(4), torch.eye(4)
    (image_f if which == "image" else text_f)[2, 1] = bad
    with pytest.raises(ValueError, match=f"non-finite {which} features"):
        retrieval_metrics(image_f, text_f, torch.arange(4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_with_many_ties_matches_pessimistic_brute_force(seed):
    # integer-valued features make equal similarities common; a tie ranks the query below it
    g = torch.Generator().manual_seed(seed)
    image_f = torch.randint(0, 2, (12, 4), generator=g).float()
    t2i = torch.arange(12).repeat_interleave(2)
    text_f = torch.randint(0, 2, (24, 4), generator=g).float()
    m = retrieval_metrics(image_f, text_f, t2i, ks=(1, 3))
    sims = (text_f @ image_f.T).tolist()  # (24, 12) in plain numbers
    t2i_rank = [sum(s >= row[t2i[t]] for s in row) for t, row in enumerate(sims)]
    i2t_rank = []
    for i in range(12):
        column = [row[i] for row in sims]
        best = max(column[t] for t in range(24) if t2i[t] == i)
        i2t_rank.append(1 + sum(column[t] >= best for t in range(24) if t2i[t] != i))
    for k in (1, 3):
        assert m[f"text_to_image_R@{k}"] == pytest.approx(100 * sum(r <= k for r in t2i_rank) / 24)
        assert m[f"image_to_text_R@{k}"] == pytest.approx(100 * sum(r <= k for r in i2t_rank) / 12)


def test_perfect_and_reversed_retrieval():
    f = F.normalize(torch.randn(20, 32), dim=-1)
    perfect = retrieval_metrics(f, f, torch.arange(20))
    assert perfect["text_to_image_R@1"] == perfect["image_to_text_R@1"] == 100.0
    worst = retrieval_metrics(f, -f, torch.arange(20))
    assert worst["text_to_image_R@1"] == 0.0 and worst["text_to_image_mean_rank"] == 20.0


# ---------------------------------------------------------------- cli

@dataclass
class Inner:
    width: int = 8  # width of a thing
    kind: str = "a"  # which kind


@dataclass
class Outer:
    image: Inner = field(default_factory=Inner)
    text: Inner = field(default_factory=Inner)
    epochs: int = 3  # passes over the data
    lr: float = 1e-3  # learning rate
    fast: bool = False  # go fast
    mean: tuple[float, ...] = (0.5, 0.5)  # normalisation


@pytest.mark.parametrize("argv,path,value", [
    (["--epochs=5"], "epochs", 5), (["--lr", "3e-4"], "lr", 3e-4), (["--fast"], "fast", True),
    (["--fast=false"], "fast", False), (["--image.width=16"], "image.width", 16),
    (["--text.kind", "b"], "text.kind", "b"), (["--mean=0.1,0.2,0.3"], "mean", (0.1, 0.2, 0.3)),
])
def test_overrides_parse_typed_values(argv, path, value):
    cfg = cli.apply_overrides(Outer(), argv)
    owner, f = cli.leaves(cfg)[path]
    assert getattr(owner, f.name) == value


@pytest.mark.parametrize("argv,message", [
    (["--epoch=5"], "unknown option --epoch"), (["--width=4"], "ambiguous"),
    (["--epochs=five"], "epochs"), (["--fast=maybe"], "true/false"), (["epochs=5"], "unexpected argument"),
    (["--lr"], "needs a value"),
])
def test_bad_overrides_are_rejected_clearly(argv, message):
    with pytest.raises(cli.ConfigError, match=message):
        cli.apply_overrides(Outer(), argv)


@pytest.mark.parametrize("tool,option,said", [
    *((tool, option, said) for tool in ("evaluate", "search") for option, said in (
        ("--batch_size=0", "--batch_size=0: must be >= 1"), ("--batch_size=-3", "--batch_size=-3: must be >= 1"),
        ("--device=tpu", "--device='tpu': must be auto, cpu"), ("--device=cuda:99", "--device='cuda:99': must be"))),
    ("search", "-n=-1", "--n=-1: must be 1 to 1000, or 0"),
])
def test_script_options_out_of_range_are_usage_errors_stating_the_range(tool, option, said, capsys):
    from clip_foundation.evaluate import command as evaluate
    from clip_foundation.search import command as search
    argv = ["--checkpoint=/no/such/run", option]  # refused before anything is loaded
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv) if tool == "evaluate" else search.main(["a dog", *argv])
    first_line = capsys.readouterr().err.splitlines()[0]
    assert exc.value.code == 2 and first_line.startswith(f"error: {said}")


def test_help_lists_every_key_with_its_reason():
    text = cli.help_text(Outer(), "usage")
    for key, why in [("--image.width=8", "width of a thing"), ("--epochs=3", "passes over the data")]:
        line = next(ln for ln in text.splitlines() if key in ln)
        assert why in line


# ---------------------------------------------------------------- captions the tokenizer cannot read

@pytest.fixture(scope="module")
def tokenizer():
    from clipModel import train_tokenizer
    return train_tokenizer(["a red circle", "a blue square above a green star"] * 5, vocab_size=60)


def test_caption_of_only_unknown_tokens_is_an_error_naming_the_image(tokenizer):
    recs = [Record("/d/a.png", ["a red circle"], line=2), Record("/d/b.png", ["a blue star", "日本語"], line=3)]
    with pytest.raises(DataError, match=r"/d/b.png \(source line 3\).*'日本語'.*only unknown tokens"):
        check_captions(recs, tokenizer)


def test_an_empty_split_has_no_captions_to_check(tokenizer):
    assert check_captions([], tokenizer) == []


def test_skip_bad_drops_and_reports_unreadable_captions(tokenizer):
    recs = [Record("/d/a.png", ["a red circle", "   ☃"], line=2), Record("/d/b.png", ["日本語"], line=3)]
    with pytest.warns(UserWarning, match=r"skipped 2 captions .*1 images left with none"):
        kept = check_captions(recs, tokenizer, skip_bad=True)
    assert [(str(r.image), r.captions) for r in kept] == [("/d/a.png", ["a red circle"])]


def test_csv_column_names_are_configurable(tmp_path):
    from PIL import Image
    from clip_foundation.data.splits import DataConfig, load_splits
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / f"p{i}.jpg")
    rows = ["id,filename,text"] + [f"{i},p{i // 2}.jpg,photo {i}" for i in range(8)]
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(path=str(tmp_path), image_column="filename", caption_column="text",
                     val_images=1, test_images=1)
    splits = load_splits(cfg)
    assert sorted(len(r.captions) for s in splits.values() for r in s) == [2, 2, 2, 2]
    with pytest.raises(DataError, match="missing column"):
        load_splits(DataConfig(path=str(tmp_path), val_images=1, test_images=1))


def test_column_options_on_a_layout_without_columns_are_rejected(tmp_path):
    from clip_foundation.data.splits import DataConfig, load_splits
    (tmp_path / "Images").mkdir()
    (tmp_path / "captions.txt").write_text("image,caption\n")
    with pytest.raises(DataError, match="apply to csv and hf"):
        load_splits(DataConfig(path=str(tmp_path), image_column="x"))


def test_prefetch_keeps_order_and_raises_the_producers_error():
    from clip_foundation.data.splits import prefetch
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")
    it = prefetch(failing())
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)
