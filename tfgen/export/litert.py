"""LiteRT export: GPT-2's prefill and decode steps as one LiteRT (TFLite) model, run by `tfgen.litert.LiteRTLM`.

The directory holds `model.tflite`, the tokenizer files and `litert.json`
(the config the runtime reads, with the row tiers). TensorFlow's converter
turns a tf.Module of signatures into builtin LiteRT ops only, so
`ai-edge-litert` runs it without TensorFlow. Every row has its own prompt
length and position, so ragged prompts decode together; `decode_R` and
`next_token_R` exist for each row tier R (1, 2, 4, ... up to `rows`, static
shapes: the runtime runs the smallest tier that holds its busy rows), and the
converter stores the weights once for all signatures:

- `prefill(input_ids [r, n], lengths [r])` -> `logits` [r, vocab] (at each
  row's last token), `keys`, `values` [layers, r, heads, n, head_dim]: prompts
  right-padded to n, from position 0, each attending to itself only; their
  keys and values, for the runtime's cache.
- `decode_R(token [R, 1], positions [R], key_cache_0, value_cache_0, ...)` ->
  `logits` [R, vocab], `keys`, `values` [layers, R, heads, 1, head_dim]: one
  token per row at its position, attending to its cache row's columns before
  it (each layer's `key_cache_i` and `value_cache_i`, [R, heads, capacity,
  head_dim]) and to itself; its keys and values, which the runtime writes at
  that column.
- `next_token_R(logits, sequence [R, capacity], lengths, steps, temperature,
  top_k, top_p, repetition_penalty, no_repeat_ngram_size, min_new_steps,
  presence_penalty, frequency_penalty (each [R]), logit_bias [R, vocab], uniform [R, 1], eos_ids [e])` -> `token` [R], `logprob` [R]:
  the logits processors of `tfgen.generation.processors` over each row's
  history, then `decode.choose_at`: the argmax where a row's temperature is 0,
  else a top-k / top-p draw at its uniform number (the runtime draws it from
  the row's seeded numpy generator; LiteRT has no stateless RNG).
- `score(input_ids [1, n])` -> `token_logprobs` [1, n - 1].
- `logprobs(input_ids [1, n])` -> `logprobs` [1, n, vocab]: the log-softmax at
  every position (the server's `logprobs` alternatives).

The KV cache belongs to the runtime (numpy arrays it passes to `decode_R`):
the model only reads it, and hands back one column of keys and values per row
and step. A cache held in the model (resource variables) costs more: LiteRT's
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

import tensorflow as tf

from tfgen import checkpoint, scoring
from tfgen.export import quantize as int4
from tfgen.litert import CONFIG_FILE, FORMAT, FORMAT_VERSION, MODEL_FILE
from tfgen.generation import decode, kv_cache, processors
from tfgen.generation.shapes import dims

QUANTIZATIONS = ("int8", "int4", "fp16", "none")
DEFAULT_CAPACITY = 256
DEFAULT_ROWS = 16  # as `tfgen serve --max-batch`'s default


def export_litert(lm, path, quantize="int8", capacity=None, rows=DEFAULT_ROWS):
    """Writes `lm` (a GPT2LM with its tokenizer) as a LiteRT model directory at `path`, atomically; returns `path`.

    quantize: "int8", "int4", "fp16" or "none" (float32 weights); capacity: the most
    tokens a request may use, prompt plus new tokens (default 256, at most the
    model's context); rows: the most rows decoded at once (tiers 1, 2, 4, ...
    up to it). See the module docstring for the files and signatures.
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
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    start = time.perf_counter()
    model = convert(StepModule(lm.net, capacity, row_tiers(rows)), quantize)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": lm.net.model_type,
        "quantize": quantize,
        "capacity": capacity,
        "row_tiers": list(row_tiers(rows)),
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


def row_tiers(rows):
    """The decode row counts of an export that runs up to `rows` rows at once: 1, 2, 4, ... and `rows`."""
    return tuple(sorted({2**i for i in range(rows.bit_length()) if 2**i < rows} | {rows}))


def attend_beside_cache(q, k, v, cache_k, cache_v, columns):
    """Causal attention of each row's queries at its `columns` [rows, n] over the cache's columns before its first
    one and over the new keys k and values v themselves; the cache is only read.

    q, k, v: [rows, heads, n, head_dim]; cache_k, cache_v: [rows, heads,
    capacity, head_dim], or None where no column comes before (prefill).
    Returns (merged output [rows, n, width], k, v): the runtime writes k and v
    into its cache.
    """
    n = dims(q)[2]
    scale = math.sqrt(q.shape[-1])
    causal = tf.range(n)[None, :] <= tf.range(n)[:, None]
    own = tf.where(causal, tf.matmul(q, k, transpose_b=True) / scale, kv_cache.MASKED)  # [rows, heads, n, n]
    if cache_k is None:
        return kv_cache.merge_heads(tf.matmul(tf.nn.softmax(own, axis=-1), v)), k, v
    capacity = cache_k.shape[2]
    # A row's columns from its position on hold stale keys (of its earlier requests, or of its prompt's padding).
    earlier = tf.range(capacity)[None, :] < columns[:, :1]  # [rows, capacity]
    past = tf.where(earlier[:, None, None], tf.matmul(q, cache_k, transpose_b=True) / scale, kv_cache.MASKED)
    weights = tf.nn.softmax(tf.concat([past, own], axis=-1), axis=-1)
    output = tf.matmul(weights[..., :capacity], cache_v) + tf.matmul(weights[..., capacity:], v)
    return kv_cache.merge_heads(output), k, v


def _row_specs(rows, specs):
    """TensorSpecs of [rows, *shape] for each (name, dtype, shape) of `specs`."""
    return [tf.TensorSpec([rows, *shape], dtype, name=name) for name, dtype, shape in specs]


class StepModule(tf.Module):
    """The signatures of the LiteRT model, over the layers of a TFGPT2LMHeadModel: `decode_R` and `next_token_R`
    for each row tier R, one `prefill` and one `score` of any row count and length."""

    def __init__(self, net, capacity, tiers):
        super().__init__(name="tfgen_litert")
        self.net = net
        self.model_weights = list(net.weights)
        config = net.config
        cache_shape = [config.n_head, capacity, config.n_embd // config.n_head]
        cache = [(f"{kind}_cache_{layer}", tf.float32, cache_shape)
                 for layer in range(config.n_layer) for kind in ("key", "value")]
        choice = [("logits", tf.float32, [config.vocab_size]), ("sequence", tf.int32, [capacity]),
                  ("lengths", tf.int32, []), ("steps", tf.int32, []), ("temperature", tf.float32, []),
                  ("top_k", tf.int32, []), ("top_p", tf.float32, []), ("repetition_penalty", tf.float32, []),
                  ("no_repeat_ngram_size", tf.int32, []), ("min_new_steps", tf.int32, []),
                  ("presence_penalty", tf.float32, []), ("frequency_penalty", tf.float32, []),
                  ("logit_bias", tf.float32, [config.vocab_size]), ("uniform", tf.float32, [1])]
        self._signatures = {
            "prefill": tf.function(self._prefill, input_signature=[
                tf.TensorSpec([None, None], tf.int32, name="input_ids"), tf.TensorSpec([None], tf.int32, name="lengths")]),
            "score": tf.function(self._score, input_signature=[tf.TensorSpec([1, None], tf.int32, name="input_ids")]),
            "logprobs": tf.function(self._logprobs,
                                    input_signature=[tf.TensorSpec([1, None], tf.int32, name="input_ids")]),
        }
        for rows in tiers:
            self._signatures[f"decode_{rows}"] = tf.function(self._decode, input_signature=_row_specs(
                rows, [("token", tf.int32, [1]), ("positions", tf.int32, []), *cache]))
            self._signatures[f"next_token_{rows}"] = tf.function(self._next_token, input_signature=[
                *_row_specs(rows, choice), tf.TensorSpec([None], tf.int32, name="eos_ids")])

    def signatures(self):
        return self._signatures

    def _forward(self, token_ids, columns, cache, last):
        # A token's column is its position; `last` [rows]: the column whose logits each row returns.
        hidden, new = self.net.blocks(token_ids, columns, cache, attend=attend_beside_cache)
        return {"logits": self.net.head(tf.gather(hidden, last, batch_dims=1)),
                "keys": tf.stack([k for k, _ in new]), "values": tf.stack([v for _, v in new])}

    def _prefill(self, input_ids, lengths):
        # Prompts right-padded to one width: a row's padding comes after its tokens, so they never attend to it.
        rows, width = dims(input_ids)
        columns = tf.broadcast_to(tf.range(width)[None], [rows, width])
        return self._forward(input_ids, columns, self._no_cache(), lengths - 1)

    def _no_cache(self):
        return [(None, None)] * self.net.config.n_layer

    def _decode(self, token, positions, *cache):
        return self._forward(token, positions[:, None], list(zip(cache[::2], cache[1::2])), tf.zeros_like(positions))

    def _next_token(self, logits, sequence, lengths, steps, temperature, top_k, top_p, repetition_penalty,
                    no_repeat_ngram_size, min_new_steps, presence_penalty, frequency_penalty, logit_bias, uniform,
                    eos_ids):
        settings = {
            "repetition_penalty": repetition_penalty, "no_repeat_ngram_size": no_repeat_ngram_size,
            "eos_ids": eos_ids, "min_new_steps": min_new_steps, "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty, "logit_bias": logit_bias,
            "bad_words": tf.zeros([0, 1], tf.int32), "bad_word_lengths": tf.zeros([0], tf.int32),
        }
        scores = processors.process(logits, sequence, lengths, steps, settings)
        token, logprob = decode.choose_at(scores, temperature, top_k, top_p, uniform)
        return {"token": token, "logprob": logprob}

    def _logits(self, input_ids):
        """[1, n, vocab]: the logits at every position of one text. The family's own blocks, as prefill runs them:
        the wrapped transformers model does not convert to builtin ops for every family (GPT-J's rotary slicing
        needs TF Select)."""
        hidden, _ = self.net.blocks(input_ids, tf.range(tf.shape(input_ids)[1])[None], self._no_cache(),
                                    attend=attend_beside_cache)
        return self.net.head(hidden[0])[None]

    def _score(self, input_ids):
        return {"token_logprobs": scoring.next_token_logprobs(self._logits(input_ids), input_ids)}

    def _logprobs(self, input_ids):
        return {"logprobs": tf.nn.log_softmax(self._logits(input_ids), axis=-1)}
