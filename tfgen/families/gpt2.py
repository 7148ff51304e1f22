"""GPT-2 (`TFGPT2LMHeadModel`): learned positions, fused q/k/v projection (Conv1D), LayerNorm before attention
and before the MLP, head tied to the token embeddings."""

import functools

import tensorflow as tf
from transformers import GPT2Config, TFGPT2LMHeadModel

from tfgen.families.base import Family
from tfgen.generation import kv_cache


class GPT2(Family):
    model_type = "gpt2"
    config_class = GPT2Config
    transformers_class = TFGPT2LMHeadModel
    lora_targets = ("c_attn",)  # the fused q/k/v Conv1D
    embedding_layers = (("transformer", "wte"), ("transformer", "wpe"))
    head_layers = (("transformer", "wte"),)  # tied to the token embeddings

    def embed(self, token_ids, columns):
        main = self.model.transformer
        positions = tf.minimum(columns, self.context - 1)  # columns past the context are never read
        h = tf.gather(main.wte.embeddings, token_ids) + tf.gather(main.wpe.embeddings, positions)
        return tf.cast(h, main.compute_dtype)

    def transform(self, h, columns, blocks, cache, attend=kv_cache.attend):
        n_head = self.config.n_head
        new_cache = []
        for block, (cache_k, cache_v) in zip(blocks, cache):
            with self.weights_after(block, h):
                q, k, v = (
                    kv_cache.split_heads(x, n_head)
                    for x in tf.split(self.project(block.attn.c_attn, block.ln_1(h)), 3, axis=-1)
                )
                a, cache_k, cache_v = attend(q, k, v, cache_k, cache_v, columns)
                h = h + self.project(block.attn.c_proj, a)
                h = h + self.project(functools.partial(block.mlp, training=False), block.ln_2(h))
            new_cache.append((cache_k, cache_v))
        return h, new_cache

    def head(self, hidden):
        main = self.model.transformer
        h = main.ln_f(hidden[:, None])[:, 0]  # the layer was built for [batch, len, width]
        with self.weights_after(main.wte, h):
            logits = tf.matmul(h, tf.cast(main.wte.embeddings, h.dtype), transpose_b=True)
        return tf.cast(logits, tf.float32)

    def embedding_weights(self):
        main = self.model.transformer
        return [main.wte.embeddings, main.wpe.embeddings]

    def head_weights(self):
        main = self.model.transformer
        return [*main.ln_f.weights, main.wte.embeddings]
