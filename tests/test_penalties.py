"""OpenAI's presence and frequency penalties and logit bias: generate's tokens against a plain numpy reference."""

import numpy as np
import pytest

PROMPTS = ["대한민국의 수도는", "옛날 옛적에"]
PENALTIES = {"presence_penalty": 0.8, "frequency_penalty": 1.5}


def reference_greedy(lm, prompt_ids, max_new_tokens, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None):
    """Greedy decoding by OpenAI's formula, one full forward pass a token: logits + bias, less
    frequency_penalty * count + presence_penalty * (count > 0) over the tokens generated so far; stops at EOS."""
    ids, new = list(prompt_ids), []
    vocab = lm.config.vocab_size
    bias = np.zeros(vocab, np.float32)
    for token, value in (logit_bias or {}).items():
        bias[int(token)] = value
    for _ in range(max_new_tokens):
        logits = np.asarray(lm(np.array([ids], np.int32))[0, -1], np.float64) + bias
        counts = np.bincount(np.array(new, np.int64), minlength=vocab)[:vocab]
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0)
        token = int(np.argmax(logits))
        ids.append(token)
        new.append(token)
        if token == lm.config.eos_token_id:
            break
    return new


def _new_ids(lm, prompt, **kwargs):
    return lm.complete([prompt], max_new_tokens=24, **kwargs)[0][0].new_token_ids


@pytest.mark.parametrize("penalties", [PENALTIES, {"presence_penalty": 2.0}, {"frequency_penalty": -0.5}])
def test_generate_penalties_equal_openai_formula(tiny_lm, penalties):
    for prompt in PROMPTS:
        prompt_ids = tiny_lm.tokenizer.encode(prompt)
        expected = reference_greedy(tiny_lm, prompt_ids, 24, **penalties)
        assert _new_ids(tiny_lm, prompt, **penalties) == expected


def test_penalties_change_the_text(tiny_lm):
    plain = _new_ids(tiny_lm, PROMPTS[0])
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself without a penalty
    assert _new_ids(tiny_lm, PROMPTS[0], **PENALTIES) != plain


def test_penalties_apply_to_sampling_rows_too(tiny_lm):
    kwargs = {"do_sample": True, "top_k": 0, "seed": 11}
    assert _new_ids(tiny_lm, PROMPTS[1], **kwargs, **PENALTIES) == _new_ids(tiny_lm, PROMPTS[1], **kwargs, **PENALTIES)
    assert _new_ids(tiny_lm, PROMPTS[1], **kwargs, presence_penalty=2.0) != _new_ids(tiny_lm, PROMPTS[1], **kwargs)


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -3, "1"])
def test_out_of_range_penalty_raises(tiny_lm, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a number from -2 to 2"):
        tiny_lm.generate([[1, 2]], max_new_tokens=2, **{name: value})
