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

TINY_MODEL = ["--image.image_size=32", "--image.patch_size=8", "--image.width=64", "--image.depth=2",
              "--text.width=64", "--text.depth=2", "--projection_dim=64"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A small CLIP trained once per test session on a tiny synthetic set: (data dir, run dir, test metrics)."""
    import train
    from synthetic import SyntheticConfig, generate
    root = tmp_path_factory.mktemp("e2e")
    data = generate(root / "synthetic", SyntheticConfig(n_train=400, n_val=40, n_test=60), progress=False)
    argv = [f"--data={data}", f"--out_dir={root / 'runs'}", "--run_name=tiny", "--epochs=12",
            "--batch_size=50", "--lr=2e-3", "--warmup_steps=10", "--progress=false",
            f"--cache_dir={root / 'cache'}", *TINY_MODEL]
    model, run_dir, metrics = train.main(argv)
    return data, run_dir, metrics
