"""LiteRT export: GPT-2's prefill and decode steps as one LiteRT (TFLite) model, run by `tfgen.litert.LiteRTLM`.

The directory holds `model.tflite`, the tokenizer files and `litert.json`
(the config the runtime reads). TensorFlow's converter turns a tf.Module of
batch-1 signatures into builtin LiteRT ops only, so `ai-edge-litert` runs it
without TensorFlow:

- `prefill(input_ids [1, n])` -> `logits` [1, vocab], `keys`, `values`
  [layers, heads, n, head_dim]: the prompt from position 0, attending to
  itself only; its keys and values, for the runtime's cache.
- `decode(token [1, 1], position [], key_cache_0, value_cache_0, ...)` ->
  `logits`, `keys`, `values` [layers, heads, 1, head_dim]: one token at a
  position, attending to the cache's columns before it (each layer's
  `key_cache_i` and `value_cache_i`, [1, heads, capacity, head_dim]) and to
  itself; its keys and values, which the runtime writes at that column.
- `next_token(logits, sequence [1, capacity], length, step, settings...,
  uniform [1, 1])` -> `token` [1], `logprob` [1]: the logits processors of
  `tfgen.generation.processors` over the token history, then the argmax or
  a temperature / top-k / top-p draw at the given uniform number (the
  runtime draws it from a seeded numpy generator; LiteRT has no stateless RNG).
- `score(input_ids [1, n])` -> `token_logprobs` [1, n - 1].

The KV cache belongs to the runtime (numpy arrays it passes to `decode`):
the model only reads it, and hands back one column of keys and values per
step. A cache held in the model (resource variables) costs more: LiteRT's
READ_VARIABLE and ASSIGN_VARIABLE copy the whole cache on every step, and a
scatter into it rewrites it again (see README, "LiteRT").

Weights: "int8" (dynamic-range quantization: int8 weights, float
activations; XNNPACK's int8 matrix-vector kernels), "int4" (blockwise int4
weights by ai-edge-quantizer, see tfgen.export.quantize), "fp16" (float16
weights, float computation) or "none" (float32).
"""

import json
import math
import tempfile
import time
from pathlib import Path

import tensorflow as tf

from tfgen import checkpoint, scoring
from tfgen.export import quantize as int4
from tfgen.litert import CONFIG_FILE, FORMAT, FORMAT_VERSION, MODEL_FILE
from tfgen.generation import kv_cache, processors, sampling
from tfgen.generation.shapes import dims

QUANTIZATIONS = ("int8", "int4", "fp16", "none")
DEFAULT_CAPACITY = 256


def export_litert(lm, path, quantize="int8", capacity=None):
    """Writes `lm` (a GPT2LM with its tokenizer) as a LiteRT model directory at `path`, atomically; returns `path`.

    quantize: "int8", "int4", "fp16" or "none" (float32 weights); capacity: the most
    tokens a request may use, prompt plus new tokens (default 256, at most the
    model's context). See the module docstring for the files and signatures.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if quantize == "int4":
        int4.require_quantizer()  # before the conversion's minutes
    context = lm.net.context
    capacity = min(DEFAULT_CAPACITY, context) if capacity is None else capacity
    if not isinstance(capacity, int) or not 2 <= capacity <= context:
        raise ValueError(f"capacity must be an integer from 2 to the model's context of {context} tokens, "
                         f"got {capacity!r}")
    start = time.perf_counter()
    model = convert(StepModule(lm.net, capacity), quantize)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": lm.net.model_type,
        "quantize": quantize,
        "capacity": capacity,
        "context": lm.net.context,
        "vocab_size": lm.config.vocab_size,
        "eos_token_id": lm.config.eos_token_id,
        "pad_token_id": lm.config.pad_token_id,
        "conversion_seconds": round(time.perf_counter() - start, 1),
    }
    with checkpoint.atomic_directory(path) as staging:
        (staging / MODEL_FILE).write_bytes(model)
        if lm.tokenizer is not None:  # without one, the runtime generates from ids only
            lm.tokenizer.save_pretrained(staging)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def convert(module, quantize):
    """The LiteRT flatbuffer of a StepModule's signatures, with weights as `quantize` says."""
    if quantize == "int4":
        return int4.quantize_int4(convert(module, "none"))
    with tempfile.TemporaryDirectory() as saved:
        tf.saved_model.save(module, saved, signatures=module.signatures())
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(module.signatures()))
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        return converter.convert()


def _scalar(dtype, name):
    return tf.TensorSpec([], dtype, name=name)


def attend_beside_cache(q, k, v, cache_k, cache_v, columns):
    """Causal attention of queries at `columns` [1, n] over the cache's columns before the first of them and over
    the new keys k and values v themselves; the cache is only read.

    q, k, v: [1, heads, n, head_dim]; cache_k, cache_v: [1, heads, capacity,
    head_dim], or None where no column comes before (prefill). Returns (merged
    output [1, n, width], k, v): the runtime writes k and v into its cache.
    """
    n = dims(q)[2]
    scale = math.sqrt(q.shape[-1])
    causal = tf.range(n)[None, :] <= tf.range(n)[:, None]
    own = tf.where(causal, tf.matmul(q, k, transpose_b=True) / scale, kv_cache.MASKED)  # [1, heads, n, n]
    if cache_k is None:
        return kv_cache.merge_heads(tf.matmul(tf.nn.softmax(own, axis=-1), v)), k, v
    capacity = cache_k.shape[2]
    earlier = tf.range(capacity) < columns[0, 0]  # columns from there on hold stale keys of earlier requests
    past = tf.where(earlier, tf.matmul(q, cache_k, transpose_b=True) / scale, kv_cache.MASKED)
    weights = tf.nn.softmax(tf.concat([past, own], axis=-1), axis=-1)
    output = tf.matmul(weights[..., :capacity], cache_v) + tf.matmul(weights[..., capacity:], v)
    return kv_cache.merge_heads(output), k, v


class StepModule(tf.Module):
    """The batch-1 signatures of the LiteRT model, over the layers of a TFGPT2LMHeadModel."""

    def __init__(self, net, capacity):
        super().__init__(name="tfgen_litert")
        self.net = net
        self.model_weights = list(net.weights)
        config = net.config
        cache_spec = [1, config.n_head, capacity, config.n_embd // config.n_head]
        vocab = config.vocab_size
        self.prefill = tf.function(self._prefill, input_signature=[tf.TensorSpec([1, None], tf.int32, name="input_ids")])
        self.decode = tf.function(self._decode, input_signature=[
            tf.TensorSpec([1, 1], tf.int32, name="token"), _scalar(tf.int32, "position"),
            *(tf.TensorSpec(cache_spec, tf.float32, name=f"{kind}_cache_{layer}")
              for layer in range(config.n_layer) for kind in ("key", "value")),
        ])
        self.next_token = tf.function(self._next_token, input_signature=[
            tf.TensorSpec([1, vocab], tf.float32, name="logits"),
            tf.TensorSpec([1, capacity], tf.int32, name="sequence"),
            _scalar(tf.int32, "length"), _scalar(tf.int32, "step"),
            _scalar(tf.bool, "do_sample"), _scalar(tf.float32, "temperature"), _scalar(tf.int32, "top_k"),
            _scalar(tf.float32, "top_p"), _scalar(tf.float32, "repetition_penalty"),
            _scalar(tf.int32, "no_repeat_ngram_size"), _scalar(tf.int32, "min_new_steps"),
            tf.TensorSpec([None], tf.int32, name="eos_ids"), tf.TensorSpec([1, 1], tf.float32, name="uniform"),
        ])
        self.score = tf.function(self._score, input_signature=[tf.TensorSpec([1, None], tf.int32, name="input_ids")])

    def signatures(self):
        return {"prefill": self.prefill, "decode": self.decode, "next_token": self.next_token, "score": self.score}

    def _forward(self, token_ids, columns, cache):
        # A token's column is its position.
        hidden, new = self.net.blocks(token_ids, columns, cache, attend=attend_beside_cache)
        return {"logits": self.net.head(hidden[:, -1]),
                "keys": tf.stack([k[0] for k, _ in new]), "values": tf.stack([v[0] for _, v in new])}

    def _prefill(self, input_ids):
        return self._forward(input_ids, tf.range(tf.shape(input_ids)[1])[None], self._no_cache())

    def _no_cache(self):
        return [(None, None)] * self.net.config.n_layer

    def _decode(self, token, position, *cache):
        return self._forward(token, position[None, None], list(zip(cache[::2], cache[1::2])))

    def _next_token(self, logits, sequence, length, step, do_sample, temperature, top_k, top_p, repetition_penalty,
                    no_repeat_ngram_size, min_new_steps, eos_ids, uniform):
        settings = {
            "repetition_penalty": repetition_penalty, "no_repeat_ngram_size": no_repeat_ngram_size,
            "eos_ids": eos_ids, "min_new_steps": min_new_steps,
            "bad_words": tf.zeros([0, 1], tf.int32), "bad_word_lengths": tf.zeros([0], tf.int32),
        }
        scores = processors.process(logits, sequence, length, step, settings)

        def greedy():
            token = tf.argmax(scores, axis=-1, output_type=tf.int32)
            return token, sampling.chosen_logprob(scores, token)

        def sample():
            warped = sampling.apply_temperature(scores, temperature)
            return sampling.sample_top_k_top_p_at(warped, top_k, top_p, uniform)

        token, logprob = tf.cond(do_sample, sample, greedy)
        return {"token": token, "logprob": logprob}

    def _score(self, input_ids):
        # The family's own blocks, as prefill runs them: the wrapped transformers model does not convert to builtin
        # ops for every family (GPT-J's rotary slicing needs TF Select).
        hidden, _ = self.net.blocks(input_ids, tf.range(tf.shape(input_ids)[1])[None], self._no_cache(),
                                    attend=attend_beside_cache)
        logits = self.net.head(hidden[0])[None]
        return {"token_logprobs": scoring.next_token_logprobs(logits, input_ids)}
