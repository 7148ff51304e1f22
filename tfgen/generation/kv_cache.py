"""GPT-2's forward pass over a static-shape key/value cache: the model-specific part of decoding.

Its interface to the rest of tfgen.generation is three functions: `empty_cache`
(keys and values per layer at a fixed capacity), `blocks` (embeddings and
transformer blocks for tokens at given buffer columns of each row, writing
their keys and values into the cache) and `head` (next-token logits from a
hidden state). A row's tokens sit in its buffer from column 0 with no padding
between them, so a token's column is also its position id. Writes go by
scatter, in place under XLA; a write aimed at a column >= capacity is dropped
(XLA skips out-of-range scatter updates), which is how a row is left alone.
It runs on the layers (and so the weights) of a transformers `TFGPT2LMHeadModel`.
"""

import math

import tensorflow as tf

from tfgen.generation.shapes import dims

MASKED = -1e9


def empty_cache(config, rows, capacity, dtype):
    """Keys and values per layer, each [rows, heads, capacity, head_dim], zeroed."""
    head_dim = config.n_embd // config.n_head
    shape = [rows, config.n_head, capacity, head_dim]
    return [(tf.zeros(shape, dtype), tf.zeros(shape, dtype)) for _ in range(config.n_layer)]


def positions_from_mask(attention_mask):
    """Position ids for a left-padded batch: count of real tokens before each one (pads get 0)."""
    return tf.maximum(tf.cumsum(attention_mask, axis=-1) - 1, 0)


def _split_heads(x, n_head):
    batch, length, width = dims(x)
    x = tf.reshape(x, [batch, length, n_head, width // n_head])
    return tf.transpose(x, [0, 2, 1, 3])


def _merge_heads(x):
    batch, n_head, length, head_dim = dims(x)
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [batch, length, n_head * head_dim])


def _write(cache, values, columns):
    """cache [rows, heads, capacity, d] with `values` [rows, heads, len, d] scattered at `columns` [rows, len]."""
    rows, heads, length, _ = dims(values)
    shape = [rows, heads, length]
    row = tf.broadcast_to(tf.range(rows)[:, None, None], shape)
    head = tf.broadcast_to(tf.range(heads)[None, :, None], shape)
    column = tf.broadcast_to(columns[:, None, :], shape)
    return tf.tensor_scatter_nd_update(cache, tf.stack([row, head, column], axis=-1), tf.cast(values, cache.dtype))


def _attend(attn, x, cache_k, cache_v, columns, n_head):
    """Self-attention of `x` (at `columns` of each row) over the cache, written in place."""
    q, k, v = tf.split(attn.c_attn(x), 3, axis=-1)
    q = _split_heads(q, n_head)
    cache_k = _write(cache_k, _split_heads(k, n_head), columns)
    cache_v = _write(cache_v, _split_heads(v, n_head), columns)
    capacity = dims(cache_k)[2]
    causal = tf.range(capacity)[None, None, :] <= columns[:, :, None]  # [rows, len, capacity]
    scores = tf.matmul(q, cache_k, transpose_b=True) / math.sqrt(q.shape[-1])
    weights = tf.nn.softmax(tf.where(causal[:, None], scores, MASKED), axis=-1)
    out = attn.c_proj(_merge_heads(tf.matmul(weights, cache_v)))
    return out, cache_k, cache_v


def blocks(gpt2, token_ids, columns, cache):
    """Hidden states [rows, len, width] of `token_ids` [rows, len] placed at `columns` [rows, len] of each row.

    Each token attends to its row's cache up to its own column. Returns (hidden
    states, updated cache). Under a mixed-precision policy the blocks compute
    in the policy's dtype.
    """
    main = gpt2.transformer
    n_head = gpt2.config.n_head
    positions = tf.minimum(columns, gpt2.config.n_positions - 1)  # columns past the context are never read
    h = tf.gather(main.wte.embeddings, token_ids) + tf.gather(main.wpe.embeddings, positions)
    h = tf.cast(h, main.compute_dtype)
    new_cache = []
    for block, (cache_k, cache_v) in zip(main.h, cache):
        a, cache_k, cache_v = _attend(block.attn, block.ln_1(h), cache_k, cache_v, columns, n_head)
        h = h + a
        h = h + block.mlp(block.ln_2(h), training=False)
        new_cache.append((cache_k, cache_v))
    return h, new_cache


def head(gpt2, hidden):
    """Float32 next-token logits [rows, vocab] from hidden states [rows, width]."""
    main = gpt2.transformer
    h = main.ln_f(hidden[:, None])[:, 0]  # the layer was built for [batch, len, width]
    logits = tf.matmul(h, tf.cast(main.wte.embeddings, h.dtype), transpose_b=True)
    return tf.cast(logits, tf.float32)
