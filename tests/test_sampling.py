"""The sampling functions on their own, against transformers' PyTorch warpers."""

import math

import numpy as np
import pytest
import tensorflow as tf
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tfgen.generation import sampling


def transformers_filter(logits, temperature, top_k, top_p):
    """Logits after transformers' warpers, in its order: temperature, top-k, top-p (each only when on)."""
    scores = torch.tensor(logits)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    for warper in warpers:
        scores = warper(None, scores)
    return scores.numpy()


def _ours(logits, temperature, top_k, top_p):
    scaled = sampling.apply_temperature(tf.constant(logits), tf.constant(temperature))
    return tf.function(sampling.filter_top_k_top_p, jit_compile=True)(
        scaled, tf.constant(top_k), tf.constant(top_p)
    ).numpy()


@pytest.mark.parametrize(
    "scale, temperature, top_k, top_p",
    [
        (3.0, 1.0, 50, 0.95),
        (3.0, 0.7, 0, 0.9),
        (0.1, 1.0, 0, 0.95),  # near-uniform: the nucleus is most of the vocabulary
        (3.0, 1.0, 500, 1.0),
        (3.0, 1.0, 1, 1.0),
        (5.0, 1.5, 40, 0.5),
        (3.0, 1.0, 0, 1.0),
    ],
)
def test_filter_matches_transformers_warpers(scale, temperature, top_k, top_p):
    logits = (np.random.default_rng(0).standard_normal((6, 3000)) * scale).astype(np.float32)
    expected = transformers_filter(logits, temperature, top_k, top_p)
    ours = _ours(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
    kept = np.isfinite(expected)
    np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-6)


def test_sampling_follows_the_filtered_softmax():
    """Chi-square goodness of fit of 40,000 one-step draws against softmax of the filtered logits."""
    vocab, draws = 30, 40_000
    logits = np.random.default_rng(1).standard_normal(vocab).astype(np.float32) * 2
    filtered = _ours(logits[None], 0.8, 12, 0.9)[0]
    probs = np.exp(filtered - filtered.max())
    probs /= probs.sum()

    tokens = sampling.sample(tf.constant(np.tile(filtered, (draws, 1))), tf.constant([5, 0])).numpy()
    counts = np.bincount(tokens, minlength=vocab)
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] * draws
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    # Wilson-Hilferty: chi2/dof is close to normal after a cube root.
    z = ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    p_value = 0.5 * math.erfc(z / math.sqrt(2))
    assert p_value > 1e-3, f"chi2={chi2:.1f} on {dof} dof (p={p_value:.2g})"


def test_sample_is_a_function_of_the_seed():
    logits = tf.zeros([4, 100])
    a = sampling.sample(logits, tf.constant([1, 2])).numpy()
    np.testing.assert_array_equal(a, sampling.sample(logits, tf.constant([1, 2])).numpy())
    assert not np.array_equal(a, sampling.sample(logits, tf.constant([1, 3])).numpy())
