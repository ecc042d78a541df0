"""Inference engines: the `Encoder` every embedding goes through, one registered class per engine
(registry: torch, ONNX Runtime, OpenVINO), the export of each tower's graph (export, and its command
line: command), what is read of a run's graphs and tokenizer without torch (saved), the --checkpoint /
--device / --engine options every model-loading command shares (options), and the model a query loads,
each tower read when first used (lazy)."""
