"""training/inputs.py: a split's recall from its pre-tokenized captions; dropout on cached features."""
import pytest
import torch

from clip_foundation.data.records import Record
from clip_foundation.evaluate.metrics import embed_texts, embed_tokens, evaluate_records
from clip_foundation.data.splits import train_sampler
from clip_foundation.training.inputs import Inputs, TrainInputs, split_recall
from test_engine import tiny_model


def test_split_recall_from_its_tokens_is_evaluate_records():
    """The loop's validation and test encode the captions tokenized once, in embed_texts' batches:
    the same features and recall as evaluate.py's path, which tokenizes them on each call."""
    model = tiny_model(dropout=0.1).train()  # eval mode is split_recall's own business
    g = torch.Generator().manual_seed(0)
    records = [Record(f"/d/{i}.png", [f"a {c} {s} on the left" if i % 3 else f"{'a big ' * (i % 4)}{c} {s}"
                                      for c, s in (("red", "circle"), ("blue", "star"))][: 1 + i % 2])
               for i in range(7)]
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=g)
    inputs = Inputs(model, records, images)
    captions = [c for r in records for c in r.captions]
    assert len(set(inputs.tokens["attention_mask"].sum(1).tolist())) > 1  # captions of several lengths
    model.eval()
    torch.testing.assert_close(embed_tokens(model, inputs.tokens, batch_size=3),
                               embed_texts(model, captions, batch_size=3), rtol=0, atol=0)
    model.train()
    assert split_recall(model, inputs) == evaluate_records(model.eval(), records, images)


def _frozen_inputs(model, feature_dropout):
    """A training split of 6 images whose frozen towers' features are cached (no tower runs per step)."""
    records = [Record(f"/d/{i}.png", [f"a red circle {i}", f"a blue star {i}"]) for i in range(6)]
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return TrainInputs(model, records, images, train_sampler(records, 4, 1, 0), feature_dropout,
                       image_trains=False, text_trains=False, augment=False, progress=False)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_feature_dropout_drops_cached_image_features_while_training_only(p):
    """--feature_dropout zeroes a fraction p of the cached image features in a training step (the
    rest scaled by 1 / (1 - p), as nn.Dropout), and never touches them in eval mode or when 0."""
    model = tiny_model()  # heads without dropout of their own: any change is the features'
    inputs = _frozen_inputs(model, p)
    rows = inputs.image_features[torch.arange(6)]
    captions = torch.arange(6)
    seen = []
    model.image_projection = _Recorder(model.image_projection, seen)
    model.train()
    torch.manual_seed(0)
    inputs.embed(model, rows, captions)
    dropped = seen[-1]
    kept = dropped != 0
    assert 0.5 * p < 1 - kept.float().mean().item() < min(1.0, 2 * p)  # about a fraction p dropped
    torch.testing.assert_close(dropped[kept], rows[kept] / (1 - p))
    model.eval()
    inputs.embed(model, rows, captions)
    torch.testing.assert_close(seen[-1], rows, rtol=0, atol=0)  # eval: the features as cached
    model.train()
    _frozen_inputs(model, 0.0).embed(model, rows, captions)
    torch.testing.assert_close(seen[-1], rows, rtol=0, atol=0)  # 0: off


class _Recorder(torch.nn.Module):
    """Wraps a projection head and records what it was given."""

    def __init__(self, head, seen):
        super().__init__()
        self.head, self.seen = head, seen

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.head(x)
