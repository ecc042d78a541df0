"""training/inputs.py: a split's recall from its pre-tokenized captions."""
import torch

from clip_foundation.data.records import Record
from clip_foundation.evaluate.metrics import embed_texts, embed_tokens, evaluate_records
from clip_foundation.training.inputs import Inputs, split_recall
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
