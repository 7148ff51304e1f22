"""GPT-2's forward pass over a static-shape key/value cache.

The cache holds keys and values for every position of a sequence buffer of
fixed capacity, allocated once per generate call; each call writes the new
positions in place with a dynamic-update-slice, so shapes never change inside
the decode loop. It runs on the layers (and so the weights) of a
transformers `TFGPT2LMHeadModel`.
"""

import math

import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from tfgen.generation.shapes import dims

MASKED = -1e9


def empty_cache(config, batch_size, capacity, dtype):
    """Keys and values per layer, each [batch, heads, capacity, head_dim], zeroed."""
    head_dim = config.n_embd // config.n_head
    shape = [batch_size, config.n_head, capacity, head_dim]
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


def _attend(attn, x, cache_k, cache_v, start, key_mask, n_head):
    """Self-attention of `x` (positions start..start+len in the buffer) over the cache, written in place."""
    q, k, v = tf.split(attn.c_attn(x), 3, axis=-1)
    q = _split_heads(q, n_head)
    zero = tf.zeros([], tf.int32)
    cache_k = xla.dynamic_update_slice(cache_k, _split_heads(k, n_head), [zero, zero, start, zero])
    cache_v = xla.dynamic_update_slice(cache_v, _split_heads(v, n_head), [zero, zero, start, zero])

    length, capacity = tf.shape(x)[1], dims(cache_k)[2]
    query_slot = start + tf.range(length)
    causal = tf.range(capacity)[None, :] <= query_slot[:, None]  # [length, capacity]
    allowed = tf.logical_and(causal[None, None], key_mask[:, None, None, :])
    scores = tf.matmul(q, cache_k, transpose_b=True) / math.sqrt(q.shape[-1])
    weights = tf.nn.softmax(tf.where(allowed, scores, MASKED), axis=-1)
    out = attn.c_proj(_merge_heads(tf.matmul(weights, cache_v)))
    return out, cache_k, cache_v


def forward(gpt2, token_ids, positions, cache, start, key_mask):
    """Next-token logits [batch, vocab] after `token_ids` [batch, len], placed at buffer slots start..start+len.

    `positions` [batch, len] are the position-embedding ids, `key_mask`
    [batch, capacity] marks buffer slots that hold real tokens (slots not yet
    written are hidden by causality). Returns (float32 logits, updated cache).
    Under a mixed-precision policy the blocks compute in the policy's dtype.
    """
    main = gpt2.transformer
    start = tf.convert_to_tensor(start, tf.int32)
    n_head = gpt2.config.n_head
    h = tf.gather(main.wte.embeddings, token_ids) + tf.gather(main.wpe.embeddings, positions)
    h = tf.cast(h, main.compute_dtype)
    new_cache = []
    for block, (cache_k, cache_v) in zip(main.h, cache):
        a, cache_k, cache_v = _attend(block.attn, block.ln_1(h), cache_k, cache_v, start, key_mask, n_head)
        h = h + a
        h = h + block.mlp(block.ln_2(h), training=False)
        new_cache.append((cache_k, cache_v))
    h = main.ln_f(h[:, -1:])[:, 0]  # the layer was built for [batch, len, width]
    logits = tf.matmul(h, tf.cast(main.wte.embeddings, h.dtype), transpose_b=True)
    return tf.cast(logits, tf.float32), new_cache


def prefill(gpt2, input_ids, attention_mask, new_capacity):
    """Runs the prompts once: (next-token logits, cache, key mask, prompt lengths)."""
    batch, prompt_width = dims(input_ids)
    key_mask = tf.concat([attention_mask > 0, tf.ones([batch, new_capacity], tf.bool)], axis=1)
    cache = empty_cache(gpt2.config, batch, prompt_width + new_capacity, gpt2.transformer.compute_dtype)
    positions = positions_from_mask(attention_mask)
    logits, cache = forward(gpt2, input_ids, positions, cache, 0, key_mask)
    return logits, cache, key_mask, tf.reduce_sum(attention_mask, axis=1)


def step_forward(gpt2, sequence, cache, key_mask, prompt_lengths, prompt_width, step):
    """Logits after the token generated at `step - 1`, fed at its buffer slot."""
    last = tf.gather(sequence, prompt_width + step - 1, axis=1)[:, None]
    positions = (prompt_lengths + step - 1)[:, None]
    return forward(gpt2, last, positions, cache, prompt_width + step - 1, key_mask)
