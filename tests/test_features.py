"""Frozen-tower features: the fast batched paths give what encoding each item alone gives."""
import pytest
import torch

from clip_foundation.features import text_tower_features
from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig

CAPTIONS = ["a dog", "a very small black dog runs across the wide green field to catch a red ball",
            "two children", "a man in a blue shirt rides a bike", "sunset", "a dog",
            "people walk down a busy city street at night in the rain with umbrellas"]


@pytest.fixture(scope="module")
def scratch_model():
    torch.manual_seed(0)
    config = CLIPConfig(image=ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=1),
                        text=TextEncoderConfig(kind="scratch", pooling="mean", width=32, depth=2))
    return CLIPModel(config, captions=CAPTIONS).eval()


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
def test_length_sorted_caption_batches_give_each_caption_its_own_features(scratch_model, batch_size):
    model = scratch_model
    with torch.no_grad():
        alone = torch.cat([model.text_encoder(**model.tokenize([c])) for c in CAPTIONS])
    batched = text_tower_features(model, CAPTIONS, cache_dir=None, batch_size=batch_size, progress=False)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
