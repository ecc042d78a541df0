"""benchmarks/train_throughput.py on a CPU with tiny towers: its rows, rates and FLOP counts."""
import importlib.util
import json
import math

import pytest
import torch

from benchmarks import train_throughput

pytestmark = pytest.mark.slow  # each benchmark's smoke run: seconds to a minute

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "train_throughput.json"
    returned = train_throughput.main([
        "--tiny", "--device=cpu", "--variants=seed_fp32_eager,seed_bf16_sdpa,open_clip_bf16",
        "--batch_sizes=4,8", "--steps=1", "--warmup=1", "--images=16", "--workers=1", f"--out={out}"])
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(returned["rows"]))
    return written


def rows(result, variant):
    return {r["batch"]: r for r in result["rows"] if r["variant"] == variant}


def test_rows_have_positive_finite_rates(result):
    seed = rows(result, "seed_fp32_eager")
    assert set(seed) == {4, 8} and set(rows(result, "seed_bf16_sdpa")) == {4, 8}
    for r in result["rows"]:
        assert "error" not in r, r
        for key in ("pairs_per_s", "flops_per_step", "tflops", "mfu", "loss"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["variant"], key, r[key])
    assert result["peak"]["tflops"] > 0 and "float32" in result["peak"]["kind"]  # a CPU: fp32 peak
    assert result["hardware"]["device"] == "cpu" and result["hardware"]["torch"]


def test_flops_scale_with_batch_and_match_across_attention(result):
    for variant in ("seed_fp32_eager", "seed_bf16_sdpa") + (("open_clip_bf16",) if HAS_OPEN_CLIP else ()):
        by_batch = rows(result, variant)
        ratio = by_batch[8]["flops_per_step"] / by_batch[4]["flops_per_step"]
        assert 1.8 < ratio < 2.2, (variant, ratio)
    # SDPA on a CPU is counted through the script's own FLOP formula: the same math as eager
    eager, sdpa = rows(result, "seed_fp32_eager")[8], rows(result, "seed_bf16_sdpa")[8]
    assert sdpa["flops_per_step"] == pytest.approx(eager["flops_per_step"], rel=0.01)


def test_open_clip_row(result):
    if not HAS_OPEN_CLIP:
        pytest.skip("open_clip_torch is not installed: the script skips its rows")
    row = rows(result, "open_clip_bf16")[8]
    assert row["model"] == "open_clip" and row["precision"] == "bf16 autocast" and row["pairs_per_s"] > 0


def test_data_path(result):
    data = result["data_path"]
    assert data["images"] == 16 and data["e2e_variant"] in ("seed_fp32_eager", "seed_bf16_sdpa")
    assert data["model_step_pairs_per_s"] > 0
    paths = {r["path"]: r["images_per_s"] for r in data["decode"]}
    assert {"PIL + resize, DataLoader (project direct path)", "torchvision decode_jpeg + resize, DataLoader",
            "project uint8 cache (memmap rows)"} <= set(paths)
    assert all(math.isfinite(v) and v > 0 for v in paths.values())
    assert {r["path"] for r in data["end_to_end"]} <= set(paths)
    assert all(r["pairs_per_s"] > 0 and r["model_step_pairs_per_s"] > 0 for r in data["end_to_end"])


def test_unknown_variant_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown variants"):
        train_throughput.main(["--tiny", "--variants=nope", f"--out={tmp_path / 'x.json'}"])


def test_search_latency_ann_smoke():
    """benchmarks/search_latency.py --ann at a tiny size: recall per nprobe, a chosen nprobe."""
    pytest.importorskip("faiss", reason="--ann needs faiss-cpu")
    from benchmarks import search_latency
    result = search_latency.main(["--ann", "--rows=4000", "--queries=10", "--dim=32", "--nprobe=1,22",
                                  "--k_factor=4,16"])
    assert result["factory"].startswith("IVF21,PQ8x4fs") and result["build_s"] >= 0
    runs = result["nprobe"]
    assert {(r["nprobe"], r["k_factor"]) for r in runs.values()} == {(1, 4), (22, 4), (1, 16), (22, 16)}
    assert runs["22,k_factor=16"]["recall_at_10"] >= runs["1,k_factor=4"]["recall_at_10"]
    assert all(0 < r["p50_ms"] <= r["p95_ms"] and 0 <= r["recall_at_10"] <= 1 for r in runs.values())
    assert result["chosen"] is None or result["chosen"] in runs


def test_mixture_is_reproducible_and_normalised():
    from benchmarks.search_latency import Mixture
    mix = Mixture(16, topics=4, clusters=20, rank=3)
    a, b = mix.sample(50, seed=7), mix.sample(50, seed=7)
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=1), torch.ones(50), atol=1e-5)
