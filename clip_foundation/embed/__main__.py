"""`python -m clip_foundation.embed`: embed a gallery in resumable parts (`clip_foundation.embed.writer`)."""
from clip_foundation.commands import run

if __name__ == "__main__":
    raise SystemExit(run("embed"))
