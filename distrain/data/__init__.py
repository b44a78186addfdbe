"""Data sets as WebDataset shards: the index (torch-free), packing, loaders and the image transforms."""
