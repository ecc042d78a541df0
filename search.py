"""Search a gallery from the shell: images for a text, or captions for an image.
The command line of `clip_foundation.search.command`, installed as `clip-search` too: `python search.py --help`."""
from clip_foundation.commands import run

if __name__ == "__main__":
    raise SystemExit(run("search"))  # clip_foundation.search.command.main, its warnings and exit status as clip-search's
