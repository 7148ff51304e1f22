"""Prefix caching: the block index and its LRU bound (serving.prefix_cache), and rows that reuse a cached prefix
decoding what they decode without it."""

import numpy as np
import pytest
from transformers import GPT2Config

from tfgen import GPT2LM
from tfgen.serving.prefix_cache import BLOCK_TOKENS, PrefixCache, block_keys
from tfgen.serving.protocol import Sampling
from tiny_model import text_of_tokens

LAYERS, HEADS, HEAD_DIM = 2, 3, 4
PREFIX_TOKENS = 200
SUFFIXES = [
    "대한민국의 수도는",
    "영화가 정말",
    "옛날 옛적에",
    "오늘 날씨는",
    "서울은",
    "이 책은",
    "우리는",
    "그는 집에",
]
GREEDY = Sampling(
    max_tokens=16,
    do_sample=False,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    min_tokens=0,
)
_EXPORTS = {}  # the LiteRT export of the long model, made once


def kv_of(token_ids):
    """Stand-in keys and values [layers, heads, len, d] that name each column's token and position."""
    columns = np.arange(len(token_ids), dtype=np.float32)
    tokens = np.asarray(token_ids, np.float32)
    keys = np.broadcast_to(
        tokens[None, None, :, None] * 1000 + columns[None, None, :, None], (LAYERS, HEADS, len(token_ids), HEAD_DIM)
    )
    return keys, -keys


def cache_prompt(cache, token_ids):
    """What a row does once prefilled: hands the cache its blocks; returns the columns the cache asked for."""
    asked = []

    def columns_of(start, end):
        asked.append((start, end))
        return tuple(kv[:, :, start:end] for kv in kv_of(token_ids))

    cache.add(token_ids, columns_of)
    return asked


def test_block_keys_chain_the_whole_prefix():
    a = list(range(40))
    b = [99] + a[1:]
    assert len(block_keys(a)) == 40 // BLOCK_TOKENS
    assert block_keys(a)[1] == block_keys(a[:32] + [7] * 5)[1]  # the same first 32 tokens
    assert block_keys(b)[1] != block_keys(a)[1]  # the same second block after another first one


def test_reuse_is_whole_blocks_before_the_last_token():
    cache = PrefixCache(1024)
    prompt = list(range(100, 150))  # 50 tokens: 3 whole blocks before its last token
    assert cache.reusable(prompt) == 0
    assert cache_prompt(cache, prompt) == [(0, 48)]
    assert len(cache) == 3
    assert cache.reusable(prompt) == 48  # the prompt again: all but its last 2 tokens
    assert cache.reusable(prompt[:48]) == 32  # a prompt equal to the cached prefix: its last token is fed, not taken
    assert cache.reusable(prompt[:40] + [7] * 30) == 32  # shared up to mid-block 3: blocks 1 and 2
    assert cache.reusable([7] + prompt[1:]) == 0
    count, keys, values = cache.take(prompt[:40] + [7] * 30)
    assert count == 32
    np.testing.assert_array_equal(keys, kv_of(prompt)[0][:, :, :32])
    np.testing.assert_array_equal(values, kv_of(prompt)[1][:, :, :32])
    assert cache_prompt(cache, prompt + [1] * 20) == [(48, 64)]  # a longer prompt: only its new block is read
    assert cache_prompt(cache, prompt) == []


def test_least_recently_used_prefixes_are_dropped_within_the_budget():
    first, second = list(range(1, 66)), list(range(200, 265))  # 4 blocks each before the last token
    cache = PrefixCache(6 * BLOCK_TOKENS)  # less than two prefixes
    cache_prompt(cache, first)
    cache_prompt(cache, second)
    assert cache.tokens() == 6 * BLOCK_TOKENS
    assert cache.reusable(second) == 64
    assert cache.reusable(first) == 2 * BLOCK_TOKENS  # the older prefix lost its last blocks first
    cache.take(first[:33])  # used again: its blocks are now the newest
    cache_prompt(cache, list(range(500, 533)))  # 2 more blocks push out the second prefix's tail
    assert cache.reusable(first) == 32 and cache.reusable(second) == 32


def test_a_budget_of_zero_caches_nothing_and_a_negative_one_is_refused():
    cache = PrefixCache(0)
    cache_prompt(cache, list(range(80)))
    assert len(cache) == 0 and cache.reusable(list(range(80))) == 0
    with pytest.raises(ValueError, match="0 or more tokens"):
        PrefixCache(-1)


@pytest.fixture(scope="module")
def long_lm(tiny_lm):
    """The trained tiny model with a context of 512 (its position embeddings repeated): prompts of 200+ tokens."""
    lm = GPT2LM(GPT2Config.from_dict(tiny_lm.config.to_dict() | {"n_positions": 512}), tiny_lm.tokenizer)
    lm(np.zeros([1, 2], np.int32))
    weights = [np.tile(w, (4, 1)) if w.shape[0] == 128 and w.ndim == 2 else w for w in tiny_lm.get_weights()]
    lm.set_weights(weights)
    return lm


@pytest.fixture(scope="module")
def prompts(long_lm, ko_lines):
    prefix = long_lm.tokenizer.encode(text_of_tokens(long_lm.tokenizer, ko_lines, PREFIX_TOKENS))[:PREFIX_TOKENS]
    return [prefix + long_lm.tokenizer.encode(suffix) for suffix in SUFFIXES]


def xla_rows(lm, slots, cache, tmp_path_factory):
    from tfgen.serving.rows import StateRows

    return StateRows(lm, slots, cache)


def litert_rows(lm, slots, cache, tmp_path_factory):
    from tfgen import export_litert
    from tfgen.litert import LiteRTLM

    if "long" not in _EXPORTS:  # exported once for the module
        _EXPORTS["long"] = LiteRTLM(
            export_litert(lm, tmp_path_factory.mktemp("litert") / "long", quantize="none", capacity=256, rows=4)
        )
    return _EXPORTS["long"].decode_rows(slots, prefix_cache=cache)


def decoded(rows, slot, count):
    """Up to `count` new ids of the started `slot` and their log-probabilities, its row then freed."""
    ids, logprobs = [], []
    while len(ids) < count:
        if hasattr(rows, "advance"):  # LiteRT rows say the log-probabilities of their tokens
            tokens = rows.advance(4)[slot]
            ids, logprobs, done = ids + tokens.ids, logprobs + tokens.logprobs, tokens.finished
        else:
            new_ids, done = rows.step(4)[slot]
            ids += new_ids
            length = rows._sent[slot]
            logprobs = rows._programs.state.value("logprobs")[slot, length - len(ids) : length].tolist()
        if done:
            break
    rows.free_row(slot)
    return ids, logprobs


@pytest.fixture(scope="module", params=[xla_rows, litert_rows], ids=["xla", "litert"])
def make_rows(request, long_lm, tmp_path_factory):
    return lambda slots, cache=None: request.param(long_lm, slots, cache, tmp_path_factory)


def decode_one_by_one(rows, prompts):
    """Each prompt started alone in slot 0 and decoded to its end: [(new ids, their log-probabilities)], the rows'
    prefix-cache reuse counts."""
    out, reused = [], []
    for prompt in prompts:
        reused += rows.start_rows([(0, prompt, GREEDY)])
        out.append(decoded(rows, 0, GREEDY.max_tokens))
    return out, reused


def test_rows_reusing_a_200_token_prefix_decode_what_they_do_without_it(make_rows, prompts):
    without, none_reused = decode_one_by_one(make_rows(2), prompts)
    cache = PrefixCache(4096)
    with_cache, reused = decode_one_by_one(make_rows(2, cache), prompts)
    assert none_reused == [0] * 8
    assert reused == [0] + [PREFIX_TOKENS // BLOCK_TOKENS * BLOCK_TOKENS] * 7
    for (ids, logprobs), (cached_ids, cached_logprobs) in zip(without, with_cache):
        assert cached_ids == ids
        np.testing.assert_allclose(cached_logprobs, logprobs, atol=1e-4)
    # Rows started together, one of them a prompt equal to a cached prefix, one sharing it only to mid-block.
    equal, mid_block = prompts[0][: PREFIX_TOKENS - 8], prompts[1][:100] + prompts[2][-5:]
    starts = [(0, equal, GREEDY), (1, mid_block, GREEDY), (2, prompts[3], GREEDY)]
    rows, fresh = make_rows(4, cache), make_rows(4)
    assert rows.start_rows(starts) == [176, 96, 192]
    fresh.start_rows(starts)
    first = rows.step(6)
    assert first == fresh.step(6)
    assert first[2][0] == without[3][0][: len(first[2][0])]
