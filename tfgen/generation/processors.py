"""Logits processors with transformers' semantics, as pure tensor functions.

Each takes scores [batch, vocab] and the token history and returns new
scores. The history is the decode state's fixed-width buffer `sequence`
[batch, width]: columns 0..`length` of each row (`length` [batch], or a
scalar for every row) hold its prompt's tokens, then the new ones; the
columns after are not read.
Every setting is a runtime tensor (the bad-word list's shape aside), one value for every row (a scalar) or
one per row ([batch]: the rows of a server's batch each have their own), and each processor is a no-op at its
neutral value (penalty 1, n-gram size 0, no bad words, minimum 0, OpenAI's penalties and logit bias 0), so the decode program
applies them all unconditionally.
"""

import tensorflow as tf

from tfgen.generation.options import MAX_NGRAM_SIZE
from tfgen.generation.shapes import dims, per_row

NEG_INF = float("-inf")


def _row_lengths(sequence, length):
    return per_row(length, dims(sequence)[0], tf.int32)


def _history_mask(sequence, length):
    return tf.range(dims(sequence)[1])[None, :] < _row_lengths(sequence, length)[:, None]


def _counts(vocab, tokens, hit):
    """A [batch, vocab] int32: how often each token stands in `tokens` [batch, width] where `hit` holds."""
    batch, width = dims(tokens)
    rows = tf.broadcast_to(tf.range(batch)[:, None], [batch, width])
    indices = tf.stack([tf.reshape(rows, [-1]), tf.reshape(tokens, [-1])], axis=1)
    hit = tf.broadcast_to(hit, tf.shape(tokens))
    # scatter_nd sums duplicates, and is a LiteRT builtin (the decode step of tfgen.export.litert).
    return tf.scatter_nd(indices, tf.reshape(tf.cast(hit, tf.int32), [-1]), [batch, vocab])


def _mark(vocab, tokens, hit):
    """A [batch, vocab] bool: True for each token that stands in `tokens` [batch, width] where `hit` holds."""
    return _counts(vocab, tokens, hit) > 0


def logit_bias(scores, bias):
    """OpenAI's `logit_bias`: `bias` added to the scores, [batch, vocab] (a row per row) or a scalar (0: off)."""
    return scores + tf.cast(bias, scores.dtype)


def presence_frequency_penalty(scores, sequence, length, generated, presence_penalty, frequency_penalty):
    """OpenAI's additive penalties: subtracts frequency_penalty * count + presence_penalty * (count > 0) from each
    token's score, `count` being how often the token stands among the row's `generated` newest tokens."""
    batch, width = dims(sequence)
    length = _row_lengths(sequence, length)
    first_new = length - per_row(generated, batch, tf.int32)
    columns = tf.range(width)[None, :]
    is_new = tf.logical_and(columns >= first_new[:, None], columns < length[:, None])
    counts = tf.cast(_counts(scores.shape[-1], sequence, is_new), scores.dtype)
    presence = per_row(presence_penalty, batch, scores.dtype)[:, None]
    frequency = per_row(frequency_penalty, batch, scores.dtype)[:, None]
    return scores - frequency * counts - presence * tf.cast(counts > 0, scores.dtype)


def repetition_penalty(scores, sequence, length, penalty):
    """Divides positive scores of tokens already in the history by `penalty`, multiplies negative ones."""
    seen = _mark(scores.shape[-1], sequence, _history_mask(sequence, length))
    penalty = per_row(penalty, dims(scores)[0], scores.dtype)[:, None]
    penalized = tf.where(scores < 0, scores * penalty, scores / penalty)
    return tf.where(seen, penalized, scores)


def no_repeat_ngram(scores, sequence, length, ngram_size):
    """Bans every token that would repeat an n-gram of the history (n = ngram_size; 0 is off)."""
    batch, width = dims(sequence)
    length = _row_lengths(sequence, length)
    start = tf.range(width)  # the n-gram starting at each column
    ngram_size = per_row(ngram_size, batch, tf.int32)
    size = ngram_size[:, None]
    # An n-gram whose first n-1 tokens equal the history's last n-1 bans its n-th token.
    matches = start[None, :] + size <= length[:, None]
    for k in range(MAX_NGRAM_SIZE - 1):
        in_prefix = k < size - 1
        earlier = tf.gather(sequence, tf.minimum(start + k, width - 1), axis=1)
        latest = tf.gather(sequence, tf.clip_by_value(length - ngram_size + 1 + k, 0, width - 1), batch_dims=1)
        matches = tf.logical_and(matches, tf.logical_or(tf.logical_not(in_prefix), earlier == latest[:, None]))
    matches = tf.logical_and(matches, size > 0)
    # Clipped at 0 too (n = 0 would index -1): XLA clamps gather indices, LiteRT's gather rejects them.
    completions = tf.gather(sequence, tf.clip_by_value(start[None, :] + size - 1, 0, width - 1), batch_dims=1)
    return tf.where(_mark(scores.shape[-1], completions, matches), NEG_INF, scores)


def bad_words(scores, sequence, length, words, word_lengths):
    """Bans the last token of each bad word whose other tokens end the history.

    `words` [n_words, longest] holds the bad words left-aligned; `word_lengths` their lengths.
    """
    width, longest = dims(sequence)[1], words.shape[1]
    length = _row_lengths(sequence, length)
    prefix_lengths = word_lengths - 1
    offset = tf.range(longest - 1)
    columns = (
        length[:, None, None] - prefix_lengths[None, :, None] + offset[None, None, :]
    )  # [batch, n_words, longest - 1]
    history = tf.gather(sequence, tf.clip_by_value(columns, 0, width - 1), batch_dims=1)
    in_prefix = offset[None, :] < prefix_lengths[:, None]
    same = tf.logical_or(tf.logical_not(in_prefix)[None], history == words[None, :, : longest - 1])
    matches = tf.logical_and(tf.reduce_all(same, axis=-1), length[:, None] - prefix_lengths[None, :] >= 0)
    last_tokens = tf.gather(words, prefix_lengths, axis=1, batch_dims=1)
    return tf.where(_mark(scores.shape[-1], tf.broadcast_to(last_tokens, tf.shape(matches)), matches), NEG_INF, scores)


def ban_tokens_before(scores, token_ids, generated, min_steps):
    """Bans `token_ids` (the EOS ids) while fewer than `min_steps` tokens have been generated.

    `generated` (the count of new tokens so far) and `min_steps`: [batch], or a scalar for every row.
    """
    vocab = scores.shape[-1]
    is_banned_id = tf.reduce_any(tf.range(vocab)[None, :] == token_ids[:, None], axis=0)
    early = tf.broadcast_to(generated < min_steps, dims(scores)[:1])
    return tf.where(tf.logical_and(is_banned_id[None, :], early[:, None]), NEG_INF, scores)


def process(scores, sequence, length, generated, settings):
    """All processors, in transformers' order; each is a no-op at its neutral setting.

    `length` [batch]: each row's history (prompt and new tokens); `generated` [batch]: its new tokens.
    OpenAI's logit bias and additive penalties come first, on the model's own logits.
    """
    scores = logit_bias(scores, settings["logit_bias"])
    scores = presence_frequency_penalty(
        scores, sequence, length, generated, settings["presence_penalty"], settings["frequency_penalty"]
    )
    scores = repetition_penalty(scores, sequence, length, settings["repetition_penalty"])
    scores = no_repeat_ngram(scores, sequence, length, settings["no_repeat_ngram_size"])
    scores = bad_words(scores, sequence, length, settings["bad_words"], settings["bad_word_lengths"])
    return ban_tokens_before(scores, settings["eos_ids"], generated, settings["min_new_steps"])
