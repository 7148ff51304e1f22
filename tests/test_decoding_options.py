"""Beam search and logits processors against transformers' PyTorch generate, token for token."""

import numpy as np
import pytest
import tensorflow as tf
import torch
from transformers import GPT2LMHeadModel
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from tfgen.generation import processors
from tfgen.generation.decode import bad_word_tensors

PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때", "대한민국의 수도는 서울이며, 가장 큰 도시이다"]

CASES = {
    "beam4-early-stopping": dict(num_beams=4, early_stopping=True),
    "beam4-two-returned-length-penalty": dict(num_beams=4, num_return_sequences=2, length_penalty=0.8),
    "beam3-no-repeat-2": dict(num_beams=3, no_repeat_ngram_size=2),
    "beam4-never": dict(num_beams=4, early_stopping="never", length_penalty=1.2),
    "greedy-repetition-1.5": dict(repetition_penalty=1.5),
    "greedy-no-repeat-3": dict(no_repeat_ngram_size=3),
    "greedy-min-new-tokens": dict(min_new_tokens=12),
    "seed000-mix": dict(repetition_penalty=1.5, no_repeat_ngram_size=3, min_length=10),
    "beam3-mix-two-eos": dict(num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=2, eos_token_id=[2, 5]),
}


@pytest.fixture(scope="module")
def pt_model(tiny_lm_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_lm_dir).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_matches_pytorch_generate(name, tiny_lm, pt_model):
    ids, mask = tiny_lm.tokenizer.encode_batch(PROMPTS)
    settings = dict(
        max_new_tokens=20, eos_token_id=tiny_lm.tokenizer.eos_token_id, pad_token_id=tiny_lm.tokenizer.pad_token_id
    )
    settings.update(CASES[name])
    ours = tiny_lm.generate(ids, mask, **settings).numpy()
    with torch.no_grad():
        expected = pt_model.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), do_sample=False, **settings
        ).numpy()
    np.testing.assert_array_equal(ours, expected)


def _history(rng, batch=3, width=12, vocab=40):
    return rng.integers(0, vocab, (batch, width)).astype(np.int32)


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    rng = np.random.default_rng(0)
    history, scores = _history(rng), rng.standard_normal((3, 40)).astype(np.float32)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(history[:, 2:]).long(), torch.tensor(scores))
    ours = processors.repetition_penalty(tf.constant(scores), tf.constant(history[:, 2:]), 10, penalty)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_transformers(size):
    rng = np.random.default_rng(size)
    history = _history(rng, vocab=5)  # a small vocabulary makes repeats likely
    scores = rng.standard_normal((3, 5)).astype(np.float32)
    expected = NoRepeatNGramLogitsProcessor(size)(torch.tensor(history[:, 1:10]).long(), torch.tensor(scores))
    ours = processors.no_repeat_ngram(tf.constant(scores), tf.constant(history[:, 1:]), 9, size)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=1e-5)
    assert np.isinf(ours.numpy()).any() or size > 2


def test_min_new_tokens_matches_transformers():
    scores = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    eos = [2, 7]
    for step in (0, 3, 4):
        processor = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=5, min_new_tokens=4, eos_token_id=eos)
        expected = processor(torch.zeros((2, 5 + step), dtype=torch.long), torch.tensor(scores))
        ours = processors.ban_tokens_before(tf.constant(scores), tf.constant(eos), step, 4)
        np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=1e-6)


def test_bad_beam_settings_are_refused(tiny_lm):
    ids = [tiny_lm.tokenizer.encode("이때")]
    with pytest.raises(ValueError, match="at most num_beams"):
        tiny_lm.generate(ids, max_new_tokens=4, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="num_beams must be a positive integer"):
        tiny_lm.generate(ids, max_new_tokens=4, num_beams=0)
    out = tiny_lm.generate(ids, max_new_tokens=4, length_penalty=0.5)  # accepted and ignored without beams
    np.testing.assert_array_equal(out.numpy(), tiny_lm.generate(ids, max_new_tokens=4).numpy())


def test_bad_words_match_transformers():
    rng = np.random.default_rng(3)
    history = _history(rng, batch=4, vocab=4)
    scores = rng.standard_normal((4, 4)).astype(np.float32)
    words = [[1], [2, 3], [0, 1, 2]]
    expected = NoBadWordsLogitsProcessor(words, eos_token_id=9)(
        torch.tensor(history[:, 2:]).long(), torch.tensor(scores)
    )
    settings = bad_word_tensors(tuple(tuple(w) for w in words))
    ours = processors.bad_words(
        tf.constant(scores), tf.constant(history[:, 2:]), 10, settings["bad_words"], settings["bad_word_lengths"]
    )
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=1e-6)
    assert np.isinf(ours.numpy()).sum() > 4  # more than the single-token word alone


def test_bad_words_are_never_generated(tiny_lm):
    ids, mask = tiny_lm.tokenizer.encode_batch(PROMPTS)
    free = tiny_lm.generate(ids, mask, max_new_tokens=12, eos_token_id=None).numpy()[:, ids.shape[1] :]
    banned = [[int(free[0, 0])], [int(free[1, 2]), int(free[1, 3])]]
    out = tiny_lm.generate(ids, mask, max_new_tokens=12, eos_token_id=None, bad_words_ids=banned).numpy()
    new = out[:, ids.shape[1] :]
    assert banned[0][0] not in new
    pairs = {(int(a), int(b)) for row in new for a, b in zip(row[:-1], row[1:])}
    assert tuple(banned[1]) not in pairs


@pytest.mark.slow
def test_scores_are_the_chosen_tokens_log_probabilities(tiny_lm, pt_model):
    ids, mask = tiny_lm.tokenizer.encode_batch(PROMPTS[:2])
    # The EOS is the token row 0 makes at its third step, so some row ends early whatever weights training gave.
    unended = tiny_lm.generate(ids, mask, max_new_tokens=6, repetition_penalty=1.3, eos_token_id=None).numpy()
    eos = int(unended[0, ids.shape[1] + 2])
    settings = dict(
        max_new_tokens=6,
        eos_token_id=eos,
        pad_token_id=tiny_lm.tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_scores=True,
    )
    greedy = tiny_lm.generate(ids, mask, repetition_penalty=1.3, **settings)
    with torch.no_grad():
        expected = pt_model.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            repetition_penalty=1.3,
            **settings,
        )
    transition = pt_model.compute_transition_scores(expected.sequences, expected.scores, normalize_logits=True)
    np.testing.assert_array_equal(greedy.sequences.numpy(), expected.sequences.numpy())
    new = greedy.sequences.numpy()[:, ids.shape[1] :]
    ended = np.cumsum(new == eos, axis=1) - (new == eos) > 0
    ours = greedy.token_logprobs.numpy()
    np.testing.assert_allclose(ours[~ended], transition.numpy()[~ended], atol=1e-4)
    assert ended.any() and (ours[ended] == 0).all()  # after EOS: 0 (transformers scores the pad there)

    beams = tiny_lm.generate(ids, mask, num_beams=3, num_return_sequences=2, **settings)
    with torch.no_grad():
        expected = pt_model.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            num_beams=3,
            num_return_sequences=2,
            **settings,
        )
    np.testing.assert_array_equal(beams.sequences.numpy(), expected.sequences.numpy())
    np.testing.assert_allclose(beams.sequences_scores.numpy(), expected.sequences_scores.numpy(), atol=1e-4)
    # With length_penalty 1 a beam's score is its summed token log-probabilities over its length.
    lengths = (beams.token_logprobs.numpy() != 0).sum(-1)
    np.testing.assert_allclose(
        beams.token_logprobs.numpy().sum(-1) / lengths, beams.sequences_scores.numpy(), atol=1e-4
    )

    sampled = tiny_lm.generate(ids, mask, do_sample=True, top_k=5, seed=0, **settings)
    assert (sampled.token_logprobs.numpy() <= 0).all() and (sampled.token_logprobs.numpy() > np.log(1 / 5) - 5).all()
