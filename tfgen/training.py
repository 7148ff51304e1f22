"""Fine-tuning with Keras fit: the masked language-model loss and batches of documents."""

import numpy as np
import tensorflow as tf


def masked_lm_loss(labels, logits, weights):
    """Cross-entropy averaged over the target tokens whose weight is 1, never over padding."""
    losses = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    weights = tf.cast(weights, losses.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(losses * weights), tf.reduce_sum(weights))


class MaskedLMLoss(tf.keras.losses.Loss):
    """masked_lm_loss as a Keras loss: fit's sample weights mark the real target tokens."""

    def __init__(self, name="masked_lm_loss"):
        super().__init__(name=name)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is None:
            sample_weight = tf.ones_like(y_true)
        return masked_lm_loss(y_true, y_pred, sample_weight)


def document_batches(tokenizer, texts, max_tokens):
    """One document per row, BOS/EOS around it, cut to max_tokens and right-padded.

    Returns (inputs, labels, weights) for `fit`: inputs is a dict of
    input_ids and attention_mask [docs, max_tokens]; labels are the inputs
    shifted by one; weights are 1 on real target tokens and 0 on padding.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(texts), max_tokens + 1), pad, np.int32)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        tokens = tokenizer.encode(text)
        if tokenizer.eos_token_id is not None:
            tokens.append(tokenizer.eos_token_id)
        tokens = tokens[: max_tokens + 1]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    inputs = {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]}
    return inputs, ids[:, 1:], mask[:, 1:]
