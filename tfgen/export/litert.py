"""LiteRT export: a GPT-2 or GPT-J model's decode steps as LiteRT (TFLite) models, run by `tfgen.litert.LiteRTLM`.

The directory holds the model's parts (`model.tflite`, or `part_0.tflite`,
`part_1.tflite`, ... for a model cut into parts: see `tfgen.export.parts`),
the tokenizer files and `litert.json` (the config the runtime reads: the
parts' layers, the row tiers, the capacity and the chunk). TensorFlow's
converter turns each part's tf.Module of signatures into builtin LiteRT ops
only, so `ai-edge-litert` runs it without TensorFlow, and stores its weights
once for all its signatures. Every shape is static, so a LiteRT
CompiledModel runs every signature over the runtime's own arrays (zero-copy).
A part takes token ids (the first part) or the hidden states of the part
before it, and gives hidden states, or the logits (the last part):

- `extend(token [1, chunk] or hidden [1, chunk, width], positions [1],
  key_cache_0, value_cache_0, ...)` -> `hidden` [1, chunk, width] or
  `logits` [chunk, vocab], `keys`, `values` [layers, 1, heads, chunk,
  head_dim]: one row's `chunk` tokens from column `positions` on, each
  attending to the cache's columns before the first and to the chunk's
  tokens up to itself; a prompt is prefilled (and a text scored) chunk by
  chunk, its tail padded on the right.
- `decode_R(token [R, 1] or hidden [R, 1, width], positions [R], caches)` ->
  `hidden` or `logits` [R, vocab], `keys`, `values` [layers, R, heads, 1,
  head_dim]: one token per row at its own position, for each row tier R (1,
  2, 4, ... up to `rows`: the runtime runs the smallest tier that holds its
  busy rows).
- `next_token_R(logits, sequence [R, capacity], lengths, steps, temperature,
  top_k, top_p, repetition_penalty, no_repeat_ngram_size, min_new_steps,
  presence_penalty, frequency_penalty (each [R]), logit_bias [R, vocab],
  uniform [R, 1], eos_ids [MAX_EOS_IDS])` -> `token` [R], `logprob` [R], in
  the last part: the logits processors of `tfgen.generation.processors` over
  each row's history, then `decode.choose_at`: the argmax where a row's
  temperature is 0, else a top-k / top-p draw at its uniform number (the
  runtime draws it from the row's seeded numpy generator; LiteRT has no
  stateless RNG). `eos_ids` is padded with -1.

Caches are [1 or R, heads, capacity, head_dim] per layer of the part. The KV
cache belongs to the runtime (numpy arrays it passes in place): the model only
reads it, and hands back the new columns of keys and values. A cache held in
the model (resource variables) costs more: LiteRT's READ_VARIABLE and
ASSIGN_VARIABLE copy the whole cache on every step.

Weights: "int8" (dynamic-range quantization: int8 weights, float
activations; XNNPACK's int8 matrix-vector kernels), "int4" (blockwise int4
weights by ai-edge-quantizer, see tfgen.export.quantize), "fp16" (float16
weights, float computation) or "none" (float32).
"""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import tensorflow as tf

from tfgen import checkpoint, families
from tfgen.export import parts as model_parts
from tfgen.export import quantize as int4
from tfgen.families.base import Family
from tfgen.generation import decode, kv_cache, processors
from tfgen.generation.shapes import dims
from tfgen.litert import CONFIG_FILE, FORMAT, FORMAT_VERSION, MODEL_FILE
from tfgen.litert_rows import MAX_EOS_IDS
from tfgen.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tfgen.model import CausalLM

QUANTIZATIONS = ("int8", "int4", "fp16", "none")
DEFAULT_CAPACITY = 256
DEFAULT_ROWS = 16  # as `tfgen serve --max-batch`'s default
DEFAULT_CHUNK = 32  # prompt tokens per `extend` call


def export_litert(
    model: CausalLM | str | os.PathLike[str],
    path: str | os.PathLike[str],
    quantize: str = "int8",
    capacity: int | None = None,
    rows: int | Sequence[int] = DEFAULT_ROWS,
    chunk: int = DEFAULT_CHUNK,
    part_bytes: int | None = model_parts.PART_BYTES,
) -> str | os.PathLike[str]:
    """Writes a model as a LiteRT model directory at `path`, atomically; returns `path`.

    model: a `CausalLM` (GPT2LM or GPTJLM, with its tokenizer), or a checkpoint
    directory (or hub id), which is read part by part, so a model bigger than
    memory in float32 exports (with TF_ENABLE_ONEDNN_OPTS=0 set before
    TensorFlow starts, as `tfgen export` sets it, the memory of each part is
    given back before the next). quantize: "int8", "int4", "fp16" or "none"
    (float32 weights); capacity: the most tokens a request may use, prompt
    plus new tokens (default 256, at most the model's context); rows: the most
    rows decoded at once (tiers 1, 2, 4, ... up to it), or a list of the row
    tiers to export (a big model, whose step costs about the same for 1 row
    as for 8, converts faster with one tier, e.g. [8]); chunk: the prompt
    tokens one `extend` call takes; part_bytes: the float32 weights of one part
    (None: one part). See the module docstring for the files and signatures.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if quantize == "int4":
        int4.require_quantizer()  # before the conversion's minutes
    family, config, tokenizer, layers_of = _source(model)
    context = config.n_positions
    capacity = min(DEFAULT_CAPACITY, context) if capacity is None else capacity
    if not isinstance(capacity, int) or not 2 <= capacity <= context:
        raise ValueError(
            f"capacity must be an integer from 2 to the model's context of {context} tokens, got {capacity!r}"
        )
    tiers = row_tiers(rows) if isinstance(rows, int) else tuple(sorted(set(rows)))
    if not tiers or not all(isinstance(tier, int) and tier >= 1 for tier in tiers):
        raise ValueError(f"rows must be a positive integer or a list of them, got {rows!r}")
    if not isinstance(chunk, int) or not 1 <= chunk <= capacity:
        raise ValueError(f"chunk must be an integer from 1 to the capacity of {capacity} tokens, got {chunk!r}")
    start = time.perf_counter()
    plan = model_parts.plan(config, part_bytes)
    files = [MODEL_FILE] if len(plan) == 1 else [f"part_{index}.tflite" for index in range(len(plan))]
    with checkpoint.atomic_directory(path) as staging:
        for part, file in zip(plan, files):  # one part in memory at a time
            with tempfile.TemporaryDirectory() as saved:
                keys = _save_part(layers_of(part), part, capacity, chunk, tiers, saved)
                gc.collect()  # a part read from a checkpoint is gone before the converter's copies of its weights
                (staging / file).write_bytes(convert(saved, keys, _part_quantize(part, quantize)))
        if tokenizer is not None:  # without one, the runtime generates from ids only
            tokenizer.save_pretrained(staging)
        litert_config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": family.model_type,
            "quantize": quantize,
            "capacity": capacity,
            "chunk": chunk,
            "row_tiers": list(tiers),
            "parts": [{"file": file, "layers": [part.start, part.stop]} for part, file in zip(plan, files)],
            "context": context,
            "vocab_size": config.vocab_size,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
            "conversion_seconds": round(time.perf_counter() - start, 1),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(litert_config, indent=2) + "\n", encoding="utf-8")
    return path


def _source(model):
    """(family class, config, tokenizer, part -> (family, blocks, variables)) of a CausalLM or a checkpoint."""
    if not isinstance(model, (str, os.PathLike)):
        return type(model.net), model.config, model.tokenizer, lambda part: model_parts.layers_in_memory(model, part)
    from tfgen.model import resolve_model_dir

    directory = resolve_model_dir(model)
    config_path = directory / checkpoint.CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {checkpoint.CONFIG_FILE}; is it a model checkpoint?")
    family = families.family_of(json.loads(config_path.read_text(encoding="utf-8")).get("model_type"), config_path)
    weights = checkpoint.weights_file({file.name for file in directory.iterdir()})
    if weights is None:
        raise FileNotFoundError(f"{directory} has no weights: expected one of {', '.join(checkpoint.WEIGHTS_FILES)}")
    config = family.config_class.from_pretrained(directory)
    try:
        tokenizer = Tokenizer.from_pretrained(directory)
    except FileNotFoundError:
        tokenizer = None
    return family, config, tokenizer, lambda part: model_parts.load_part(family, config, directory / weights, part)


def _save_part(layers, part, capacity, chunk, tiers, directory):
    """Writes a part's signatures as a SavedModel in `directory`; returns their names."""
    net, blocks, variables = layers
    module = PartModule(Stage(net, blocks, part), variables, capacity, chunk, tiers)
    tf.saved_model.save(module, directory, signatures=module.signatures())
    return list(module.signatures())


def _part_quantize(part, quantize):
    """How a part's weights are stored. A part of the token embeddings alone has nothing that int4 quantizes
    (ai-edge-quantizer leaves the table's GATHER in float32), so it skips the quantizer, which would hold a copy of the
    table per signature."""
    embeddings_alone = part.first and part.start == part.stop and not part.last
    return "none" if quantize == "int4" and embeddings_alone else quantize


def convert(saved_model, signature_keys, quantize):
    """The LiteRT flatbuffer of a SavedModel's signatures, with weights as `quantize` says."""
    if quantize == "int4":
        return int4.quantize_int4(convert(saved_model, signature_keys, "none"))
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=signature_keys)
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
    capacity, head_dim]. Returns (merged output [rows, n, width], k, v): the
    runtime writes k and v into its cache.
    """
    n, capacity = dims(q)[2], cache_k.shape[2]
    scale = math.sqrt(q.shape[-1])
    causal = tf.range(n)[None, :] <= tf.range(n)[:, None]
    own = tf.where(causal, tf.matmul(q, k, transpose_b=True) / scale, kv_cache.MASKED)  # [rows, heads, n, n]
    # A row's columns from its first one on hold stale keys (of its earlier requests, or of a prompt's padding).
    earlier = tf.range(capacity)[None, :] < columns[:, :1]  # [rows, capacity]
    past = tf.where(earlier[:, None, None], tf.matmul(q, cache_k, transpose_b=True) / scale, kv_cache.MASKED)
    weights = tf.nn.softmax(tf.concat([past, own], axis=-1), axis=-1)
    output = tf.matmul(weights[..., :capacity], cache_v) + tf.matmul(weights[..., capacity:], v)
    return kv_cache.merge_heads(output), k, v


def _row_specs(rows, specs):
    """TensorSpecs of [rows, *shape] for each (name, dtype, shape) of `specs`."""
    return [tf.TensorSpec([rows, *shape], dtype, name=name) for name, dtype, shape in specs]


@dataclass(frozen=True)
class Stage:
    """What a part computes with: the family's forward pieces, its blocks and its place. A plain object, so tf.Module
    does not track the layers (their variables are tracked once, in PartModule.model_weights)."""

    net: Family
    blocks: list
    part: model_parts.Part


class PartModule(tf.Module):
    """The signatures of one part (see the module docstring): `extend`, `decode_R` for each row tier R, and in the
    last part `next_token_R`."""

    def __init__(self, stage, variables, capacity, chunk, tiers):
        super().__init__(name="tfgen_litert")
        self.stage = stage
        self.model_weights = list(variables)
        config = stage.net.config
        width = config.n_embd
        cache_shape = [config.n_head, capacity, width // config.n_head]
        cache = [
            (f"{kind}_cache_{layer}", tf.float32, cache_shape)
            for layer in range(len(stage.blocks))
            for kind in ("key", "value")
        ]

        def steps(rows, tokens):
            taken = ("token", tf.int32, [tokens]) if stage.part.first else ("hidden", tf.float32, [tokens, width])
            return _row_specs(rows, [taken, ("positions", tf.int32, []), *cache])

        self._signatures = {"extend": tf.function(self._step, input_signature=steps(1, chunk))}
        for rows in tiers:
            self._signatures[f"decode_{rows}"] = tf.function(self._step, input_signature=steps(rows, 1))
        if stage.part.last:
            choice = [
                ("logits", tf.float32, [config.vocab_size]),
                ("sequence", tf.int32, [capacity]),
                ("lengths", tf.int32, []),
                ("steps", tf.int32, []),
                ("temperature", tf.float32, []),
                ("top_k", tf.int32, []),
                ("top_p", tf.float32, []),
                ("repetition_penalty", tf.float32, []),
                ("no_repeat_ngram_size", tf.int32, []),
                ("min_new_steps", tf.int32, []),
                ("presence_penalty", tf.float32, []),
                ("frequency_penalty", tf.float32, []),
                ("logit_bias", tf.float32, [config.vocab_size]),
                ("uniform", tf.float32, [1]),
            ]
            for rows in tiers:
                self._signatures[f"next_token_{rows}"] = tf.function(
                    self._next_token,
                    input_signature=[*_row_specs(rows, choice), tf.TensorSpec([MAX_EOS_IDS], tf.int32, name="eos_ids")],
                )

    def signatures(self):
        return self._signatures

    def _step(self, taken, positions, *cache):
        """Tokens (or the part before's hidden states) [rows, n] at columns positions .. positions + n - 1."""
        net, blocks, part = self.stage.net, self.stage.blocks, self.stage.part
        n = taken.shape[1]
        columns = positions[:, None] + tf.range(n)[None]
        hidden = net.embed(taken, columns) if part.first else taken
        hidden, new = net.transform(
            hidden, columns, blocks, list(zip(cache[::2], cache[1::2])), attend=attend_beside_cache
        )
        out = {"keys": tf.stack([k for k, _ in new]), "values": tf.stack([v for _, v in new])} if new else {}
        if part.last:  # [rows * n, vocab]: a decode step's [rows, vocab], an extend's [chunk, vocab]
            out["logits"] = net.head(tf.reshape(hidden, [-1, net.config.n_embd]))
        else:
            out["hidden"] = hidden
        return out

    def _next_token(
        self,
        logits,
        sequence,
        lengths,
        steps,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        no_repeat_ngram_size,
        min_new_steps,
        presence_penalty,
        frequency_penalty,
        logit_bias,
        uniform,
        eos_ids,
    ):
        settings = {
            "repetition_penalty": repetition_penalty,
            "no_repeat_ngram_size": no_repeat_ngram_size,
            "eos_ids": eos_ids,
            "min_new_steps": min_new_steps,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "logit_bias": logit_bias,
            "bad_words": tf.zeros([0, 1], tf.int32),
            "bad_word_lengths": tf.zeros([0], tf.int32),
        }
        scores = processors.process(logits, sequence, lengths, steps, settings)
        token, logprob = decode.choose_at(scores, temperature, top_k, top_p, uniform)
        return {"token": token, "logprob": logprob}
