"""The decode loops: one XLA-compiled program from prompt to finished sequences.

Prompts are left-padded to a bucket of BUCKET tokens and the new-token buffer is
rounded up to one, so prompts of nearby lengths share a compiled program. Every
setting enters the program as a tensor (see `settings_tensors`): changing one
never retraces. A program is chosen by (strategy, new-token buffer, beams).
"""

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from tfgen.generation import beam_search, kv_cache, processors, sampling

BUCKET = 32
EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}


def round_up(n, multiple=BUCKET):
    return -(-n // multiple) * multiple


def left_pad(input_ids, attention_mask, width, pad_token_id):
    """Pads [batch, len] arrays on the left to [batch, width]."""
    extra = width - input_ids.shape[1]
    return (
        np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=pad_token_id),
        np.pad(attention_mask, ((0, 0), (extra, 0)), constant_values=0),
    )


def settings_tensors(options, first_column):
    """The runtime settings of one call, as the tensors a compiled program takes."""
    return {
        "first_column": tf.constant(first_column, tf.int32),
        "max_new_tokens": tf.constant(options.max_new_tokens, tf.int32),
        "eos_ids": tf.constant(options.eos_token_ids, tf.int32, shape=[len(options.eos_token_ids)]),
        "pad_id": tf.constant(options.pad_token_id, tf.int32),
        "temperature": tf.constant(options.temperature, tf.float32),
        "top_k": tf.constant(options.top_k, tf.int32),
        "top_p": tf.constant(options.top_p, tf.float32),
        "seed": tf.constant(options.seed, tf.int64),
        "repetition_penalty": tf.constant(options.repetition_penalty, tf.float32),
        "no_repeat_ngram_size": tf.constant(options.no_repeat_ngram_size, tf.int32),
        "min_new_steps": tf.constant(options.min_new_steps, tf.int32),
        "length_penalty": tf.constant(options.length_penalty, tf.float32),
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
        prompt_width = input_ids.shape[1]
        padded_ids, padded_mask = left_pad(input_ids, attention_mask, round_up(prompt_width), options.pad_token_id)
        new_capacity = round_up(options.max_new_tokens)
        strategy = "beam" if options.num_beams > 1 else "sample" if options.do_sample else "greedy"
        # Greedy and sampling rows arrive already repeated per returned sequence; only beams need the count.
        returned = options.num_return_sequences if strategy == "beam" else 1
        key = (strategy, new_capacity, options.num_beams, returned)
        if key not in self._programs:
            self._programs[key] = tf.function(self._program(*key), jit_compile=True)
        settings = settings_tensors(options, padded_ids.shape[1] - prompt_width)
        out = self._programs[key](tf.constant(padded_ids), tf.constant(padded_mask), settings)
        steps = int(out["steps"])
        prompt_columns = np.repeat(input_ids, len(out["sequences"]) // len(input_ids), axis=0)
        new = out["sequences"].numpy()[:, padded_ids.shape[1]: padded_ids.shape[1] + steps]
        return {
            "sequences": np.concatenate([prompt_columns, new], axis=1).astype(np.int32),
            "token_logprobs": out["token_logprobs"].numpy()[:, :steps],
            "sequences_scores": out["sequences_scores"].numpy() if "sequences_scores" in out else None,
        }

    def _program(self, strategy, new_capacity, num_beams, num_return_sequences):
        gpt2 = self.gpt2
        if strategy == "beam":
            def program(input_ids, attention_mask, settings):
                self.trace_count += 1
                return beam_search.search(gpt2, input_ids, attention_mask, settings, new_capacity, num_beams,
                                          num_return_sequences)
            return program
        do_sample = strategy == "sample"

        def choose(scores, step, settings):
            if not do_sample:
                token = tf.argmax(scores, axis=-1, output_type=tf.int32)
                return token, sampling.chosen_logprob(scores, token)
            scores = sampling.apply_temperature(scores, settings["temperature"])
            seed = tf.stack([settings["seed"], tf.cast(step, tf.int64)])
            return sampling.sample_top_k_top_p(scores, settings["top_k"], settings["top_p"], seed)

        def program(input_ids, attention_mask, settings):
            self.trace_count += 1
            batch, prompt_width = input_ids.shape
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

        return program
