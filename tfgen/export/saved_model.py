"""TF SavedModel export: generation served by TensorFlow alone, strings in and strings out.

The SavedModel holds the model's weights once and the one-shot decode programs
of `tfgen.generation.decode` (prompt to end in one call, over the same state
functions as the engine `CausalLM.generate` runs), each traced
once with unknown batch and prompt length and marked for XLA, which compiles
them per shape when a request comes. Every sampling setting is a request
input with a default, so no request retraces. With a SentencePiece tokenizer,
tokenization and detokenization run in the graph through tensorflow-text's
ops; loading the export then needs `import tensorflow_text` (its op library),
but neither tfgen nor transformers.

Signatures: `serving_default` (prompts -> completions, sequences; for a
tokenizer.json model the same as `generate_ids`), `generate_ids` (input_ids,
attention_mask -> sequences) and `generate_beam` (beam search with
`num_beams` fixed at export time). The loaded object has the same functions as
`generate_text`, `generate_ids` and `generate_beam`, whose settings are
optional keyword arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import TYPE_CHECKING

import tensorflow as tf

from tfgen import checkpoint
from tfgen.generation import decode
from tfgen.generation.options import MAX_NGRAM_SIZE, RULES, resolve_options

if TYPE_CHECKING:  # tfgen.model imports TensorFlow's Keras models; only the annotation needs it
    from tfgen.model import CausalLM

DEFAULT_NUM_BEAMS = 4
DEFAULT_MAX_NEW_TOKENS = 32
RANDOM_SEED = -1  # the seed input's default: a fresh seed per request

# Request-time settings: name -> (dtype, default); max_new_tokens' default is capped by the capacity.
SAMPLING_SETTINGS = {
    "max_new_tokens": (tf.int32, DEFAULT_MAX_NEW_TOKENS),
    "do_sample": (tf.bool, False),
    "temperature": (tf.float32, 1.0),
    "top_k": (tf.int32, 50),
    "top_p": (tf.float32, 1.0),
    "repetition_penalty": (tf.float32, 1.0),
    "no_repeat_ngram_size": (tf.int32, 0),
    "seed": (tf.int64, RANDOM_SEED),
}
BEAM_SETTINGS = {
    **{name: SAMPLING_SETTINGS[name] for name in ("max_new_tokens", "repetition_penalty", "no_repeat_ngram_size")},
    "length_penalty": (tf.float32, 1.0),
}
TEXT_INPUTS = {"prompts": tf.TensorSpec([None], tf.string)}
ID_INPUTS = {
    "input_ids": tf.TensorSpec([None, None], tf.int32),
    "attention_mask": tf.TensorSpec([None, None], tf.int32),
}


def export_saved_model(
    lm: CausalLM, path: str | os.PathLike[str], capacity: int | None = None, num_beams: int = DEFAULT_NUM_BEAMS
) -> str | os.PathLike[str]:
    """Writes `lm` as a TF SavedModel at `path`, atomically; returns `path`.

    capacity: the most tokens a request may use, longest prompt plus
    max_new_tokens (default and at most the model's context); num_beams: the
    beam count of the `generate_beam` signature. See the module docstring
    for the signatures.
    """
    module = serving_module(lm, capacity, num_beams)
    with checkpoint.atomic_directory(path) as staging:
        tf.saved_model.save(module, str(staging), signatures=module.signature_functions())
    return path


def serving_module(lm, capacity=None, num_beams=DEFAULT_NUM_BEAMS):
    """The tf.Module that export_saved_model saves: the weights, the tokenizer ops and the signature functions."""
    context = lm.net.context
    capacity = context if capacity is None else capacity
    if not 2 <= capacity <= context:
        raise ValueError(f"capacity must be from 2 to the model's context of {context} tokens, got {capacity!r}")
    if not isinstance(num_beams, int) or num_beams < 2:
        raise ValueError(
            f"num_beams must be an integer >= 2 (the beam-search signature's beam count), got {num_beams!r}"
        )
    return _ServingModule(lm, capacity, num_beams)


class _ServingModule(tf.Module):
    def __init__(self, lm, capacity, num_beams):
        super().__init__(name="tfgen_lm")
        self.model_weights = list(lm.net.weights)  # what the programs capture: saved once
        self.capacity = capacity
        self.options = resolve_options(
            1, max_new_tokens=1, eos_token_id=lm.config.eos_token_id, pad_token_id=lm.config.pad_token_id, seed=0
        )
        # One-shot programs over CausalLM.generate's state functions, compiled by XLA per request shape.
        self.programs = {
            strategy: tf.function(decode.program(lm.net, strategy, num_beams), jit_compile=True)
            for strategy in ("greedy", "sample", "beam")
        }
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, capacity - 1)
        sampling = {**SAMPLING_SETTINGS, "max_new_tokens": (tf.int32, max_new_tokens)}
        beam = {**BEAM_SETTINGS, "max_new_tokens": (tf.int32, max_new_tokens)}
        self.generate_ids = _signature_function("generate_ids", ID_INPUTS, sampling, self._sampled_ids)
        model = lm.tokenizer.sentencepiece_model() if lm.tokenizer is not None else None
        if model is None:
            self.generate_beam = _signature_function("generate_beam", ID_INPUTS, beam, self._beam_ids)
            return
        self.text = TextCodec(lm.tokenizer, model, self.options.eos_token_ids)
        self.generate_text = _signature_function(
            "generate_text", TEXT_INPUTS, sampling, self.text.with_text(self._sampled_ids)
        )
        self.generate_beam = _signature_function(
            "generate_beam", TEXT_INPUTS, beam, self.text.with_text(self._beam_ids)
        )

    def signature_functions(self):
        """The SavedModel's signatures: serving_default takes text where the tokenizer allows, ids otherwise."""
        serving = self.generate_text if hasattr(self, "text") else self.generate_ids
        return {"serving_default": serving, "generate_ids": self.generate_ids, "generate_beam": self.generate_beam}

    def _settings(self, inputs, request):
        """The prompts and decode settings of a request, after checks that fail it with a message naming the fix."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        request = dict(request)
        if "seed" in request:
            fresh = tf.random.uniform([], maxval=2**31 - 1, dtype=tf.int64)
            request["seed"] = tf.where(request["seed"] < 0, fresh, request["seed"])
        options = dataclasses.replace(self.options, **{k: v for k, v in request.items() if k != "do_sample"})
        settings = decode.settings_tensors(options)
        checks = _request_checks(attention_mask, settings, request.get("do_sample", False), self.capacity)
        with tf.control_dependencies(checks):
            return tf.identity(input_ids), tf.identity(attention_mask), settings

    def _sampled_ids(self, inputs, request):
        input_ids, attention_mask, settings = self._settings(inputs, request)
        out = tf.cond(
            request["do_sample"],
            lambda: decode.decode(self.programs["sample"], input_ids, attention_mask, settings),
            lambda: decode.decode(self.programs["greedy"], input_ids, attention_mask, settings),
        )
        return {"sequences": out["sequences"]}

    def _beam_ids(self, inputs, request):
        input_ids, attention_mask, settings = self._settings(inputs, request)
        out = decode.decode(self.programs["beam"], input_ids, attention_mask, settings)
        return {"sequences": out["sequences"], "sequences_scores": out["sequences_scores"]}


def _request_checks(attention_mask, settings, do_sample, capacity):
    """Assertions on a request's prompts and settings, each failing with one clear message."""
    lengths = tf.reduce_sum(attention_mask, axis=1)
    longest = tf.reduce_max(tf.concat([lengths, [0]], axis=0))
    max_new = settings["max_new_tokens"]
    ngram = settings["no_repeat_ngram_size"]
    rules = [
        (tf.size(lengths) > 0, "no prompts: send at least one"),
        (tf.reduce_all(lengths > 0), "a prompt has no tokens; give each prompt some text"),
        (
            longest + max_new <= capacity,
            tf.strings.format(
                "the longest prompt ({} tokens) plus max_new_tokens ({}) exceeds the capacity of "
                f"{capacity} tokens; shorten the prompt, lower max_new_tokens, or export with a larger capacity",
                [longest, max_new],
            ),
        ),
        (max_new >= 1, _rule("max_new_tokens", max_new)),
        (
            tf.logical_or(tf.logical_not(do_sample), settings["temperature"] > 0),
            _rule("temperature", settings["temperature"]),
        ),
        (tf.logical_and(settings["top_p"] > 0, settings["top_p"] <= 1), _rule("top_p", settings["top_p"])),
        (settings["top_k"] >= 0, _rule("top_k", settings["top_k"])),
        (settings["repetition_penalty"] > 0, _rule("repetition_penalty", settings["repetition_penalty"])),
        (tf.logical_and(ngram >= 0, ngram <= MAX_NGRAM_SIZE), _rule("no_repeat_ngram_size", ngram)),
    ]
    return [tf.debugging.Assert(condition, [message]) for condition, message in rules]


def _rule(name, value):
    return tf.strings.format(RULES[name], value)


class TextCodec(tf.Module):
    """The tokenizer in the graph: SentencePiece through tensorflow-text, with `Tokenizer`'s special-token, padding
    and decoding rules."""

    def __init__(self, tokenizer, sentencepiece_model, eos_ids):
        super().__init__()
        import tensorflow_text

        self.sentencepiece = tensorflow_text.SentencepieceTokenizer(model=sentencepiece_model, out_type=tf.int32)
        # Tokenizer.encode's rule: BOS first and EOS last where add_bos_token / add_eos_token say so.
        self.prefix = [tokenizer.bos_token_id] if tokenizer.add_bos_token else []
        self.suffix = [tokenizer.eos_token_id] if tokenizer.add_eos_token else []
        self.padding_id = tokenizer.padding_id
        self.special_ids = sorted(tokenizer.all_special_ids)
        self.vocab_size = tokenizer.vocab_size  # ids past it (a padded embedding's rows) spell nothing
        self.eos_ids = list(eos_ids)

    def encode(self, prompts):
        """Left-padded (input_ids, attention_mask) of `prompts`, as `Tokenizer.encode_batch` gives them."""
        pieces = self.sentencepiece.tokenize(prompts)
        rows = tf.shape(prompts)[0]
        parts = [
            tf.RaggedTensor.from_tensor(tf.tile(tf.constant(ids, tf.int32, [1, len(ids)]), [rows, 1]))
            for ids in (self.prefix, self.suffix)
        ]
        pieces = tf.concat([parts[0], pieces, parts[1]], axis=1)
        lengths = tf.cast(pieces.row_lengths(), tf.int32)
        width = tf.reduce_max(tf.concat([lengths, [0]], axis=0))
        column = tf.range(width)[None, :] - (width - lengths)[:, None]  # each slot's index within its prompt
        real = column >= 0
        right_aligned = tf.gather(pieces.to_tensor(self.padding_id), tf.maximum(column, 0), batch_dims=1)
        return tf.where(real, right_aligned, self.padding_id), tf.cast(real, tf.int32)

    def completions(self, input_ids, attention_mask, sequences):
        """The new text of each row, as `CausalLM.complete`'s `new_text`: through the first EOS, specials and ids
        past the vocabulary dropped."""
        new = sequences[:, tf.shape(input_ids)[1] :]
        before_end = tf.cumsum(tf.cast(_is_any(new, self.eos_ids), tf.int32), axis=1, exclusive=True) == 0
        prompt = tf.ragged.boolean_mask(input_ids, tf.logical_and(attention_mask > 0, self._plain(input_ids)))
        new = tf.ragged.boolean_mask(new, tf.logical_and(before_end, self._plain(new)))
        prompt_text = self.sentencepiece.detokenize(prompt)
        text = self.sentencepiece.detokenize(tf.concat([prompt, new], axis=1))
        start = tf.minimum(tf.strings.length(prompt_text), tf.strings.length(text))
        continues = tf.strings.substr(text, tf.zeros_like(start), start) == prompt_text
        return tf.where(
            continues, tf.strings.substr(text, start, tf.strings.length(text)), self.sentencepiece.detokenize(new)
        )

    def with_text(self, generate_ids):
        """A signature body taking prompts, from one taking ids: adds `completions` to its outputs."""

        def generate(inputs, request):
            input_ids, attention_mask = self.encode(inputs["prompts"])
            out = generate_ids({"input_ids": input_ids, "attention_mask": attention_mask}, request)
            return {"completions": self.completions(input_ids, attention_mask, out["sequences"]), **out}

        return generate

    def _plain(self, ids):
        """Whether each id spells text: not a special token, and in the vocabulary."""
        return tf.logical_and(tf.logical_not(_is_any(ids, self.special_ids)), ids < self.vocab_size)


def _is_any(ids, values):
    """Whether each id is one of `values` (a Python list, maybe empty)."""
    return tf.reduce_any(ids[..., None] == tf.constant(values, tf.int32, shape=[len(values)]), axis=-1)


def _signature_function(name, inputs, settings, body):
    """A tf.function of the `inputs` (name -> TensorSpec) and then the `settings`, keyword arguments
    with defaults (name -> (dtype, default)), that returns body(inputs, settings) as dicts of tensors.

    Its input signature is fixed (unknown batch and length), so it traces once;
    the defaults are saved into the SignatureDef (PlaceholderWithDefault inputs).
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(key, kind) for key in inputs] + [
        inspect.Parameter(key, kind, default=tf.constant(default, dtype)) for key, (dtype, default) in settings.items()
    ]
    signature = inspect.Signature(parameters)

    def function(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        values = arguments.arguments
        return body({key: values[key] for key in inputs}, {key: values[key] for key in settings})

    function.__signature__ = signature
    function.__name__ = name
    specs = [tf.TensorSpec(spec.shape, spec.dtype, name=key) for key, spec in inputs.items()]
    specs += [tf.TensorSpec([], dtype, name=key) for key, (dtype, _) in settings.items()]
    return tf.function(function, input_signature=specs, autograph=False)
