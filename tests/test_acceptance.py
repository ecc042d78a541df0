"""The default `python train.py` meets its promises (long: ~1.5 minutes on 2 CPU cores with bf16 units).

    python -m pytest -m long
"""
import pytest

from clip_foundation import training as train
from benchmarks.synthetic_queries import main as query_benchmark


@pytest.mark.long
def test_default_training_run_meets_the_acceptance_bar(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh machine: the synthetic set is generated here
    model, run_dir, metrics = train.main(["--run_name=acceptance", "--progress=false"])
    chance_r1 = 100 / metrics["images"]
    assert metrics["text_to_image_R@1"] >= 20 * chance_r1
    assert metrics["text_to_image_R@5"] >= 50
    summary = query_benchmark(["--checkpoint", str(run_dir)])
    rows = {r["query"]: r for r in summary["rows"]}
    assert rows["a red circle"]["hits"] >= 7
    assert summary["mean_hits"] >= 7
