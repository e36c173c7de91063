"""Pretraining: the Multiway Transformer, its config, the released checkpoint layout and model arithmetic."""
