"""The masked language-model loss that fit uses."""

import numpy as np
import tensorflow as tf

from tfgen.training import MaskedLMLoss, document_batches, masked_lm_loss


def test_masked_loss_equals_a_hand_computation_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 7)).astype(np.float32)
    labels = np.array([[1, 2, 3, 0], [4, 5, 0, 0]])
    weights = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    expected = -(picked * weights).sum() / weights.sum()
    np.testing.assert_allclose(masked_lm_loss(labels, logits, weights).numpy(), expected, rtol=1e-6)

    garbage = logits.copy()
    garbage[weights == 0] = rng.standard_normal((int((weights == 0).sum()), 7)) * 50
    np.testing.assert_allclose(masked_lm_loss(labels, garbage, weights).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(MaskedLMLoss()(labels, logits, sample_weight=weights).numpy(), expected, rtol=1e-6)


def test_document_batches_shift_labels_and_weight_real_targets(tiny_lm):
    tok = tiny_lm.tokenizer
    inputs, labels, weights = document_batches(tok, ["안녕하세요", "이때"], max_tokens=16)
    first = tok.encode("안녕하세요") + [tok.eos_token_id]
    np.testing.assert_array_equal(inputs["input_ids"][0, : len(first) - 1], first[:-1])
    np.testing.assert_array_equal(labels[0, : len(first) - 1], first[1:])
    assert weights[0].sum() == len(first) - 1 and inputs["attention_mask"][0].sum() == len(first)


def test_fit_lowers_the_masked_loss(tiny_lm, ko_lines):
    tok = tiny_lm.tokenizer
    inputs, labels, weights = document_batches(tok, ko_lines[:64], max_tokens=32)
    tf.keras.utils.set_random_seed(0)
    lm = type(tiny_lm)(tiny_lm.config, tok)
    lm.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    history = lm.fit(inputs, labels, sample_weight=weights, batch_size=16, epochs=8, verbose=0).history["loss"]
    assert history[-1] < history[0] - 1.0  # nats, after 32 steps
