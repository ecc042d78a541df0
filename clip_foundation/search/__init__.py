"""Search: the exact and FAISS indexes, the index under a memory budget (memory-mapped), `Gallery`
and `find_matches`, the `search` command."""
