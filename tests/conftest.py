import os
import sys
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

import clip_foundation.engines.registry as _engines  # noqa: E402

# Tests run `--engine=auto` on torch: on a CPU it would export and compile OpenVINO graphs for every
# tiny model (seconds each, most of it in the kernel). The engines' own tests (test_engines.py,
# test_export.py) put the real choice back with the `real_engines` fixture.
REAL_AUTO_ORDER, _engines.auto_order = _engines.auto_order, lambda: []


@pytest.fixture
def real_engines(monkeypatch):
    """`auto` picks the fastest installed engine again, as it does outside the tests."""
    monkeypatch.setattr(_engines, "auto_order", REAL_AUTO_ORDER)

TINY_MODEL = ["--image.image_size=32", "--image.patch_size=8", "--image.width=64", "--image.depth=2",
              "--text.width=64", "--text.depth=2", "--projection_dim=64"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A small CLIP trained once per test session on a tiny synthetic set: (data dir, run dir, test metrics)."""
    from clip_foundation import training as train
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    root = tmp_path_factory.mktemp("e2e")
    data = generate(root / "synthetic", SyntheticConfig(n_train=400, n_val=40, n_test=60), progress=False)
    argv = [f"--data={data}", f"--out_dir={root / 'runs'}", "--run_name=tiny", "--epochs=12",
            "--batch_size=50", "--lr=2e-3", "--warmup_steps=10", "--progress=false",
            f"--cache_dir={root / 'cache'}", "--querybank=200", *TINY_MODEL]
    model, run_dir, metrics = train.main(argv)
    return data, run_dir, metrics


@pytest.fixture
def checkpoint(tiny_run, tmp_path):
    """A private copy of the tiny run's model (scratch towers, a querybank), so index caches and engine
    graphs written here touch nothing shared."""
    import shutil
    _, run_dir, _ = tiny_run
    dest = tmp_path / "ckpt"
    dest.mkdir()
    for f in run_dir.iterdir():
        if f.is_file() and f.suffix in (".json", ".safetensors") and f.name != "metrics.json":
            shutil.copy2(f, dest / f.name)
    return dest


def wordpiece_tokenizer(words):
    """A DistilBERT tokenizer over a fixed vocabulary ([PAD] [UNK] [CLS] [SEP] [MASK] + words), built
    from a `tokenizers` object: transformers 4 needs vocab_file= and 5 ignores it, both take this."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import DistilBertTokenizerFast
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(special + list(words))}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return DistilBertTokenizerFast(tokenizer_object=tok, **{f"{k}_token": f"[{k.upper()}]"
                                                            for k in ("pad", "unk", "cls", "sep", "mask")})


TINY_CAPTIONS = ["a red circle above a blue square", "a big green triangle", "a small yellow star on the left"]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A tiny ViT and DistilBERT saved with save_pretrained, as a user's local folders would be."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel, ViTConfig, ViTImageProcessor, ViTModel
    words = sorted({w for c in TINY_CAPTIONS for w in c.split()})
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, image_size=32, patch_size=8))
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                      image_std=[0.2, 0.25, 0.3]).save_pretrained(root / "vit")
    tokenizer = wordpiece_tokenizer(words)
    assert len(tokenizer) == 5 + len(words) and tokenizer.unk_token_id not in tokenizer(TINY_CAPTIONS[0])["input_ids"]
    tokenizer.save_pretrained(root / "bert")
    DistilBertModel(DistilBertConfig(vocab_size=5 + len(words), dim=32, n_layers=2, n_heads=2,
                                     hidden_dim=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    return root


TIERS = ("long", "slow", "browser", "distributed", "notebook")


def pytest_collection_modifyitems(items):
    # the everyday tier is what no other tier claims: `python -m pytest -m fast`
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.fast)
