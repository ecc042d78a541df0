"""Search a gallery from the shell: images for a text, or captions for an image.
The command line of `clip_foundation.search`, installed as `clip-search` too: `python search.py --help`."""
from clip_foundation.search import main

if __name__ == "__main__":
    main()
