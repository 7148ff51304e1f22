"""Streaming: transformers' streamer protocol fed by generate, stream_text's pieces, `tfgen generate --stream`."""

import threading

import numpy as np
import pytest
from transformers import TextIteratorStreamer, TextStreamer
from transformers.generation.streamers import BaseStreamer

from tfgen.cli import main

# Korean prompts with characters the tiny SentencePiece model spells in byte pieces (emoji, a rare syllable).
PROMPTS = ["이때 😀", "근육이 커지기 위해서는 🎉", "똠양꿍 맛집"]
GREEDY = dict(max_new_tokens=16)
SAMPLING = dict(max_new_tokens=16, do_sample=True, seed=5, top_k=0, temperature=1.5)
EVERY_PROCESSOR = dict(
    max_new_tokens=16,
    do_sample=True,
    seed=2,
    top_k=20,
    top_p=0.9,
    repetition_penalty=1.3,
    no_repeat_ngram_size=2,
    min_new_tokens=10,
    bad_words_ids=[[7], [11, 12]],
)


class Collecting(BaseStreamer):
    """Records every put and the end, as transformers' protocol defines them."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(np.asarray(value))

    def end(self):
        self.ended = True


def test_byte_fallback_characters_are_spelled_with_byte_pieces(tiny_lm):
    for prompt in PROMPTS:
        pieces = [tiny_lm.tokenizer.id_to_token(i) for i in tiny_lm.tokenizer.encode(prompt)]
        assert any(piece.startswith("<0x") for piece in pieces), pieces


@pytest.mark.parametrize("settings", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_text_iterator_streamer_yields_what_generate_text_returns(tiny_lm, settings):
    for prompt in PROMPTS:
        streamer = TextIteratorStreamer(tiny_lm.tokenizer, timeout=600)
        ids = [tiny_lm.tokenizer.encode(prompt)]
        thread = threading.Thread(target=tiny_lm.generate, args=(ids,), kwargs=dict(streamer=streamer, **settings))
        thread.start()
        streamed = "".join(streamer)
        thread.join()
        assert streamed == tiny_lm.generate_text(prompt, **settings)


def test_text_streamer_prints_the_text(tiny_lm, capsys):
    prompt = PROMPTS[1]
    tiny_lm.generate([tiny_lm.tokenizer.encode(prompt)], streamer=TextStreamer(tiny_lm.tokenizer), **GREEDY)
    assert capsys.readouterr().out == tiny_lm.generate_text(prompt, **GREEDY) + "\n"


@pytest.mark.parametrize("settings", [GREEDY, SAMPLING, EVERY_PROCESSOR], ids=["greedy", "sampling", "processors"])
def test_streamed_tokens_are_the_tokens_generated_without_a_streamer(tiny_lm, settings):
    ids, mask = tiny_lm.tokenizer.encode_batch(PROMPTS)
    streamer = Collecting()
    streamed = tiny_lm.generate(ids, mask, streamer=streamer, **settings).numpy()
    np.testing.assert_array_equal(streamed, tiny_lm.generate(ids, mask, **settings).numpy())
    np.testing.assert_array_equal(streamer.puts[0], ids)  # the prompts once, then one [rows] array per step
    assert streamer.ended and all(put.shape == (len(PROMPTS),) for put in streamer.puts[1:])
    np.testing.assert_array_equal(np.stack(streamer.puts[1:], axis=1), streamed[:, ids.shape[1] :])


def test_a_streamer_with_beam_search_is_a_clear_error(tiny_lm):
    with pytest.raises(ValueError, match="streamer cannot be used with beam search"):
        tiny_lm.generate([tiny_lm.tokenizer.encode("이때")], max_new_tokens=4, num_beams=2, streamer=Collecting())


@pytest.mark.parametrize("settings", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_stream_text_pieces_join_to_generate_texts_new_text(tiny_lm, settings):
    for prompt in PROMPTS:
        pieces = list(tiny_lm.stream_text(prompt, **settings))
        assert len(pieces) > 1 and all(pieces)
        assert "".join(pieces) == tiny_lm.generate_text(prompt, return_full_text=False, **settings)
        full = list(tiny_lm.stream_text(prompt, return_full_text=True, **settings))
        assert "".join(full) == tiny_lm.generate_text(prompt, **settings)


def test_stream_text_never_sends_part_of_a_character(tiny_lm):
    """Token by token through a text whose emoji and rare syllables are several byte pieces each."""
    tokenizer = tiny_lm.tokenizer
    prompt_ids = tokenizer.encode("이때")
    new_ids = tokenizer.encode(" 😀 똠양꿍 🎉 맛집", add_special_tokens=False)
    assert sum(tokenizer.id_to_token(i).startswith("<0x") for i in new_ids) >= 8
    prompt_text = tokenizer.decode(prompt_ids)
    pieces = list(tokenizer.text_pieces(prompt_ids, ([token] for token in new_ids), set(), prompt_text))
    assert "".join(pieces) == tokenizer.decode(prompt_ids + new_ids)[len(prompt_text) :]
    assert not any("\ufffd" in piece for piece in pieces)
    assert {"😀", "🎉"} <= {char for piece in pieces for char in piece}


def test_stream_text_refuses_what_it_cannot_stream(tiny_lm):
    with pytest.raises(ValueError, match="one sequence without beams"):
        tiny_lm.stream_text("이때", num_beams=2)
    with pytest.raises(ValueError, match="one prompt string"):
        tiny_lm.stream_text(["이때"])


# Sampled rows depend on the batch they are drawn in, and --stream decodes one prompt at a time: one prompt there.
@pytest.mark.parametrize(
    "prompts, flags",
    [
        (PROMPTS[:2], ["--max-new-tokens", "12"]),
        (PROMPTS[1:2], ["--max-new-tokens", "12", "--do-sample", "--seed", "4"]),
    ],
    ids=["greedy", "sampling"],
)
def test_cli_stream_prints_what_the_plain_output_prints(tiny_lm_dir, capsys, prompts, flags):
    argv = ["generate", *prompts, "--model", str(tiny_lm_dir), *flags]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--stream"]) == 0
    assert capsys.readouterr().out == plain


def test_cli_stream_with_beams_or_json_exits_2(tiny_lm_dir, capsys):
    for extra in (["--num-beams", "2"], ["--json"]):
        assert main(["generate", "이때", "--model", str(tiny_lm_dir), "--stream", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--stream" in err


def test_a_generation_paused_in_another_thread_keeps_its_own_state(tiny_lm):
    """A streamed generate (as TextIteratorStreamer runs it, in a thread) and another generate of the same
    shape at the same time: each gets the tokens it gets alone."""
    tokenizer = tiny_lm.tokenizer
    ids, other = [tokenizer.encode(PROMPTS[0])], [tokenizer.encode(PROMPTS[2])]
    expected, other_expected = (tiny_lm.generate(prompt, **GREEDY).numpy() for prompt in (ids, other))
    arrived, release = threading.Event(), threading.Event()

    class Pausing(Collecting):
        def put(self, value):
            super().put(value)
            if len(self.puts) == 2:  # the first new token: hold the generation half-way
                arrived.set()
                release.wait(600)

    result = {}
    thread = threading.Thread(
        target=lambda: result.update(out=tiny_lm.generate(ids, streamer=Pausing(), **GREEDY).numpy())
    )
    thread.start()
    assert arrived.wait(600)
    np.testing.assert_array_equal(tiny_lm.generate(other, **GREEDY).numpy(), other_expected)
    release.set()
    thread.join()
    np.testing.assert_array_equal(result["out"], expected)
