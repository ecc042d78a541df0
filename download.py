"""Download Flickr8k / Flickr30k from Kaggle into the layout the loaders read.
The command line of `clip_foundation.data.download`, installed as `clip-download` too: `python download.py --help`."""
from clip_foundation.commands import run

if __name__ == "__main__":
    raise SystemExit(run("download"))  # clip_foundation.data.download.main, its warnings and exit status as clip-download's
