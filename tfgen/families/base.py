"""The interface of a model family: what decoding, scoring, training and export need from an architecture."""

import contextlib
import json

import tensorflow as tf

from tfgen.generation import kv_cache

MATRIX_NAMES = ("kernel", "weight", "embeddings")  # a Keras Dense's matrix, a transformers Conv1D's, an Embedding's


def read_after(variable, tensor):
    """`variable`'s value, made to depend on `tensor`, so XLA cannot compute anything from it before `tensor` is known.

    Why: XLA's CPU backend computes bfloat16 and float16 in float32, converting
    each weight before use, and would schedule every layer's converts together:
    a float32 copy of the whole model, three times the weights' memory (a 6 B model
    in bfloat16 would need 37 GB). A block's weights read after its input are
    converted as the block runs, one block at a time (tfgen._env also keeps XLA
    from hoisting them out of the decode loop). The dependency is an OR of a zero
    into the weight's bits: an integer op, which XLA does not widen to float32.
    """
    first = tf.reshape(tensor, [-1])[0]
    if first.dtype.is_floating:
        first = tf.bitcast(first, {2: tf.int16, 4: tf.int32}[first.dtype.size])
    zero = tf.cast(tf.bitwise.bitwise_or(first, tf.ones_like(first)) == 0, tf.uint16)  # never true: x | 1 != 0
    return tf.bitcast(tf.bitwise.bitwise_or(tf.bitcast(variable, tf.uint16), zero), variable.dtype)


@contextlib.contextmanager
def matrices_read_after(layer, hidden):
    """Inside, the matrices of `layer` and its sublayers (bfloat16 or float16, or a mixed policy's float32 ones) are read
    through `read_after`, in the layer's compute dtype."""
    swapped = [
        (owner, name, getattr(owner, name))
        for owner in (layer, *layer.submodules)
        if isinstance(owner, tf.keras.layers.Layer)
        for name in MATRIX_NAMES
        if isinstance(getattr(owner, name, None), tf.Variable)
    ]
    try:
        for owner, name, variable in swapped:
            # Past Keras' tracking: a value, for now. Cast as Keras casts a variable for a mixed policy's layer
            # (float32 weights, bfloat16 or float16 compute), which it does not do for a tensor.
            value = tf.cast(read_after(variable, hidden), owner.compute_dtype)
            object.__setattr__(owner, name, value)
        yield
    finally:
        for owner, name, variable in swapped:
            object.__setattr__(owner, name, variable)


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
    # The layers `embed` and `head` read, as (owner attribute, name) of the transformers model ("": the model).
    embedding_layers: tuple = ()
    head_layers: tuple = ()

    def __init__(self, model):
        self.model = model
        self.adapters = None  # the `lora.Adapters` once LoRA is enabled

    @classmethod
    def build(cls, config, unbuilt=(), zeros=False):
        """A fresh transformers model of this family, its weights created (in the global dtype policy), but for the
        layers named in `unbuilt` ((owner, name) pairs as `embedding_layers` gives them), which transformers' build
        skips once they are None. `zeros`: Keras layers' matrices start at zero, for weights read from a checkpoint
        next (a random normal draw of a 64512 x 2048 matrix takes three times its memory)."""
        model = cls.transformers_class(config)
        for owner, name in unbuilt:
            setattr(getattr(model, owner) if owner else model, name, None)
        for layer in model.submodules if zeros else ():
            for initializer in ("kernel_initializer", "embeddings_initializer"):
                if hasattr(layer, initializer):
                    setattr(layer, initializer, tf.keras.initializers.Zeros())
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

    def project(self, layer, x):
        """`layer(x)` for x [rows, len, width]. In low precision one row and one column runs as two rows (the second
        a copy, dropped after).

        Why: XLA's CPU backend computes a bfloat16 or float16 vector-matrix product ([1, in] x [in, out]) more than
        10x slower than a product of two rows (measured 2026-12-03 on an AVX-512 AMD EPYC: 8 products of
        [in 2048, out 8192] in bfloat16 took about 700 ms at one row and 44 ms at two; fp32 at one row 15 ms).
        """
        if self.compute_dtype == tf.float32 or tuple(x.shape[:2]) != (1, 1):
            return layer(x)
        return layer(tf.concat([x, x], axis=0))[:1]

    def weights_after(self, layer, hidden):
        """The context the blocks and head run `layer` in: none in a float32 model, else `matrices_read_after`."""
        if self.compute_dtype == tf.float32:
            return contextlib.nullcontext()
        return matrices_read_after(layer, hidden)

    @property
    def weights(self):
        """The variables the forward pieces read: the wrapped model's, then the LoRA adapters' once enabled."""
        return self.model.weights + (self.adapters.weights if self.adapters is not None else [])

    def trace_description(self):
        """What the traced programs depend on beyond the variables' shapes: the family, its config, the compute
        dtype and the LoRA settings (see `tfgen.generation.program_store`)."""
        adapters = self.adapters
        lora = None if adapters is None else [adapters.rank, adapters.alpha, adapters.module_names]
        return json.dumps(
            [type(self).__name__, self.config.to_dict(), self.compute_dtype, lora], default=str, sort_keys=True
        )

    def empty_cache(self, rows, capacity):
        return kv_cache.empty_cache(self.config, rows, capacity, self.compute_dtype)

    def logits(self, input_ids, attention_mask, training):
        """Float32 logits [batch, len, vocab] of the wrapped model (positions from a left-padded mask)."""
        if attention_mask is None:
            return tf.cast(self.model(input_ids, training=training).logits, tf.float32)
        logits = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=kv_cache.positions_from_mask(tf.cast(attention_mask, tf.int32)),
            training=training,
        ).logits
        return tf.cast(logits, tf.float32)

    def blocks(self, token_ids, columns, cache, attend=kv_cache.attend):
        """(hidden states [rows, len, width], updated cache) of `token_ids` [rows, len] at `columns` [rows, len].

        `attend(q, k, v, cache_k, cache_v, columns)` -> (output, cache_k, cache_v) is each layer's attention over
        its cache entry: `kv_cache.attend` writes the new keys and values into the cache; the LiteRT export passes
        its own, which leaves the cache to the runtime and returns the new keys and values in its place.
        """
        return self.transform(self.embed(token_ids, columns), columns, self.model.transformer.h, cache, attend)

    def embed(self, token_ids, columns):
        """The hidden states [rows, len, width] the first block takes, of `token_ids` at `columns` [rows, len]."""
        raise NotImplementedError

    def transform(self, hidden, columns, blocks, cache, attend=kv_cache.attend):
        """`blocks` (a run of the model's transformer blocks, e.g. a LiteRT export's part) over `hidden` at `columns`,
        each with its (keys, values) entry of `cache`: (hidden states, updated cache), as `blocks` returns them."""
        raise NotImplementedError

    def head(self, hidden):
        """Float32 next-token logits [rows, vocab] from hidden states [rows, width]."""
        raise NotImplementedError

    def embedding_weights(self):
        """The variables `embed` reads."""
        raise NotImplementedError

    def head_weights(self):
        """The variables `head` reads."""
        raise NotImplementedError

    def lora_layers(self):
        """The `lora_targets` layers of every block, block after block."""
        return [getattr(block.attn, name) for block in self.model.transformer.h for name in self.lora_targets]
