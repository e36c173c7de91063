"""The Ray job that turns raw corpora into WebDataset shards with text ids and visual tokens."""
