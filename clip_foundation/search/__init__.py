"""Search: the exact and FAISS indexes, the index under a memory budget (memory-mapped), the index
kinds a prebuilt folder may be (`kinds.open_index`, the `Index` protocol), `Gallery` and
`find_matches`, the `search` command, and a plain text query answered without torch (`quick`) from
what the command keeps beside a run (`cached`: the index's files, the split's records memo)."""
