"""torch.compile applied to a built model from outside, one Multiway layer at a time, as torchtitan compiles
each transformer block: the model stays plain PyTorch, and compiling layer by layer keeps each graph small,
lets activation checkpointing wrap a compiled layer, and leaves parameter names (and so checkpoints) unchanged.

Every layer runs the same code, so all layers share one cache of compiled graphs (module parameters are graph
inputs, not constants). A new graph is made only for a new kind of call: which modalities (image, text, pair),
whether the text comes with a padding mask and in which layout (packed or padded), whether the layer drops
paths (the first never does) or has a vision-language expert, grad mode; and, once per kind, when a sequence
length first changes, the graph is remade with that length symbolic (automatic dynamic shapes), so later text
lengths reuse it. `RECOMPILE_LIMIT` bounds the count. Under ZeRO-3, DeepSpeed's parameter hooks on every
submodule break each layer into many small graphs (see the README); the count still does not grow with depth.
"""

import torch
import torch._dynamo

from beit3.pretrain.model import MultiwayTransformer

RECOMPILE_LIMIT = 64
"""Graphs kept for the layers' one shared code before the compiler gives up and runs new kinds of call eagerly.
Training uses about a dozen (tests/test_compilation.py counts them); the rest leave room for evaluation and the
released layout without ever compiling per step."""


def compile_layers(model: MultiwayTransformer, backend: str | object = "inductor") -> MultiwayTransformer:
    """Compile every Multiway layer in place (`nn.Module.compile`); returns the model for chaining."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in model.layers:
        layer.compile(backend=backend)
    return model
