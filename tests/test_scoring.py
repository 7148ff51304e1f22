"""score() and top_choices() against probabilities computed directly from transformers' PyTorch model."""

import math

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

TEXTS = ["안녕하세요", "가", "근육이 커지기 위해서는 무엇보다 규칙적인 생활습관이 중요하다.", "이때 그는"]


@pytest.fixture(scope="module")
def pt_model(tiny_lm_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_lm_dir).eval()


def _pt_logits(model, ids):
    """Logits [len, vocab] for one unpadded sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _pt_token_logprobs(model, ids):
    logprobs = torch.log_softmax(_pt_logits(model, ids), dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_score_matches_pytorch_log_probabilities(tiny_lm, pt_model):
    tokenizer = tiny_lm.tokenizer
    results = tiny_lm.score(TEXTS)
    assert len({len(tokenizer.encode(text)) for text in TEXTS}) == len(TEXTS)  # padding in every row but one
    for text, result in zip(TEXTS, results):
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id
        assert result["tokens"] == [tokenizer.token_text(i) for i in ids]
        assert len(result["token_logprobs"]) == len(ids) - 1
        np.testing.assert_allclose(result["token_logprobs"], _pt_token_logprobs(pt_model, ids), atol=1e-4)
        assert result["logprob"] == pytest.approx(sum(result["token_logprobs"]), abs=1e-9)
        assert result["perplexity"] == pytest.approx(math.exp(-np.mean(result["token_logprobs"])), rel=1e-9)
        assert result["logprob"] < 0 and result["perplexity"] > 1


def test_batched_scores_equal_single_text_scores(tiny_lm, ko_lines):
    texts = [line for line in ko_lines if 5 <= len(line) <= 40][:20]  # more than one batch of 16
    assert len(texts) == 20
    for text, batched in zip(texts, tiny_lm.score(texts)):
        single = tiny_lm.score(text)
        assert isinstance(single, dict)
        assert batched["tokens"] == single["tokens"]
        np.testing.assert_allclose(batched["token_logprobs"], single["token_logprobs"], atol=1e-5)
        assert batched["perplexity"] == pytest.approx(single["perplexity"], rel=1e-4)


def test_top_choices_match_pytorch_softmax_and_greedy_generate(tiny_lm, pt_model):
    tokenizer = tiny_lm.tokenizer
    prompt, steps, k = "근육이 커지기 위해서는", 6, 5
    table = tiny_lm.top_choices(prompt, steps=steps, k=k)
    prompt_ids = tokenizer.encode(prompt)
    assert len(table) == steps and table[0]["input"] == prompt
    ids = list(prompt_ids)
    for row in table:
        assert row["input"] == tokenizer.decode(ids)
        top = torch.topk(torch.softmax(_pt_logits(pt_model, ids)[-1], dim=-1), k)
        assert [token for token, _ in row["choices"]] == [tokenizer.token_text(i) for i in top.indices]
        np.testing.assert_allclose([p for _, p in row["choices"]], top.values.numpy(), atol=1e-5)
        ids.append(int(top.indices[0]))
    greedy = tiny_lm.generate(prompt_ids, max_new_tokens=steps, eos_token_id=None).numpy()[0, len(prompt_ids):]
    assert ids[len(prompt_ids):] == greedy.tolist()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda lm: lm.score(""), "scoring needs at least 2"),
        (lambda lm: lm.score(["안녕하세요", ""]), "''"),
        (lambda lm: lm.score("가 " * 200), "more than the model's context of 128"),
        (lambda lm: lm.top_choices("이때", steps=0), "steps must be a positive integer"),
        (lambda lm: lm.top_choices("이때", k=0), "k must be an integer from 1"),
        (lambda lm: lm.top_choices("가 " * 60, steps=100), "exceeds the model's context"),
    ],
)
def test_bad_arguments_raise_value_error(tiny_lm, call, message):
    with pytest.raises(ValueError) as error:
        call(tiny_lm)
    assert message in str(error.value)
