"""The decode loops: one XLA-compiled program from prompt to finished sequences.

Prompts are left-padded to a bucket of BUCKET tokens and the new-token buffer is
rounded up to one, so prompts of nearby lengths share a compiled program. Every
setting enters the program as a tensor (see `settings_tensors`): changing one
never retraces. A program is chosen by strategy (greedy, sampling, beams and
their count); XLA compiles it once per shape (batch, prompt bucket, new-token buffer).
The programs also trace with unknown batch and prompt length, which is how
the exported SavedModel (tfgen.export) holds them.
"""

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from tfgen.generation import beam_search, kv_cache, processors, sampling
from tfgen.generation.shapes import dims

BUCKET = 32
EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}


def round_up(n, multiple=BUCKET):
    """n rounded up to a multiple (an int, or a scalar tensor)."""
    return -(-n // multiple) * multiple


def left_pad(input_ids, attention_mask, width, pad_token_id):
    """Pads [batch, len] tensors on the left to [batch, width]."""
    paddings = [[0, 0], [width - tf.shape(input_ids)[1], 0]]
    return tf.pad(input_ids, paddings, constant_values=pad_token_id), tf.pad(attention_mask, paddings)


def settings_tensors(options):
    """The runtime settings of one call, as the tensors a compiled program takes.

    A field of `options` may already be a tensor (the exported model's request inputs).
    """
    return {
        "max_new_tokens": tf.cast(options.max_new_tokens, tf.int32),
        "eos_ids": tf.constant(options.eos_token_ids, tf.int32, shape=[len(options.eos_token_ids)]),
        "pad_id": tf.cast(options.pad_token_id, tf.int32),
        "temperature": tf.cast(options.temperature, tf.float32),
        "top_k": tf.cast(options.top_k, tf.int32),
        "top_p": tf.cast(options.top_p, tf.float32),
        "seed": tf.cast(options.seed, tf.int64),
        "repetition_penalty": tf.cast(options.repetition_penalty, tf.float32),
        "no_repeat_ngram_size": tf.cast(options.no_repeat_ngram_size, tf.int32),
        "min_new_steps": tf.cast(options.min_new_steps, tf.int32),
        "length_penalty": tf.cast(options.length_penalty, tf.float32),
        "early_stopping": tf.constant(EARLY_STOPPING_CODES[options.early_stopping], tf.int32),
        **bad_word_tensors(options.bad_words_ids),
    }


def bad_word_tensors(bad_words_ids):
    """Bad words left-aligned in a [n_words, longest] matrix, with their lengths."""
    longest = max((len(word) for word in bad_words_ids), default=1)
    words = np.zeros((len(bad_words_ids), longest), np.int32)
    for row, word in enumerate(bad_words_ids):
        words[row, : len(word)] = word
    return {
        "bad_words": tf.constant(words),
        "bad_word_lengths": tf.constant([len(word) for word in bad_words_ids], tf.int32, shape=[len(bad_words_ids)]),
    }


def program(gpt2, strategy, num_beams=1, num_return_sequences=1):
    """The decode program of a strategy ("greedy", "sample" or "beam"): a function (input_ids, attention_mask, settings) -> dict.

    The prompts come padded to their bucket, with `first_column` and
    `new_token_slots` in the settings (as `decode` passes them). The result
    holds `sequences` [rows, width + new-token buffer], `steps` and
    `token_logprobs`; beam search adds `sequences_scores`.
    """
    if strategy == "beam":
        def beam_program(input_ids, attention_mask, settings):
            new_capacity = dims(settings["new_token_slots"])[0]
            return beam_search.search(gpt2, input_ids, attention_mask, settings, new_capacity, num_beams,
                                      num_return_sequences)
        return beam_program
    do_sample = strategy == "sample"

    def choose(scores, step, settings):
        if not do_sample:
            token = tf.argmax(scores, axis=-1, output_type=tf.int32)
            return token, sampling.chosen_logprob(scores, token)
        scores = sampling.apply_temperature(scores, settings["temperature"])
        seed = tf.stack([settings["seed"], tf.cast(step, tf.int64)])
        return sampling.sample_top_k_top_p(scores, settings["top_k"], settings["top_p"], seed)

    def token_program(input_ids, attention_mask, settings):
        batch, prompt_width = dims(input_ids)
        new_capacity = dims(settings["new_token_slots"])[0]
        pad_id, eos_ids = settings["pad_id"], settings["eos_ids"]
        logits, cache, key_mask, prompt_lengths = kv_cache.prefill(gpt2, input_ids, attention_mask, new_capacity)
        sequence = tf.concat([input_ids, tf.fill([batch, new_capacity], pad_id)], axis=1)
        logprobs = tf.zeros([batch, new_capacity])

        def emit(sequence, logprobs, finished, logits, step):
            length = prompt_width + step
            scores = processors.process(logits, sequence, settings["first_column"], length, step, settings)
            token, logprob = choose(scores, step, settings)
            token = tf.where(finished, pad_id, token)
            sequence = xla.dynamic_update_slice(sequence, token[:, None], [0, length])
            logprobs = xla.dynamic_update_slice(logprobs, tf.where(finished, 0.0, logprob)[:, None], [0, step])
            finished = tf.logical_or(finished, tf.reduce_any(token[:, None] == eos_ids[None, :], axis=1))
            return sequence, logprobs, finished

        state = emit(sequence, logprobs, tf.zeros([batch], tf.bool), logits, tf.constant(0))

        def not_done(step, state, cache):
            return tf.logical_and(step < settings["max_new_tokens"], tf.logical_not(tf.reduce_all(state[2])))

        def advance(step, state, cache):
            logits, cache = kv_cache.step_forward(gpt2, state[0], cache, key_mask, prompt_lengths, prompt_width, step)
            return step + 1, emit(*state, logits, step), cache

        steps, (sequence, logprobs, _), _ = tf.while_loop(not_done, advance, (tf.constant(1), state, cache))
        return {"sequences": sequence, "steps": steps, "token_logprobs": logprobs}

    return token_program


def decode(program, input_ids, attention_mask, settings):
    """Runs a decode program on prompts [batch, len] and `settings_tensors`; returns a dict of tensors.

    Pads the prompts to a bucket and sizes the new-token buffer (the shapes
    the program is compiled for), then cuts the result: `sequences`
    [rows, len + steps], the prompts as given then the new tokens;
    `token_logprobs` [rows, steps]; with beams, `sequences_scores` [rows].
    Runs eagerly (GPT2LM.generate) and in a traced function with unknown
    shapes (the exported model's signatures).
    """
    prompt_width = tf.shape(input_ids)[1]
    width = round_up(prompt_width)
    padded_ids, padded_mask = left_pad(input_ids, attention_mask, width, settings["pad_id"])
    settings = {
        **settings,
        "first_column": width - prompt_width,
        # Its length is the new-token buffer: a shape, so XLA compiles a program per buffer size.
        "new_token_slots": tf.zeros([round_up(settings["max_new_tokens"])], tf.int32),
    }
    out = program(padded_ids, padded_mask, settings)
    steps = out["steps"]
    repeats = tf.shape(out["sequences"])[0] // tf.shape(input_ids)[0]
    new = out["sequences"][:, width: width + steps]
    return {
        **out,
        "sequences": tf.concat([tf.repeat(input_ids, repeats, axis=0), new], axis=1),
        "token_logprobs": out["token_logprobs"][:, :steps],
    }


class Decoder:
    """Compiled decode programs for one TFGPT2LMHeadModel."""

    def __init__(self, gpt2):
        self.gpt2 = gpt2
        self.trace_count = 0
        self._programs = {}

    def __call__(self, input_ids, attention_mask, options):
        """Returns a dict of numpy arrays.

        `sequences` [rows, len + steps]: the prompts as given, then the new
        tokens; `token_logprobs` [rows, steps]: each new token's log-probability
        under the distribution it was chosen from (0 after EOS);
        `sequences_scores` [rows]: beam scores (None without beams). Greedy and
        sampling give one row per input row, beam search num_return_sequences.
        """
        strategy = "beam" if options.num_beams > 1 else "sample" if options.do_sample else "greedy"
        # Greedy and sampling rows arrive already repeated per returned sequence; only beams need the count.
        returned = options.num_return_sequences if strategy == "beam" else 1
        key = (strategy, options.num_beams, returned)
        if key not in self._programs:
            function = tf.function(self._counted(program(self.gpt2, *key)), jit_compile=True)
            # Each prompt bucket and new-token buffer traces once by design; TF would warn of "frequent retracing".
            function._omit_frequent_tracing_warning = True
            self._programs[key] = function
        out = decode(self._programs[key], tf.constant(input_ids), tf.constant(attention_mask), settings_tensors(options))
        return {
            "sequences": out["sequences"].numpy(),
            "token_logprobs": out["token_logprobs"].numpy(),
            "sequences_scores": out["sequences_scores"].numpy() if "sequences_scores" in out else None,
        }

    def _counted(self, function):
        def traced(input_ids, attention_mask, settings):
            self.trace_count += 1
            return function(input_ids, attention_mask, settings)
        return traced
