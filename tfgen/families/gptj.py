"""GPT-J (`TFGPTJForCausalLM`, e.g. KoGPT): rotary position embeddings on the first `rotary_dim` features of
queries and keys, attention and MLP in parallel off one LayerNorm, an untied head with a bias."""

import tensorflow as tf
from transformers import GPTJConfig, TFGPTJForCausalLM

from tfgen.families.base import Family
from tfgen.generation import kv_cache
from tfgen.generation.shapes import dims


def rotary_tables(positions, rotary_dim):
    """(sin, cos) [rows, 1, len, rotary_dim], each frequency repeated twice: GPT-J's interleaved layout."""
    inverse_frequency = 1.0 / (10000.0 ** (tf.range(0, rotary_dim, 2, dtype=tf.float32) / rotary_dim))
    # expand_dims, not [..., None]: LiteRT's builtin STRIDED_SLICE cannot add an axis to a tensor of unknown shape.
    angles = tf.expand_dims(tf.cast(positions, tf.float32), -1) * inverse_frequency  # [rows, len, rotary_dim / 2]
    return (
        tf.expand_dims(tf.repeat(tf.sin(angles), 2, axis=-1), 1),
        tf.expand_dims(tf.repeat(tf.cos(angles), 2, axis=-1), 1),
    )


def rotate_every_two(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last axis."""
    pairs = tf.stack([-x[..., 1::2], x[..., ::2]], axis=-1)
    return tf.reshape(pairs, dims(x))


def apply_rotary(x, sin, cos, rotary_dim):
    """x [rows, heads, len, head_dim] with its first rotary_dim features rotated by position."""
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rotated * tf.cast(cos, x.dtype) + rotate_every_two(rotated) * tf.cast(sin, x.dtype)
    return tf.concat([rotated, passed], axis=-1)


class GPTJ(Family):
    model_type = "gptj"
    config_class = GPTJConfig
    transformers_class = TFGPTJForCausalLM
    lora_targets = ("q_proj", "v_proj")
    embedding_layers = (("transformer", "wte"),)
    head_layers = (("", "lm_head"),)

    def embed(self, token_ids, columns):
        main = self.model.transformer
        return tf.cast(tf.gather(main.wte.weight, token_ids), main.compute_dtype)

    def transform(self, h, columns, blocks, cache, attend=kv_cache.attend):
        config = self.config
        rotary_dim = config.rotary_dim or config.n_embd // config.n_head
        sin, cos = rotary_tables(tf.minimum(columns, self.context - 1), rotary_dim)
        new_cache = []
        for block, (cache_k, cache_v) in zip(blocks, cache):
            with self.weights_after(block, h):
                x = block.ln_1(h)
                attn = block.attn
                q, k, v = (
                    kv_cache.split_heads(self.project(projection, x), config.n_head)
                    for projection in (attn.q_proj, attn.k_proj, attn.v_proj)
                )
                q, k = apply_rotary(q, sin, cos, rotary_dim), apply_rotary(k, sin, cos, rotary_dim)
                a, cache_k, cache_v = attend(q, k, v, cache_k, cache_v, columns)
                h = h + self.project(attn.out_proj, a) + self.project(block.mlp, x)
            new_cache.append((cache_k, cache_v))
        return h, new_cache

    def head(self, hidden):
        h = self.model.transformer.ln_f(hidden[:, None])
        with self.weights_after(self.model.lm_head, h):
            return tf.cast(self.project(self.model.lm_head, h)[:, 0], tf.float32)

    def embedding_weights(self):
        return [self.model.transformer.wte.weight]

    def head_weights(self):
        return [*self.model.transformer.ln_f.weights, *self.model.lm_head.weights]
