"""A search page in the browser over a trained model's gallery.
The command line of `clip_foundation.app.command`, installed as `clip-app` too: `python app.py --help`."""
from clip_foundation.commands import run

if __name__ == "__main__":
    raise SystemExit(run("app"))  # clip_foundation.app.command.main, its warnings and exit status as clip-app's
