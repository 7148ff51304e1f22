"""score() and top_choices() against probabilities computed directly from transformers' PyTorch model."""

import math

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from tfgen import GPT2LM, Tokenizer, scoring
from tiny_model import text_of_tokens

SHORT_CONTEXT = 32  # the context of a cut copy of the tiny GPT-2, for texts of a few contexts
TEXTS = ["안녕하세요", "가", "근육이 커지기 위해서는 무엇보다 규칙적인 생활습관이 중요하다.", "이때 그는"]


@pytest.fixture(scope="module")
def pt_model(tiny_lm_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_lm_dir).eval()


@pytest.fixture(scope="module")
def short_context_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny checkpoint cut to a context of SHORT_CONTEXT tokens (its first position embeddings), so that a
    text of three contexts sums few enough float32 log-probabilities to match within 1e-4."""
    model = GPT2LMHeadModel.from_pretrained(tiny_lm_dir)
    model.transformer.wpe.weight = torch.nn.Parameter(model.transformer.wpe.weight[:SHORT_CONTEXT])
    model.config.n_positions = SHORT_CONTEXT
    directory = tmp_path_factory.mktemp("tiny-lm-short-context")
    model.save_pretrained(directory)
    Tokenizer.from_pretrained(tiny_lm_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def short_context_lm(short_context_dir):
    return GPT2LM.from_pretrained(short_context_dir)


@pytest.fixture(scope="module")
def short_context_pt_model(short_context_dir):
    return GPT2LMHeadModel.from_pretrained(short_context_dir).eval()


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


def _pt_strided_logprob(model, ids, context, stride):
    """The total log-probability of `ids` as transformers' perplexity guide computes it: windows of the context,
    `stride` apart, each scoring its tokens past the previous window's end (labels -100 before them)."""
    total, previous_end = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, : -(end - previous_end)] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        total -= loss.item() * int((labels[:, 1:] != -100).sum())  # the loss is the mean over the shifted targets
        previous_end = end
        if end == len(ids):
            return total


@pytest.mark.parametrize("stride", [5, 21, None])
def test_strided_score_of_a_long_text_matches_pytorch_perplexity_guide(
    short_context_lm, short_context_pt_model, ko_lines, stride
):
    lm = short_context_lm
    text = text_of_tokens(lm.tokenizer, ko_lines, 3 * SHORT_CONTEXT)
    ids = lm.tokenizer.encode(text)
    assert lm.net.context == SHORT_CONTEXT and len(ids) < 4 * SHORT_CONTEXT
    result = lm.score(text, stride=stride)
    assert result["tokens"] == [lm.tokenizer.token_text(i) for i in ids]
    assert len(result["token_logprobs"]) == len(ids) - 1
    expected = _pt_strided_logprob(short_context_pt_model, ids, SHORT_CONTEXT, stride or SHORT_CONTEXT // 2)
    assert result["logprob"] == pytest.approx(expected, abs=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(-expected / (len(ids) - 1)), rel=1e-6)


def test_windows_of_long_and_short_texts_batch_together(tiny_lm, long_text):
    texts = [TEXTS[0], long_text, *TEXTS[2:]]
    singles = [tiny_lm.score(text, stride=96) for text in texts]
    for batched, single in zip(tiny_lm.score(texts * 3, stride=96), singles * 3):  # over 16 windows in all
        assert batched["tokens"] == single["tokens"]
        np.testing.assert_allclose(batched["token_logprobs"], single["token_logprobs"], atol=1e-5)


def test_a_text_that_fits_the_context_is_one_window_whatever_the_stride(tiny_lm):
    assert tiny_lm.score(TEXTS[2], stride=1) == tiny_lm.score(TEXTS[2], stride=500) == tiny_lm.score(TEXTS[2])


@pytest.mark.parametrize("length, context, stride", [(10, 4, 2), (11, 4, 3), (100, 32, 1), (33, 32, 31)])
def test_windows_score_every_token_after_the_first_once(length, context, stride):
    spans = scoring.windows(length, context, stride)
    assert [t for _, end, count in spans for t in range(end - count, end)] == list(range(1, length))
    assert all(count < end - begin <= context for begin, end, count in spans)  # each scored token has context
    assert [begin for begin, _, _ in spans] == list(range(0, stride * len(spans), stride))
    assert spans[-2][1] < length == spans[-1][1]  # the last window is the first to reach the end
    assert scoring.windows(length, context) == scoring.windows(length, context, context // 2)
    assert scoring.windows(context, context, stride) == [(0, context, context - 1)]


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
    greedy = tiny_lm.generate(prompt_ids, max_new_tokens=steps, eos_token_id=None).numpy()[0, len(prompt_ids) :]
    assert ids[len(prompt_ids) :] == greedy.tolist()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda lm: lm.score(""), "scoring needs at least 2"),
        (lambda lm: lm.score(["안녕하세요", ""]), "''"),
        (lambda lm: lm.score("가 " * 200, stride=128), "stride must be an integer from 1 to 127"),
        (lambda lm: lm.score(["가", "가 " * 200], stride=0), "stride must be an integer from 1 to 127"),
        (lambda lm: lm.score("가 " * 200, stride=2.5), "got 2.5"),
        (lambda lm: lm.top_choices("이때", steps=0), "steps must be a positive integer"),
        (lambda lm: lm.top_choices("이때", k=0), "k must be an integer from 1"),
        (lambda lm: lm.top_choices("가 " * 60, steps=100), "exceeds the model's context"),
    ],
)
def test_bad_arguments_raise_value_error(tiny_lm, call, message):
    with pytest.raises(ValueError) as error:
        call(tiny_lm)
    assert message in str(error.value)
