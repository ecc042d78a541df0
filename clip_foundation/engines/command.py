"""The export command: `python -m clip_foundation.export runs/NAME [--format=onnx|openvino]` writes
every graph of a run (`export.export_run`) and prints where they are."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from clip_foundation.common import cli
from clip_foundation.engines.export import export_run
from clip_foundation.engines.options import CheckpointOption
from clip_foundation.engines.registry import export_formats
from clipModel import ConfigError, check


@dataclass
class ExportConfig(CheckpointOption):  # --checkpoint: the run (the first bare argument)
    format: str = "onnx"  # onnx (ONNX Runtime, and OpenVINO reads it too) | openvino (IR: .xml + .bin)

    def validate(self) -> None:
        """Raise ConfigError (one line: the option, its value, the allowed range) for a value out of range."""
        check(self.format in export_formats(), "format", self.format, " | ".join(export_formats()))


USAGE = "usage: python -m clip_foundation.export runs/NAME [--format=onnx|openvino]"


def main(argv=None) -> list[Path]:
    """Export every graph of a run and print where they are."""
    args = cli.parse(ExportConfig(), argv, USAGE, positional=("checkpoint",))
    if not args.checkpoint:
        cli.usage_error("a run folder is required", USAGE)
    try:
        args.validate()
    except ConfigError as e:
        cli.usage_error(str(e), USAGE)
    try:
        paths = export_run(args.checkpoint, args.format)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        sys.exit(f"error: {args.checkpoint}: cannot export ({' '.join(str(e).split())[:400]})")
    except KeyboardInterrupt:  # Ctrl-C: every graph is written whole or not at all, nothing to report
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if not paths[0].is_relative_to(args.checkpoint):
        print(f"{args.checkpoint} cannot be written: the graphs are in the user cache, {paths[0].parent}", file=sys.stderr)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    with cli.reported_warnings():
        main()
