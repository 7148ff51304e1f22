"""Attention over a static-shape key/value cache: the cache mechanics every model family's blocks share.

A row's tokens sit in its buffer from column 0 with no padding between them,
so a token's column is also its position id. Keys and values are written by
scatter, in place under XLA; a write aimed at a column >= capacity is dropped
(XLA skips out-of-range scatter updates), which is how a row is left alone.
The families (tfgen.families) build their blocks on `attend`.
"""

import functools
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


def split_heads(x, n_head):
    """[rows, len, width] -> [rows, heads, len, head_dim]."""
    batch, length, width = dims(x)
    x = tf.reshape(x, [batch, length, n_head, width // n_head])
    return tf.transpose(x, [0, 2, 1, 3])


def merge_heads(x):
    """[rows, heads, len, head_dim] -> [rows, len, width]."""
    batch, n_head, length, head_dim = dims(x)
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [batch, length, n_head * head_dim])


def write(cache, values, columns, rows=None):
    """cache [slots, heads, capacity, d] with `values` [n, heads, len, d] scattered at `columns` [n, len] of the
    slots `rows` [n] (None: 0..n-1)."""
    n, heads, length, _ = dims(values)
    shape = [n, heads, length]
    row = tf.broadcast_to((tf.range(n) if rows is None else rows)[:, None, None], shape)
    head = tf.broadcast_to(tf.range(heads)[None, :, None], shape)
    column = tf.broadcast_to(columns[:, None, :], shape)
    return tf.tensor_scatter_nd_update(cache, tf.stack([row, head, column], axis=-1), tf.cast(values, cache.dtype))


def attend(q, k, v, cache_k, cache_v, columns, span=None):
    """Causal attention of queries at `columns` [rows, len] over the cache, after writing k and v there.

    q, k, v: [rows, heads, len, head_dim]. Returns (merged output [rows, len,
    width], cache_k, cache_v); each query sees its row's cache up to its own column.
    With `span` (a static int), only the cache's first span columns are read: a
    program over rows that all lie within them reads no more of a large cache.
    Queries of fewer rows than the cache are its first rows (a step over a
    state's first rows), and read and write those rows only.
    """
    cache_k = write(cache_k, k, columns)
    cache_v = write(cache_v, v, columns)
    seen_k, seen_v = (_seen(cache, q.shape[0], span) for cache in (cache_k, cache_v))
    causal = tf.range(dims(seen_k)[2])[None, None, :] <= columns[:, :, None]  # [rows, len, span]
    scores = tf.matmul(q, seen_k, transpose_b=True) / math.sqrt(q.shape[-1])
    weights = tf.nn.softmax(tf.where(causal[:, None], scores, MASKED), axis=-1)
    return merge_heads(tf.matmul(weights, seen_v)), cache_k, cache_v


def _seen(cache, rows, span):
    """What queries of the cache's first `rows` rows read: those rows, the first `span` columns (None: all)."""
    if rows is not None and rows != cache.shape[0]:
        cache = cache[:rows]
    return cache if span is None else cache[:, :, :span]


def attending(span):
    """`attend` over the cache's first `span` columns (None: all of them)."""
    return attend if span is None else functools.partial(attend, span=span)
