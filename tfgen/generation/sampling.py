"""Next-token selection: temperature, top-k and top-p filtering, and sampling.

Pure tensor functions with transformers' semantics, written to compile under
XLA with every setting a runtime tensor (a new value never retraces).
"""

import tensorflow as tf

# Top-k and top-p usually keep a few dozen tokens: their threshold is found
# among this many best logits, and only when the kept set does not fit there
# is the whole vocabulary sorted.
NUM_CANDIDATES = 64

NEG_INF = float("-inf")


def apply_temperature(logits, temperature):
    return logits / tf.cast(temperature, logits.dtype)


def _keep_threshold(sorted_desc, logits, top_k, top_p):
    """Smallest logit that top-k then top-p keep, per row.

    `sorted_desc` holds each row's best logits in descending order: the whole
    row, or a prefix of it when the kept set lies inside that prefix.
    `top_k` is already clamped to [1, vocab]; `top_p` >= 1 means off.
    """
    vocab = logits.shape[-1]
    width = sorted_desc.shape[-1]
    kth = tf.gather(sorted_desc, tf.minimum(top_k, width) - 1, axis=-1)
    kth = tf.where(top_k < vocab, kth, NEG_INF)[:, None]
    # transformers' top-p: drop a token when the tokens ranked above it already reach top_p.
    log_norm = tf.reduce_logsumexp(tf.where(logits >= kth, logits, NEG_INF), axis=-1, keepdims=True)
    probs = tf.exp(tf.where(sorted_desc >= kth, sorted_desc, NEG_INF) - log_norm)
    mass_above = tf.math.cumsum(probs, axis=-1, exclusive=True)
    kept = tf.reduce_sum(tf.cast(mass_above < top_p, tf.int32), axis=-1)
    nucleus_edge = tf.gather(sorted_desc, tf.maximum(kept, 1) - 1, axis=-1, batch_dims=1)[:, None]
    return tf.where(top_p < 1.0, tf.maximum(nucleus_edge, kth), kth)


def filter_top_k_top_p(logits, top_k, top_p):
    """Sets logits outside the top-k, then outside the top-p nucleus, to -inf.

    top_k <= 0 and top_p >= 1 switch each filter off; at least one token is always kept.
    """
    vocab = logits.shape[-1]
    top_k = tf.cast(top_k, tf.int32)
    top_k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    top_p = tf.cast(top_p, logits.dtype)
    width = min(NUM_CANDIDATES, vocab)
    best = tf.math.top_k(logits, width).values

    # The prefix suffices when top-k's cut lies in it (or top-k is off) and the
    # prefix already holds top_p of the (top-k filtered) probability mass.
    kth = tf.where(top_k <= width, best[:, tf.minimum(top_k, width) - 1], NEG_INF)[:, None]
    in_top_k = tf.where(logits >= kth, logits, NEG_INF)
    prefix_mass = tf.reduce_sum(
        tf.exp(tf.where(best >= kth, best, NEG_INF) - tf.reduce_logsumexp(in_top_k, axis=-1, keepdims=True)),
        axis=-1,
    )
    nucleus_fits = tf.logical_or(top_p >= 1.0, tf.reduce_all(prefix_mass >= top_p))
    fits = tf.logical_and(tf.logical_or(top_k <= width, top_k >= vocab), nucleus_fits)
    threshold = tf.cond(
        fits,
        lambda: _keep_threshold(best, logits, top_k, top_p),
        lambda: _keep_threshold(tf.sort(logits, axis=-1, direction="DESCENDING"), logits, top_k, top_p),
    )
    return tf.where(logits >= threshold, logits, NEG_INF)


def sample(logits, seed):
    """One token per row drawn from softmax(logits), by the Gumbel-max trick.

    `seed` is a shape-[2] int tensor for TF's stateless RNG: the same seed gives the same draw.
    """
    uniform = tf.random.stateless_uniform(tf.shape(logits), seed=seed, minval=1e-20, maxval=1.0, dtype=tf.float32)
    gumbel = -tf.math.log(-tf.math.log(uniform))
    return tf.argmax(tf.cast(logits, tf.float32) + gumbel, axis=-1, output_type=tf.int32)
