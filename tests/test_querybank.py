"""Querybank normalisation: the corrected score, what it does to a hub, and what it leaves alone."""
import pytest
import torch
import torch.nn.functional as F

from clip_foundation.evaluate.querybank import bank_metrics, hub_bias, load_bank, normalised_images, normalised_texts, save_bank
from clip_foundation.data.records import Record
from clip_foundation.evaluate.metrics import records_metrics


@pytest.mark.parametrize("alpha, beta", [(1.0, 10.0), (0.5, 30.0)])
def test_extra_coordinate_gives_the_inverted_softmax_score(alpha, beta):
    torch.manual_seed(0)
    images, texts, bank = (F.normalize(torch.randn(n, 16), dim=-1) for n in (7, 5, 40))
    expected = texts @ images.T - alpha / beta * torch.logsumexp(beta * images @ bank.T, dim=1)  # (5, 7)
    got = normalised_texts(texts) @ normalised_images(images, hub_bias(images, bank, alpha, beta, chunk=3)).T
    torch.testing.assert_close(got, expected)


def test_an_empty_gallery_has_no_bias():
    assert hub_bias(torch.empty(0, 4), F.normalize(torch.randn(3, 4), dim=-1), 1.0, 10.0).shape == (0,)


def test_a_hub_image_loses_the_queries_it_does_not_match():
    # image 0 is a hub: close to every caption of the bank and, a little less, to query 1,
    # whose own image 1 sits slightly further away: plain cosine ranks the hub first.
    hub, own = torch.tensor([1.0, 0.0, 0.0]), F.normalize(torch.tensor([0.6, 0.8, 0.0]), dim=0)
    query = F.normalize(torch.tensor([0.95, 0.3, 0.0]), dim=0)  # cos 0.95 to the hub, 0.81 to its image
    images = torch.stack([hub, own])
    texts = torch.stack([F.normalize(torch.tensor([1.0, -0.5, 0.0]), dim=0), query])  # caption i of image i
    records = [Record(image=f"{i}.jpg", captions=[f"c{i}"]) for i in range(2)]
    noise = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    bank = F.normalize(torch.tensor([1.0, 0.0, 0.0]) + 0.1 * noise, dim=-1)  # captions all near the hub
    plain = records_metrics(images, texts, records)
    corrected = bank_metrics(images, texts, records, (bank, 1.0, 10.0))
    assert plain["text_to_image_R@1"] == 50.0 and corrected["text_to_image_R@1"] == 100.0
    assert corrected["image_to_text_R@1"] == plain["image_to_text_R@1"]  # image queries: a constant shift


def test_bank_round_trips_through_the_run_folder(tmp_path):
    bank = F.normalize(torch.randn(12, 8), dim=-1)
    assert load_bank(tmp_path) is None
    save_bank(tmp_path, bank, 0.75, 20.0)
    loaded, alpha, beta = load_bank(tmp_path)
    torch.testing.assert_close(loaded, bank, atol=1e-3, rtol=1e-3)  # stored in float16
    assert (alpha, beta) == (0.75, 20.0)


def test_search_ranks_by_the_corrected_score_and_a_plain_run_keeps_cosines(tiny_run, tmp_path):
    import shutil

    from clip_foundation.data.splits import gallery_records
    from clip_foundation.search import gallery
    from clip_foundation.data.splits import decode_images
    from clip_foundation.evaluate.metrics import embed_images
    from clipModel import CLIPModel
    data, run_dir, _ = tiny_run  # trained with --querybank=200
    model = CLIPModel.from_pretrained(run_dir).eval()
    records = gallery_records(run_dir, str(data), "test")
    images, records = decode_images(records, model.config.image.image_size, progress=False)
    with torch.no_grad():
        image_f, query = embed_images(model, images), model.encode_text(["a red circle"])
    cosine = (query @ image_f.T)[0]  # (N,)
    corrected = cosine - hub_bias(image_f, *load_bank(run_dir))
    paths = [str(r.image) for r in records]
    for folder, expected in ((run_dir, corrected), (tmp_path / "plain", cosine)):
        if folder != run_dir:  # the same model without its querybank
            shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("index", "last", "querybank.*"))
        index = gallery.load_or_build_index(model, folder, records, stem=tmp_path / folder.name / "images")
        assert index.embeddings.shape[1] == model.config.projection_dim + (folder == run_dir)
        matches = gallery.find_matches(model, index, "a red circle", n=5)
        got = torch.tensor([m.score for m in matches])
        want = expected[[paths.index(m.path) for m in matches]]
        torch.testing.assert_close(got, want, atol=5e-3, rtol=0)  # float16 rows
        assert got.min() >= expected.topk(5).values[-1] - 5e-3  # the best five, up to float16 ties
    bias = cosine - corrected
    assert bias.max() - bias.min() > 0.01  # the bias differs between images: it can change the order
