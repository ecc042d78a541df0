"""Evaluation: recall@K and the metrics every writer reads (formatter, model card, plots,
CLIP_benchmark JSON), querybank normalisation, zero-shot classification, the `evaluate` command."""
