"""A search page in the browser over a trained model's gallery.
The command line of `clip_foundation.app`, installed as `clip-app` too: `python app.py --help`."""
from clip_foundation.app import main

if __name__ == "__main__":
    main()
