"""Export each tower's ONNX / OpenVINO graph: `python -m clip_foundation.export` runs `clip_foundation.engines.command`'s command line."""
from clip_foundation.engines.command import main

if __name__ == "__main__":
    from clip_foundation.commands import run
    raise SystemExit(run("export", main))
