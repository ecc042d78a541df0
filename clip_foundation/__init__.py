"""The CLIP-Foundation library: data, training mechanics, retrieval, search and figures.

The model itself lives in `clipModel.py` beside this package; the scripts at the root
(`train.py`, `evaluate.py`, `search.py`, `download.py`) are thin command lines over both.
"""
