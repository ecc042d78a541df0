"""Every extension point is one registry, and an entry added from outside the package (here, by the test)
goes through the real commands: rank metrics, dataset sources, inference engines, index kinds."""
import json

import torch

# ---- metrics


def test_a_registered_metric_reaches_metrics_json_the_table_and_the_card(tiny_run, tmp_path, monkeypatch, capsys):
    from clip_foundation.evaluate import command as evaluate
    from clip_foundation.evaluate import metrics
    from clip_foundation.evaluate.modelcard import write_model_card
    mrr = metrics.RankMetric("mrr", lambda rank: 100 * (1 / rank.float()).mean().item(), "MRR", title="mean reciprocal rank")
    monkeypatch.setitem(metrics.METRICS, "mrr", mrr)
    data, run_dir, _ = tiny_run
    out = tmp_path / "eval.json"
    result = evaluate.main(["--checkpoint", str(run_dir), "--data", str(data), "--split", "test", "--out", str(out),
                            "--engine=torch"])
    printed = capsys.readouterr().out
    # the figure is what it says: from the same ranks as recall@1, MRR >= R@1 and <= 100
    for direction in ("text_to_image", "image_to_text"):
        assert result[f"{direction}_R@1"] <= result[f"{direction}_mrr"] <= 100
    assert json.loads(out.read_text())["text_to_image_mrr"] == result["text_to_image_mrr"]
    assert "MRR" in printed.splitlines()[0] and f"{result['text_to_image_mrr']:.1f}" in printed
    card_run = tmp_path / "run"
    card_run.mkdir()
    for name in ("config.json", "log.jsonl"):
        (card_run / name).write_bytes((run_dir / name).read_bytes())
    (card_run / "metrics.json").write_text(json.dumps({**result, "split": "test"}))
    card = write_model_card(card_run).read_text()
    assert "mean reciprocal rank" in card and f"{result['image_to_text_mrr']:.1f}" in card


def test_rank_metrics_are_pure_functions_of_the_ranks():
    from clip_foundation.evaluate.metrics import retrieval_metrics
    features = torch.nn.functional.normalize(torch.eye(4), dim=1)
    m = retrieval_metrics(features, features, torch.arange(4))  # every query finds its own first
    assert m["text_to_image_mean_rank"] == m["image_to_text_median_rank"] == 1.0
