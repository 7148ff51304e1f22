"""generate() against transformers' own generate (PyTorch and TF), and the compiled loop's trace behaviour."""

import numpy as np
import pytest
import tensorflow as tf
import torch
from transformers import GPT2LMHeadModel, TFGPT2LMHeadModel

from test_sampling import transformers_filter
from tfgen import GPT2LM
from tfgen.generation.options import resolve_options

PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때", "대한민국의 수도는 서울이며, 가장 큰 도시이다"]


def _pt_generate(directory, ids, mask, **kwargs):
    model = GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), **kwargs)
    return out.numpy()


def _tf_generate(directory, ids, mask, **kwargs):
    model = TFGPT2LMHeadModel.from_pretrained(directory, use_safetensors=False)
    return model.generate(tf.constant(ids), attention_mask=tf.constant(mask), **kwargs).numpy()


@pytest.fixture(scope="module")
def prompt_batch(tiny_lm):
    return tiny_lm.tokenizer.encode_batch(PROMPTS)


@pytest.fixture(scope="module")
def greedy_settings(tiny_lm, prompt_batch):
    """Greedy settings whose EOS is a token row 0 produces mid-way, so EOS padding is exercised too."""
    ids, mask = prompt_batch
    new = tiny_lm.generate(ids, mask, max_new_tokens=24, eos_token_id=None).numpy()[:, ids.shape[1] :]
    # A token that row 0 makes first at some step while another row goes on past that step without it.
    eos = next(
        int(token)
        for step, token in enumerate(new[0][:-1])
        if step >= 1 and token not in new[0, :step] and any(token not in row[: step + 2] for row in new[1:])
    )
    return dict(max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=tiny_lm.tokenizer.pad_token_id)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["tf_model.h5", "model.safetensors"])
def test_greedy_matches_transformers_token_for_token(
    weights, tiny_lm_dir, h5_only_dir, safetensors_only_dir, prompt_batch, greedy_settings
):
    directory = h5_only_dir if weights == "tf_model.h5" else safetensors_only_dir
    lm = GPT2LM.from_pretrained(directory)
    ids, mask = prompt_batch
    ours = lm.generate(ids, mask, **greedy_settings).numpy()

    np.testing.assert_array_equal(ours, _pt_generate(tiny_lm_dir, ids, mask, **greedy_settings))
    np.testing.assert_array_equal(ours, _tf_generate(tiny_lm_dir, ids, mask, **greedy_settings))
    eos_row = ours[0, ids.shape[1] :]
    assert greedy_settings["eos_token_id"] in eos_row
    after_eos = eos_row[list(eos_row).index(greedy_settings["eos_token_id"]) + 1 :]
    assert after_eos.size and (after_eos == greedy_settings["pad_token_id"]).all()


def test_each_row_of_a_ragged_batch_generates_what_it_would_alone(tiny_lm, prompt_batch):
    ids, mask = prompt_batch
    batch = tiny_lm.generate(ids, mask, max_new_tokens=16, eos_token_id=None).numpy()
    for row, row_mask, out in zip(ids, mask, batch):
        alone = tiny_lm.generate(row[row_mask == 1], max_new_tokens=16, eos_token_id=None).numpy()[0]
        np.testing.assert_array_equal(out[len(row) :], alone[row_mask.sum() :])


def test_max_length_counts_the_prompt_as_transformers_does(tiny_lm, prompt_batch):
    ids, mask = prompt_batch
    out = tiny_lm.generate(ids, mask, max_length=ids.shape[1] + 7, eos_token_id=None)
    assert out.shape == (len(PROMPTS), ids.shape[1] + 7)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_lm.generate(ids, mask, max_length=ids.shape[1])


def _pt_allowed(logits, temperature, top_k, top_p):
    """The tokens transformers' warpers leave finite, in its order: temperature, top-k, top-p."""
    return np.isfinite(transformers_filter(logits, temperature, top_k, top_p))


SAMPLING_CASES = [
    dict(temperature=1.0, top_k=50, top_p=0.95),  # the benchmark setting: the nucleus lies in the top 64
    dict(temperature=0.7, top_k=10, top_p=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.9),  # top-p alone over the whole vocabulary: the sort path
    dict(temperature=1.0, top_k=200, top_p=0.8),  # top-k beyond the candidate prefix: the sort path
    dict(temperature=2.0, top_k=3, top_p=0.3),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_sampled_tokens_lie_in_the_set_transformers_allows(tiny_lm_dir, tiny_lm, prompt_batch, case):
    ids, mask = prompt_batch
    out = tiny_lm.generate(ids, mask, max_new_tokens=12, do_sample=True, seed=7, eos_token_id=None, **case).numpy()
    model = GPT2LMHeadModel.from_pretrained(tiny_lm_dir).eval()
    width = ids.shape[1]
    full_mask = np.concatenate([mask, np.ones((len(ids), out.shape[1] - width), mask.dtype)], axis=1)
    positions = np.maximum(full_mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        logits = model(
            torch.tensor(out, dtype=torch.long),
            attention_mask=torch.tensor(full_mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    for step in range(width, out.shape[1]):
        allowed = _pt_allowed(logits[:, step - 1], **case)
        chosen = out[:, step]
        assert allowed[np.arange(len(out)), chosen].all(), f"step {step}: a token outside the allowed set"


def test_same_seed_same_output_other_seed_other_output(tiny_lm, prompt_batch):
    ids, mask = prompt_batch
    settings = dict(max_new_tokens=16, do_sample=True, top_k=0, top_p=1.0, eos_token_id=None)
    first = tiny_lm.generate(ids, mask, seed=11, **settings).numpy()
    np.testing.assert_array_equal(first, tiny_lm.generate(ids, mask, seed=11, **settings).numpy())
    assert not np.array_equal(first, tiny_lm.generate(ids, mask, seed=12, **settings).numpy())


def test_num_return_sequences_samples_several_per_prompt(tiny_lm, prompt_batch):
    ids, mask = prompt_batch
    out = tiny_lm.generate(
        ids, mask, max_new_tokens=8, do_sample=True, num_return_sequences=3, seed=3, top_k=0, eos_token_id=None
    ).numpy()
    assert out.shape[0] == 3 * len(PROMPTS)
    np.testing.assert_array_equal(out[:3, : ids.shape[1]], np.repeat(ids[:1], 3, axis=0))
    assert len({tuple(row) for row in out[:3, ids.shape[1] :]}) > 1
    with pytest.raises(ValueError, match="do_sample"):
        tiny_lm.generate(ids, mask, max_new_tokens=4, num_return_sequences=2)


def test_new_sampling_values_add_no_trace(tiny_lm):
    tok = tiny_lm.tokenizer
    settings = dict(max_new_tokens=10, do_sample=True)
    tiny_lm.generate([tok.encode("가 나")], **settings, seed=0)  # warm-up: compiles prefill and the sampling program
    traces = tiny_lm.decoder.trace_count
    for i, (prompt, temperature, top_k, top_p) in enumerate(
        [("안녕하세요", 0.5, 10, 0.9), ("근육이 커지기 위해서는", 1.5, 0, 0.5), ("이때 그는 말했다", 1.0, 200, 1.0)]
    ):
        tiny_lm.generate(
            [tok.encode(prompt)], **settings, temperature=temperature, top_k=top_k, top_p=top_p, seed=i + 1
        )
    assert tiny_lm.decoder.trace_count == traces


def _untrained_lm(n_positions):
    from transformers import GPT2Config

    return GPT2LM(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=n_positions))


def test_any_prompt_length_and_max_new_tokens_within_a_tier_adds_no_trace():
    """One prefill and one advance program per (rows, capacity tier): prompts across the old 32-token buckets,
    new max_new_tokens and streaming reuse them; the next tier compiles its own once."""
    lm = _untrained_lm(n_positions=512)
    settings = dict(pad_token_id=0, eos_token_id=None)
    lm.generate(np.ones([2, 3], np.int32), max_new_tokens=4, **settings)  # warm-up of the 128-column tier
    traces = lm.decoder.trace_count
    assert traces == 2
    for width, new in [(1, 9), (31, 20), (33, 2), (64, 64), (65, 1), (97, 30)]:
        out = lm.generate(np.ones([2, width], np.int32), max_new_tokens=new, **settings)
        assert out.shape == (2, width + new)
    list(
        lm.decoder.stream(
            np.ones([2, 40], np.int32), np.ones([2, 40], np.int32), resolve_options(40, max_new_tokens=30, **settings)
        )
    )
    assert lm.decoder.trace_count == traces
    lm.generate(np.ones([2, 100], np.int32), max_new_tokens=100, **settings)  # 200 columns: the 256 tier
    assert lm.decoder.trace_count == traces + 2
    lm.generate(np.ones([2, 150], np.int32), max_new_tokens=7, **settings)
    assert lm.decoder.trace_count == traces + 2


def test_rows_started_into_a_running_state_decode_what_they_would_alone(tiny_lm, prompt_batch):
    """The engine's slots are independent: a row started (and prefilled) while others are half-way through
    generates what it generates alone, and the others go on unchanged."""
    from tfgen.generation.decode import settings_tensors

    ids, mask = prompt_batch
    options = resolve_options(ids.shape[1], max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    alone = tiny_lm.generate(ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0).numpy()[:, ids.shape[1] :]
    programs = tiny_lm.decoder.programs(len(ids), 128, 0)
    state, settings = programs.state, settings_tensors(options)
    prompts = [row[m == 1] for row, m in zip(ids, mask)]

    def start(rows):
        width = max(len(prompts[r]) for r in rows)
        compact = np.stack([np.pad(prompts[r], (0, width - len(prompts[r]))) for r in rows])
        lengths = np.array([len(prompts[r]) for r in rows], np.int32)
        state.start_rows(rows, compact, lengths, lengths + 12)
        programs.prefill_columns(width, np.isin(np.arange(len(ids)), rows))

    assert state.value("finished").all()  # the state the batch above left: every slot free
    start([0, 2])
    advance_greedy = programs.advance("greedy")
    advance_greedy(tf.constant(5), settings)
    start([1, 3])  # rows 0 and 2 are 5 tokens in
    advance_greedy(tf.constant(20), settings)
    tokens, lengths = state.value("tokens"), state.value("lengths")
    for row, prompt in enumerate(prompts):
        assert lengths[row] == len(prompt) + 12
        np.testing.assert_array_equal(tokens[row, len(prompt) : lengths[row]], alone[row])


def test_generate_text_returns_strings(tiny_lm):
    text = tiny_lm.generate_text("안녕하세요", max_new_tokens=8)
    assert isinstance(text, str) and text.startswith("안녕하세요")
    new = tiny_lm.generate_text(["안녕하세요", "이때"], return_full_text=False, max_new_tokens=8)
    assert len(new) == 2 and text == "안녕하세요" + new[0]
    several = tiny_lm.generate_text("이때", max_new_tokens=8, do_sample=True, num_return_sequences=2, seed=1)
    assert len(several) == 2 and all(s.startswith("이때") for s in several)


def test_prompt_longer_than_the_context_is_refused(tiny_lm):
    with pytest.raises(ValueError, match="context of 128 tokens"):
        tiny_lm.generate([[5] * 120], max_new_tokens=9)


def test_new_tiers_trace_without_tensorflows_frequent_retracing_warning():
    """Each decode state's programs trace once by design, so TF's "frequent retracing" warning must not fire."""
    import logging

    lm = _untrained_lm(n_positions=1024)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        for width in (1, 130, 300, 600):  # four tiers, each a prefill and an advance program: past TF's five
            lm.generate(np.ones([1, width], np.int32), max_new_tokens=2, pad_token_id=0)
    finally:
        logger.removeHandler(handler)
    assert lm.decoder.trace_count == 7  # a one-token prompt needs no prefill
    assert not [r for r in records if "retracing" in r.getMessage()]
