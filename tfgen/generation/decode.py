"""The decode loop: one XLA-compiled program from prompt to finished sequences.

Prompts are left-padded to a bucket of BUCKET tokens and the new-token buffer is
rounded up to one, so prompts of nearby lengths share a compiled program. Every
sampling setting enters the program as a tensor: changing one never retraces.
"""

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from tfgen.generation import kv_cache, sampling

BUCKET = 32


def round_up(n, multiple=BUCKET):
    return -(-n // multiple) * multiple


def left_pad(input_ids, attention_mask, width, pad_token_id):
    """Pads [batch, len] arrays on the left to [batch, width]."""
    extra = width - input_ids.shape[1]
    return (
        np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=pad_token_id),
        np.pad(attention_mask, ((0, 0), (extra, 0)), constant_values=0),
    )


class Decoder:
    """Compiled decode programs for one TFGPT2LMHeadModel, one per (greedy or sampling, buffer size)."""

    def __init__(self, gpt2):
        self.gpt2 = gpt2
        self.trace_count = 0
        self._programs = {}

    def __call__(self, input_ids, attention_mask, options):
        """Returns [batch, len + steps] int32: the prompts as given, then the new tokens."""
        prompt_width = input_ids.shape[1]
        padded_ids, padded_mask = left_pad(input_ids, attention_mask, round_up(prompt_width), options.pad_token_id)
        new_capacity = round_up(options.max_new_tokens)
        key = (options.do_sample, new_capacity)
        if key not in self._programs:
            self._programs[key] = tf.function(self._decode_program(*key), jit_compile=True)
        tokens, steps = self._programs[key](
            tf.constant(padded_ids, tf.int32),
            tf.constant(padded_mask, tf.int32),
            tf.constant(options.max_new_tokens, tf.int32),
            tf.constant(options.eos_token_ids, tf.int32, shape=[len(options.eos_token_ids)]),
            tf.constant(options.pad_token_id, tf.int32),
            tf.constant(options.temperature, tf.float32),
            tf.constant(options.top_k, tf.int32),
            tf.constant(options.top_p, tf.float32),
            tf.constant(options.seed, tf.int64),
        )
        return np.concatenate([input_ids, tokens.numpy()[:, : int(steps)]], axis=1).astype(np.int32)

    def _decode_program(self, do_sample, new_capacity):
        gpt2 = self.gpt2

        def choose(logits, step, temperature, top_k, top_p, seed):
            if not do_sample:
                return tf.argmax(logits, axis=-1, output_type=tf.int32)
            logits = sampling.apply_temperature(logits, temperature)
            return sampling.sample_top_k_top_p(logits, top_k, top_p, tf.stack([seed, tf.cast(step, tf.int64)]))

        def decode(input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, temperature, top_k, top_p, seed):
            self.trace_count += 1
            batch, prompt_width = input_ids.shape
            key_mask = tf.concat([attention_mask > 0, tf.ones([batch, new_capacity], tf.bool)], axis=1)
            prompt_lengths = tf.reduce_sum(attention_mask, axis=1)
            cache = kv_cache.empty_cache(gpt2.config, batch, prompt_width + new_capacity)
            logits, cache = kv_cache.forward(
                gpt2, input_ids, kv_cache.positions_from_mask(attention_mask), cache, 0, key_mask
            )

            def emit(tokens, finished, logits, step):
                token = choose(logits, step, temperature, top_k, top_p, seed)
                token = tf.where(finished, pad_id, token)
                tokens = xla.dynamic_update_slice(tokens, token[:, None], [0, step])
                finished = tf.logical_or(finished, tf.reduce_any(token[:, None] == eos_ids[None, :], axis=1))
                return tokens, finished

            tokens, finished = emit(
                tf.fill([batch, new_capacity], pad_id), tf.zeros([batch], tf.bool), logits, tf.constant(0)
            )

            def not_done(step, tokens, finished, cache):
                return tf.logical_and(step < max_new_tokens, tf.logical_not(tf.reduce_all(finished)))

            def advance(step, tokens, finished, cache):
                last = tf.gather(tokens, step - 1, axis=1)[:, None]
                positions = (prompt_lengths + step - 1)[:, None]
                logits, cache = kv_cache.forward(gpt2, last, positions, cache, prompt_width + step - 1, key_mask)
                tokens, finished = emit(tokens, finished, logits, step)
                return step + 1, tokens, finished, cache

            steps, tokens, _, _ = tf.while_loop(not_done, advance, (tf.constant(1), tokens, finished, cache))
            return tokens, steps

        return decode
