"""int4 weights for the LiteRT export: a float LiteRT flatbuffer quantized by ai-edge-quantizer (`tfgen[litert]`).

The recipe is ai-edge-quantizer's dynamic int4 one, blockwise (32
weights share a scale), on FULLY_CONNECTED and EMBEDDING_LOOKUP ops only:
int4 weights, float activations that the kernel quantizes on the fly, which
XNNPACK runs with its blockwise int4 matrix-vector kernels (a KoGPT2-base
`decode` step 1.7x faster than int8's, so not a reference kernel). Blocks
of 32 were chosen over 64 and channelwise: on ko-mini's validation text
(2,048 tokens a source) perplexity rose 1.1-2.6% with 32, 1.6-3.0% with 64
and 1.4-3.9% channelwise, and at KoGPT2-base size (a shared machine) the
three decode steps took about the same time (7.6, 9.4 and 7.9 ms; int8 14).

GPT-2's token embedding is also its LM head. The quantizer gives the head
its int4 copy, and leaves the float table to the GATHER that looks tokens up
(an op it cannot quantize dynamically), but copies that table once per
signature that reads it; `share_identical_buffers` stores it once again.
"""

import hashlib

import numpy as np

RECIPE = "dynamic_wi4b32_afp32"  # blocks of 32 weights
_INSTALL = 'pip install "tfgen[litert]" (or pip install ai-edge-quantizer)'


def require_quantizer():
    """Raises an ImportError that names the install command where ai-edge-quantizer is missing."""
    try:
        import ai_edge_quantizer  # noqa: F401
    except ImportError as error:
        raise ImportError(f"--quantize int4 needs ai-edge-quantizer ({error}); {_INSTALL}") from None


def quantize_int4(float_model):
    """The LiteRT flatbuffer `float_model` (bytes) with blockwise int4 weights in its fully connected and embedding
    lookup ops (a bytearray)."""
    require_quantizer()
    from ai_edge_quantizer import qtyping, quantizer, recipe

    ops = (qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP)
    make = getattr(recipe, RECIPE)
    model_recipe = sum((make(operation_name=op) for op in ops), [])
    result = quantizer.Quantizer(float_model, model_recipe).quantize(
        enable_progress_bar=False, enable_progress_report=False
    )
    return share_identical_buffers(result.quantized_model)


def share_identical_buffers(model_bytes):
    """The flatbuffer `model_bytes` with tensors whose buffers hold the same bytes pointing at one of them, the
    copies emptied (a new bytearray)."""
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    model = tfl_flatbuffer_utils.read_model(model_bytes)
    first, canonical = {}, {}
    for index, buffer in enumerate(model.buffers):
        if buffer.data is not None and len(buffer.data):
            canonical[index] = first.setdefault(hashlib.sha256(memoryview(buffer.data)).digest(), index)
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.buffer = canonical.get(tensor.buffer, tensor.buffer)
    for index, kept in canonical.items():
        # numpy arrays: the flatbuffers packer writes them at once, other sequences a byte at a time
        model.buffers[index].data = np.frombuffer(model.buffers[index].data, np.uint8) if kept == index else None
    return flatbuffer_utils.convert_object_to_bytearray(model)
