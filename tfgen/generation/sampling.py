"""Next-token selection: temperature, top-k and top-p filtering, and sampling.

Pure tensor functions with transformers' semantics, written to compile under
XLA with every setting a runtime tensor (a new value never retraces). Each
setting is one value for every row (a scalar) or one per row ([rows]): the
rows of a server's batch each decode with their own.
"""

import tensorflow as tf

from tfgen.generation.shapes import dims, per_row

# Top-k and top-p usually keep a few dozen tokens: the kept set is looked for
# among this many best logits, and only when it does not fit there is the
# whole vocabulary sorted.
NUM_CANDIDATES = 128

NEG_INF = float("-inf")

# On XLA's CPU backend, slicing top_k's output at a fixed index (a slice, or a
# gather with constant indices) turns the top-k into a full sort, about 100 ms
# at 8 x 51,200; so values are picked out of sorted rows by masked reductions.


def apply_temperature(logits, temperature):
    """logits divided by a temperature for every row (a scalar) or one per row ([rows], logits [rows, vocab])."""
    temperature = tf.cast(temperature, logits.dtype)
    return logits / (temperature[:, None] if temperature.shape.rank == 1 else temperature)


def _column(setting, logits, dtype):
    """A setting as a [rows, 1] column against logits [rows, vocab]."""
    return per_row(setting, dims(logits)[0], dtype)[:, None]


def _clamp_top_k(top_k, logits):
    top_k, vocab = _column(top_k, logits, tf.int32), logits.shape[-1]
    return tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)


def _min_of_first(sorted_desc, count):
    """The count-th largest value of each descending row ([rows, 1]): the smallest of the first `count` [rows, 1]."""
    first = tf.range(sorted_desc.shape[-1])[None, :] < count
    return tf.reduce_min(tf.where(first, sorted_desc, float("inf")), axis=-1, keepdims=True)


def _threshold_in(sorted_desc, logits, top_k, top_p):
    """Smallest logit that top-k then top-p keep, per row, as [batch, 1].

    `sorted_desc` holds each row's best logits in descending order: the whole
    row, or a prefix of it (then the answer is right only if the kept set lies
    inside the prefix). `top_k` [rows, 1] is clamped to [1, vocab]; `top_p` [rows, 1] >= 1 means off.
    """
    vocab = logits.shape[-1]
    kth = tf.where(top_k < vocab, _min_of_first(sorted_desc, top_k), NEG_INF)
    # transformers' top-p: drop a token when the tokens ranked above it already reach top_p.
    log_norm = tf.reduce_logsumexp(tf.where(logits >= kth, logits, NEG_INF), axis=-1, keepdims=True)
    probs = tf.exp(tf.where(sorted_desc >= kth, sorted_desc, NEG_INF) - log_norm)
    mass_above = tf.math.cumsum(probs, axis=-1, exclusive=True)
    kept = tf.reduce_sum(tf.cast(mass_above < tf.cast(top_p, probs.dtype), tf.int32), axis=-1, keepdims=True)
    nucleus_edge = _min_of_first(sorted_desc, tf.maximum(kept, 1))
    return tf.where(top_p < 1.0, tf.maximum(nucleus_edge, kth), kth)


def _candidates(logits, top_k, top_p):
    """The best logits and their ids, the kept set's threshold, and whether each row's kept set lies among them."""
    vocab = logits.shape[-1]
    width = min(NUM_CANDIDATES, vocab)
    best, best_ids = tf.math.top_k(logits, width)
    threshold = _threshold_in(best, logits, top_k, top_p)
    # Exact only if no logit outside the prefix reaches the threshold, and the
    # top-k normaliser was computable (top-k cut inside the prefix, or off).
    outside_below = tf.reduce_min(best, axis=-1, keepdims=True) < threshold if width < vocab else True
    fits = tf.logical_and(tf.logical_or(top_k <= width, top_k >= vocab), outside_below)
    return best, best_ids, threshold, fits


def filter_top_k_top_p(logits, top_k, top_p):
    """Sets logits outside the top-k, then outside the top-p nucleus, to -inf.

    top_k <= 0 and top_p >= 1 switch each filter off; at least one token is always kept.
    """
    return _filtered(logits, _clamp_top_k(top_k, logits), _column(top_p, logits, tf.float32))


def _filtered(logits, top_k, top_p):
    """`filter_top_k_top_p` with top_k clamped and both settings as [rows, 1] columns."""
    vocab = logits.shape[-1]
    _, _, threshold, fits = _candidates(logits, top_k, top_p)
    both_off = tf.logical_and(top_k >= vocab, top_p >= 1.0)  # threshold is -inf: nothing to sort for
    threshold = tf.cond(
        tf.reduce_all(tf.logical_or(fits, both_off)),
        lambda: threshold,
        lambda: _threshold_in(tf.sort(logits, axis=-1, direction="DESCENDING"), logits, top_k, top_p),
    )
    return tf.where(logits >= threshold, logits, NEG_INF)


def uniform_draws(seed, rows):
    """[rows, 1] numbers in [0, 1) from TF's stateless RNG; `seed` is a shape-[2] int tensor (the same seed, the same draws)."""
    return tf.random.stateless_uniform([rows, 1], seed=seed)


def row_draws(seeds, steps, draw_index):
    """[rows, 1] numbers in [0, 1): row r's is draw `draw_index[r]` of `uniform_draws([seeds[r], steps[r]], rows)`.

    So a row's number depends on its own seed, step and draw index alone, not
    on the other rows. `generate`'s rows share seed and step and each takes
    the draw at its own index (step i's draws are those of seed [seed, i]).
    """
    rows = dims(seeds)[0]

    def draw(args):
        seed, step, index = args
        return tf.gather(uniform_draws(tf.stack([seed, tf.cast(step, tf.int64)]), rows), index)

    return tf.map_fn(draw, (seeds, steps, draw_index), fn_output_signature=tf.float32)


def sample(logits, seed):
    """One index per row drawn from softmax(logits), with `uniform_draws(seed, ...)`: the same seed gives the same draw."""
    return sample_at(logits, uniform_draws(seed, tf.shape(logits)[0]))


def sample_at(logits, uniform):
    """One index per row drawn from softmax(logits) by inverting the cumulative distribution at `uniform` [rows, 1] in [0, 1)."""
    cdf = tf.math.cumsum(tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1), axis=-1)
    total = tf.reduce_max(cdf, axis=-1, keepdims=True)
    # 1 - U lies in (0, 1]: a zero-probability index is never chosen.
    target = (1.0 - uniform) * total
    index = tf.reduce_sum(tf.cast(cdf < target, tf.int32), axis=-1)
    return tf.minimum(index, cdf.shape[-1] - 1)


def chosen_logprob(logits, index):
    """log softmax(logits) at one index per row."""
    return tf.gather(logits, index, axis=-1, batch_dims=1) - tf.reduce_logsumexp(logits, axis=-1)


def sample_top_k_top_p_at(logits, top_k, top_p, uniform):
    """One token per row from softmax(logits) after top-k and top-p filtering, with its log-probability.

    Draws at `uniform` [rows, 1] in [0, 1) (as `sample_at` takes them) among
    the best NUM_CANDIDATES logits for each row whose kept set lies there,
    from the whole filtered vocabulary for the others (sorted only when a row
    needs it): a row's token does not depend on the rows beside it.
    """
    top_k, top_p = _clamp_top_k(top_k, logits), _column(top_p, logits, tf.float32)
    best, best_ids, threshold, fits = _candidates(logits, top_k, top_p)

    def among_best():
        kept = tf.where(best >= threshold, best, NEG_INF)
        choice = sample_at(kept, uniform)
        return tf.gather(best_ids, choice, axis=-1, batch_dims=1), chosen_logprob(kept, choice)

    def each_row_its_own():  # rows whose kept set fits among the best draw there, the others from the whole vocabulary
        kept = _filtered(logits, top_k, top_p)
        token = sample_at(kept, uniform)
        best_token, best_logprob = among_best()
        return (
            tf.where(fits[:, 0], best_token, token),
            tf.where(fits[:, 0], best_logprob, chosen_logprob(kept, token)),
        )

    return tf.cond(tf.reduce_all(fits), among_best, each_row_its_own)
