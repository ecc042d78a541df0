"""Embedding a gallery of millions in resumable parts across ranks (`python -m clip_foundation.embed`),
and the embedding folder it writes (clip-retrieval's layout) and the index reads."""
