"""Convert a dataset folder into WebDataset shards: `python -m clip_foundation.shards` runs `clip_foundation.data.shards`'s command line."""
from clip_foundation.data.shards import main

if __name__ == "__main__":
    from clip_foundation.commands import run
    raise SystemExit(run("shards", main))
