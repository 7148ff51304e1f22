"""The interface of a model family: what decoding, scoring, training and export need from an architecture."""

import tensorflow as tf

from tfgen.generation import kv_cache


class Family:
    """One architecture, on the layers (and so the weights) of a wrapped transformers TF model.

    A subclass names its `model_type` (config.json's), `config_class` and
    `transformers_class`, and gives the two forward pieces decoding runs over
    the KV cache: `blocks` (embeddings and transformer blocks for tokens at
    given buffer columns of each row, keys and values written into the cache)
    and `head` (logits), and names its `lora_targets` (the attention projections LoRA adapts).
    Weight names follow transformers' TF <-> PyTorch convention (see
    `checkpoint.pytorch_name`), which both families keep.
    """

    model_type = None
    config_class = None
    transformers_class = None
    lora_targets = ()  # the attention projections of each block that LoRA adapts: PEFT's defaults for the family

    def __init__(self, model):
        self.model = model
        self.adapters = None  # the `lora.Adapters` once LoRA is enabled

    @classmethod
    def build(cls, config):
        """A fresh transformers model of this family, its weights created (in the global dtype policy)."""
        model = cls.transformers_class(config)
        # Built in its own name scope, its weights get the names transformers' h5 loader expects.
        model.build_in_name_scope()
        return model

    @property
    def config(self):
        return self.model.config

    @property
    def context(self):
        """The most tokens (prompt + new) a sequence may hold."""
        return self.config.n_positions

    @property
    def compute_dtype(self):
        return self.model.transformer.compute_dtype

    @property
    def weights(self):
        """The variables the forward pieces read: the wrapped model's, then the LoRA adapters' once enabled."""
        return self.model.weights + (self.adapters.weights if self.adapters is not None else [])

    def empty_cache(self, rows, capacity):
        return kv_cache.empty_cache(self.config, rows, capacity, self.compute_dtype)

    def logits(self, input_ids, attention_mask, training):
        """Float32 logits [batch, len, vocab] of the wrapped model (positions from a left-padded mask)."""
        if attention_mask is None:
            return tf.cast(self.model(input_ids, training=training).logits, tf.float32)
        logits = self.model(input_ids, attention_mask=attention_mask,
                            position_ids=kv_cache.positions_from_mask(tf.cast(attention_mask, tf.int32)),
                            training=training).logits
        return tf.cast(logits, tf.float32)

    def blocks(self, token_ids, columns, cache, attend=kv_cache.attend):
        """(hidden states [rows, len, width], updated cache) of `token_ids` [rows, len] at `columns` [rows, len].

        `attend(q, k, v, cache_k, cache_v, columns)` -> (output, cache_k, cache_v) is each layer's attention over
        its cache entry: `kv_cache.attend` writes the new keys and values into the cache; the LiteRT export passes
        its own, which leaves the cache to the runtime and returns the new keys and values in its place.
        """
        raise NotImplementedError

    def head(self, hidden):
        """Float32 next-token logits [rows, vocab] from hidden states [rows, width]."""
        raise NotImplementedError

    def lora_layers(self):
        """The `lora_targets` layers of every block, block after block."""
        return [getattr(block.attn, name) for block in self.model.transformer.h for name in self.lora_targets]
