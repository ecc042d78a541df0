"""What every floor of the library uses: the `--key=value` command line, files written whole,
optional packages, evaluation modes, torch.distributed helpers."""
