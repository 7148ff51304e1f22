"""How a LiteRT export cuts a model into parts, and where each part's weights come from.

A part is a run of transformer blocks (layers `start` to `stop`); the first
part also holds the token embeddings and the last the head. Each part is
converted on its own, so the converter's memory grows with the largest part,
not with the model: TensorFlow's converter holds several copies of the weights
it converts (KoGPT2-base's 0.5 GB of float32 weights peaked at 3.4 GB as one
graph). A model in memory (a `CausalLM`) lends its layers to every part; a
checkpoint directory is read part by part, so the whole model is never held.
"""

import re
from dataclasses import dataclass

from tfgen import checkpoint

PART_BYTES = 256 * 2**20  # the float32 weights of one part, by default


@dataclass(frozen=True)
class Part:
    """Blocks start..stop-1 of the model, with the embeddings if `first` and the head if `last`."""

    start: int
    stop: int
    first: bool
    last: bool


def block_bytes(config):
    """Float32 bytes of one transformer block (GPT-2 and GPT-J alike: 12 d² weights, and small vectors)."""
    return 4 * (12 * config.n_embd**2 + 13 * config.n_embd)


def embedding_bytes(config):
    return 4 * config.vocab_size * config.n_embd


def plan(config, part_bytes=PART_BYTES):
    """The parts of a model of `config`: consecutive blocks, each part's float32 weights (the embeddings in the
    first, the head in the last) within `part_bytes` where a block allows it; at least one part."""
    if part_bytes is None:
        return [Part(0, config.n_layer, True, True)]
    cuts, size = [0], embedding_bytes(config)
    for layer in range(config.n_layer):
        if size + block_bytes(config) > part_bytes and (layer > cuts[-1] or size > 0):
            cuts.append(layer)
            size = 0
        size += block_bytes(config)
    if size + embedding_bytes(config) > part_bytes and config.n_layer > cuts[-1]:
        cuts.append(config.n_layer)  # the head on its own
    ends = cuts[1:] + [config.n_layer]
    return [
        Part(start, stop, index == 0, index == len(cuts) - 1) for index, (start, stop) in enumerate(zip(cuts, ends))
    ]


def part_weights(net, part, blocks):
    """The variables a part reads: its blocks', and the embeddings' and head's where it has them (no repeats)."""
    variables = [weight for block in blocks for weight in block.weights]
    variables += net.embedding_weights() if part.first else []
    variables += net.head_weights() if part.last else []
    return list({id(variable): variable for variable in variables}.values())


def layers_in_memory(lm, part):
    """(family, blocks, variables) of a part of a loaded `CausalLM`: its own layers (LoRA adapters included)."""
    return lm.net, list(lm.net.model.transformer.h[part.start : part.stop]), lm.net.weights


def load_part(family, config, weights_path, part):
    """(family, blocks, variables) of a part read from a checkpoint: a float32 model of the part's blocks only (the
    embeddings and the head only where the part has them: the others are never built), its weights read from
    `weights_path`."""
    fields = {**config.to_dict(), "n_layer": part.stop - part.start}
    needed = (family.embedding_layers if part.first else ()) + (family.head_layers if part.last else ())
    unbuilt = set(family.embedding_layers + family.head_layers) - set(needed)
    net = family(family.build(family.config_class(**fields), unbuilt, zeros=True))
    blocks = list(net.model.transformer.h)
    variables = part_weights(net, part, blocks)
    checkpoint.read_weights(variables, weights_path, rename=lambda name: shift_block(name, part.start))
    return net, blocks, variables


def shift_block(name, offset):
    """A weight's name with its block number moved by `offset`, in PyTorch's ('h.0.') or TF's ('h_._0/') names."""
    return re.sub(r"(h\.|h_\._)(\d+)", lambda match: f"{match[1]}{int(match[2]) + offset}", name)
