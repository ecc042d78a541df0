"""Inference engines: the `Encoder` every embedding goes through (torch, ONNX Runtime, OpenVINO)
and the export of each tower's graph."""
