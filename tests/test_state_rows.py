"""The server's decode rows (`serving.rows.StateRows`) on the decode state: rows that join, leave and differ."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfgen.generation import decode
from tfgen.serving.protocol import Sampling
from tfgen.serving.rows import StateRows

PROMPTS = ["대한민국의 수도는", "영화가 정말", "옛날 옛적에 한 마을에", "오늘 날씨는", "그는 집에"]
GREEDY = dict(
    do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_tokens=0
)


def sampling(max_tokens=20, **changes):
    return Sampling(max_tokens=max_tokens, **{**GREEDY, **changes})


def run(rows, joins, k=4):
    """Drives `rows` as the scheduler does: before step i, the rows of joins[i] ((name, slot, prompt_ids,
    sampling) each) start; a row that reaches EOS or its max_tokens is freed. Returns {name: new ids}."""
    out, active, i = {}, {}, 0
    while i < len(joins) or active:
        starts = joins[i] if i < len(joins) else ()
        if starts:
            rows.start_rows([(slot, prompt_ids, row_sampling) for _, slot, prompt_ids, row_sampling in starts])
        for name, slot, _, row_sampling in starts:
            active[slot], out[name] = (name, row_sampling.max_tokens), []
        for slot, (new_ids, reached_eos) in rows.step(k).items():
            name, max_tokens = active[slot]
            out[name] += new_ids
            if reached_eos or len(out[name]) >= max_tokens:
                rows.free_row(slot)
                del active[slot]
        i += 1
    return out


def alone(lm, prompt_ids, max_tokens, **kwargs):
    """What generate makes of the prompt on its own: its new ids through the first EOS."""
    new = lm.generate([prompt_ids], max_new_tokens=max_tokens, **kwargs).numpy()[0, len(prompt_ids) :].tolist()
    eos = lm.config.eos_token_id
    return new[: new.index(eos) + 1] if eos in new else new


@pytest.fixture(scope="module")
def prompt_ids(tiny_lm):
    return [tiny_lm.tokenizer.encode(p) for p in PROMPTS]


def test_rows_that_join_mid_way_decode_what_generate_does_alone(tiny_lm, prompt_ids):
    rows = StateRows(tiny_lm, 4)
    out = run(
        rows,
        [
            [("a", 2, prompt_ids[0], sampling(24))],
            [],
            [("b", 0, prompt_ids[1], sampling(24))],
            [("c", 3, prompt_ids[2], sampling(30)), ("d", 1, prompt_ids[3], sampling(5))],
        ],
    )
    for name, ids, max_tokens in zip("abcd", prompt_ids, (24, 24, 30, 5)):
        assert out[name] == alone(tiny_lm, ids, max_tokens), name


def test_rows_decode_alike_whatever_span_their_programs_read(tiny_lm, prompt_ids, monkeypatch):
    # Spans of 16 and 32 columns below the tiny model's context of 128: a long prompt prefills at span 32, and the
    # steps move from span 16 to 32 to 128 as rows with longer limits join, and back as they leave.
    monkeypatch.setattr(decode, "TIERS", (16, 32))
    rows = StateRows(tiny_lm, 3)
    assert rows.spans == (16, 32, 128)
    long_prompt = (prompt_ids[2] * 3)[:20]
    joins = [
        [("short", 0, prompt_ids[3], sampling(8))],
        [("long prompt", 1, long_prompt, sampling(10))],
        [],
        [("long", 2, prompt_ids[0], sampling(40))],
        [],
        [("after", 0, prompt_ids[1], sampling(6)), ("long prompt again", 1, long_prompt[:18], sampling(7))],
    ]
    out = run(rows, joins, k=3)  # the last two start together: one prefill of both, at the longer prompt's span
    for name, ids, max_tokens in (
        ("short", prompt_ids[3], 8),
        ("long prompt", long_prompt, 10),
        ("long", prompt_ids[0], 40),
        ("after", prompt_ids[1], 6),
        ("long prompt again", long_prompt[:18], 7),
    ):
        assert out[name] == alone(tiny_lm, ids, max_tokens), name


def test_a_freed_row_leaves_the_others_unchanged(tiny_lm, prompt_ids):
    rows = StateRows(tiny_lm, 3)
    rows.start_rows([(slot, ids, sampling(24, min_tokens=24)) for slot, ids in enumerate(prompt_ids[:3])])
    out = {slot: ids for slot, (ids, _) in rows.step(4).items()}
    rows.free_row(1)  # its client went away, half-way
    while len(out[0]) < 24:
        step = rows.step(4)
        assert set(step) == {0, 2}
        for slot, (ids, _) in step.items():
            out[slot] += ids
    for slot in (0, 2):
        assert out[slot] == alone(tiny_lm, prompt_ids[slot], 24, min_new_tokens=24)
    rows.start_rows([(1, prompt_ids[4], sampling(10))])  # the freed slot takes a new row
    assert rows.step(10)[1][0] == alone(tiny_lm, prompt_ids[4], 10)


def test_seeded_rows_sample_the_same_whatever_their_neighbours_slot_and_start(tiny_lm, prompt_ids):
    seeded = sampling(16, do_sample=True, temperature=1.2, top_k=0, seed=7)
    rows = StateRows(tiny_lm, 4)
    by_itself = run(rows, [[("seeded", 0, prompt_ids[0], seeded)]])["seeded"]
    among_others = run(
        rows,
        [
            [
                ("x", 0, prompt_ids[1], sampling(20, do_sample=True, temperature=1.0)),
                ("y", 1, prompt_ids[2], sampling(9)),
            ],
            [],
            [
                ("seeded", 3, prompt_ids[0], seeded),
                ("other seed", 2, prompt_ids[0], dataclasses.replace(seeded, seed=8)),
            ],
        ],
    )
    assert among_others["seeded"] == by_itself
    assert among_others["other seed"] != by_itself


def _kept_by_filters(logits, temperature, top_k, top_p, tolerance=1e-4):
    """[vocab] bool: the tokens top-k then top-p keep (a margin of `tolerance` at either edge, for the
    difference between a full forward pass and the cached decode)."""
    logits = logits / temperature
    kept = np.ones(logits.shape, bool)
    if top_k:
        kept &= logits >= np.sort(logits)[-top_k] - tolerance
    if top_p < 1:
        order = np.argsort(-logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        mass_above = np.cumsum(probs[order]) - probs[order]
        kept[order[mass_above >= top_p + tolerance]] = False
    return kept


def test_rows_of_one_batch_each_decode_with_their_own_settings(tiny_lm, prompt_ids):
    settings = {
        "plain": (sampling(20), {}),
        "penalties": (
            sampling(20, repetition_penalty=1.4, no_repeat_ngram_size=2),
            dict(repetition_penalty=1.4, no_repeat_ngram_size=2),
        ),
        "min_tokens": (
            sampling(24, no_repeat_ngram_size=3, min_tokens=24),
            dict(no_repeat_ngram_size=3, min_new_tokens=24),
        ),
        "openai_penalties": (
            sampling(20, presence_penalty=0.8, frequency_penalty=1.5),
            dict(presence_penalty=0.8, frequency_penalty=1.5),
        ),
    }
    sampled = {
        "top_k": sampling(20, do_sample=True, temperature=0.8, top_k=5, seed=1),
        "top_p": sampling(20, do_sample=True, temperature=1.5, top_p=0.6, seed=2),
    }
    joins = [(name, slot, prompt_ids[slot], row) for slot, (name, (row, _)) in enumerate(settings.items())]
    joins += [(name, len(settings) + i, prompt_ids[i], row) for i, (name, row) in enumerate(sampled.items())]
    out = run(StateRows(tiny_lm, len(joins)), [joins[:2], joins[2:]])
    for slot, (name, (row, kwargs)) in enumerate(settings.items()):
        assert out[name] == alone(tiny_lm, prompt_ids[slot], row.max_tokens, **kwargs), name
    for i, (name, row) in enumerate(sampled.items()):
        ids = prompt_ids[i] + out[name]
        logits = tiny_lm(tf.constant([ids])).numpy()[0, len(prompt_ids[i]) - 1 : -1]
        for step, token in enumerate(out[name]):
            assert _kept_by_filters(logits[step], row.temperature, row.top_k, row.top_p)[token], (name, step)


COMPILES_AFTER_WARM_UP = """
import json, sys
from tfgen import GPT2LM, _env
from tfgen.generation import decode
from tfgen.serving import rows as rows_module
from tfgen.serving.protocol import Sampling

decode.TIERS = (16, 32)  # spans 16, 32 and the context, 128
lm = GPT2LM.from_pretrained(sys.argv[1])
rows = rows_module.StateRows(lm, 5)
rows.warm_up(lm.tokenizer.encode("안녕하세요") * 2)
entries = lambda: len(list(_env.compile_cache_directory().iterdir()))
before = entries()
for slot, (length, max_tokens, do_sample) in enumerate([(3, 5, False), (20, 6, True), (9, 40, False), (2, 100, True),
                                                        (14, 3, False)]):
    sampling = Sampling(max_tokens=max_tokens, do_sample=do_sample, temperature=0.9, top_k=5, top_p=0.9,
                        repetition_penalty=1.1, no_repeat_ngram_size=2, min_tokens=0)
    rows.start_rows([(slot, list(range(10, 10 + length)), sampling)])
    rows.step(slot + 1)
for slot in range(5):
    rows.free_row(slot)
for together in ([0, 1], [0, 1, 2, 3, 4]):  # prefills over row tiers 4 and 5
    rows.start_rows([(slot, list(range(10, 12 + 5 * slot)), sampling) for slot in together])
    rows.step(2)
    for slot in together:
        rows.free_row(slot)
print(json.dumps([before, entries()]))
"""


@pytest.mark.slow
def test_nothing_compiles_after_warm_up_whatever_the_slot_span_or_row_tier(tiny_lm_dir, tmp_path):
    # XLA's persistent cache, in a fresh directory, gets an entry per compile: trace_count would not show a program
    # that XLA compiles again for another value of a runtime input.
    env = {**os.environ, "TFGEN_COMPILE_CACHE": str(tmp_path / "cache"), "TF_XLA_FLAGS": ""}
    done = subprocess.run(
        [sys.executable, "-c", COMPILES_AFTER_WARM_UP, str(tiny_lm_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = json.loads(done.stdout.splitlines()[-1])
    assert before >= 3 * 3 * 3 and after == before  # a prefill and two advances per span and row tier (1, 4, 5)
