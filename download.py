"""Download Flickr8k / Flickr30k from Kaggle into the layout the loaders read.
The command line of `clip_foundation.download`, installed as `clip-download` too: `python download.py --help`."""
from clip_foundation.download import main

if __name__ == "__main__":
    main()
