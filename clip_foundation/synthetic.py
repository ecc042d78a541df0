"""Write the synthetic shapes-and-captions set: `python -m clip_foundation.synthetic` runs `clip_foundation.data.synthetic`'s command line."""
from clip_foundation.data.synthetic import main

if __name__ == "__main__":
    from clip_foundation.commands import run
    raise SystemExit(run("synthetic", main))
