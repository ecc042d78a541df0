"""Datasets: `Record`s, the dataset sources (one per layout, detected and read), splits by image,
the decoded-image cache, WebDataset shards (streamed and converted), the synthetic set, downloads."""
