"""LiteRTLM: generation and scoring from a LiteRT export (`tfgen export --format litert`), without TensorFlow.

Needs only ai-edge-litert (`pip install "tfgen[litert]"`), numpy and
SentencePiece: importing this module imports neither TensorFlow nor
transformers. The model's signatures (see tfgen.export.litert) do the math:
prefill and decode give logits, `next_token` applies the logits processors
and picks the token (argmax, or a draw at a uniform number that a seeded numpy
generator gives, one per sampled token), `score` gives log-probabilities.
What is left here is the loop: one prompt at a time (batch 1), the KV cache
(numpy arrays that each decode call reads, its new keys and values written
in after it), the token history, stopping at EOS, and text in and out through
`tfgen.Tokenizer`.
"""

import json
import os
from pathlib import Path

import numpy as np

from tfgen import scoring
from tfgen.generation.options import resolve_options
from tfgen.tokenizer import Tokenizer, completion_texts, warn_if_vocabulary_differs

MODEL_FILE = "model.tflite"
CONFIG_FILE = "litert.json"
FORMAT = "tfgen-litert"
FORMAT_VERSION = 2  # 2: the KV cache is the runtime's, passed to each decode step
_INSTALL = 'pip install "tfgen[litert]" (or pip install ai-edge-litert)'


def is_litert_dir(path):
    """Whether `path` is a directory written by tfgen.export_litert."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(path):
    """The export's litert.json, checked to be one this runtime reads."""
    path = Path(path)
    if not is_litert_dir(path):
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; export a model with `tfgen export --format litert`")
    config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE} is not a {FORMAT} version {FORMAT_VERSION} config; "
                         "re-export the model with this tfgen")
    return config


class LiteRTLM:
    """A GPT-2 LiteRT export: `generate`, `generate_text`, `stream_text` and `score` with GPT2LM's arguments.

    Greedy decoding, sampling (temperature, top_k, top_p, seed), repetition
    penalty, no-repeat n-grams and min_new_tokens / min_length; no beam search
    and no bad_words_ids (GPT2LM and the SavedModel export have them).
    `num_threads`: the interpreter's threads (default: the usable cores).
    """

    def __init__(self, path, num_threads=None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as error:
            raise ImportError(f"the LiteRT runtime is not installed ({error}); {_INSTALL}") from None
        path = Path(path)
        self.config = read_config(path)
        try:
            self.tokenizer = Tokenizer.from_pretrained(path)
        except FileNotFoundError:
            self.tokenizer = None  # ids in and out only, as GPT2LM without a tokenizer
        warn_if_vocabulary_differs(self.tokenizer, self.config["vocab_size"], path)
        self.capacity = self.config["capacity"]
        threads = len(os.sched_getaffinity(0)) if num_threads is None else num_threads
        self._interpreter = Interpreter(model_path=str(path / MODEL_FILE), num_threads=threads)
        self._run = {name: self._interpreter.get_signature_runner(name)
                     for name in ("prefill", "decode", "next_token", "score")}
        # The KV cache, [layers, 1, heads, capacity, head_dim] for keys and for values: decode reads it (a view per
        # layer and kind, each a signature input), this runtime writes each step's new column.
        inputs = self._run["decode"].get_input_details()
        layers = sum(name.startswith("key_cache_") for name in inputs)
        self._keys = np.zeros([layers, *inputs["key_cache_0"]["shape"]], np.float32)
        self._values = np.zeros_like(self._keys)
        self._cache_inputs = {f"{kind}_cache_{layer}": cache[layer] for layer in range(layers)
                              for kind, cache in (("key", self._keys), ("value", self._values))}

    def generate(self, input_ids, attention_mask=None, return_dict_in_generate=False, output_scores=False, **kwargs):
        """Token ids [batch * num_return_sequences, len + new], as GPT2LM.generate returns them (a numpy array).

        Rows that stop early are padded with the pad id. With
        return_dict_in_generate, a dict with `sequences` and, with
        output_scores, `token_logprobs` (each new token's log-probability under
        the distribution it was drawn from, 0 after EOS).
        """
        input_ids = np.asarray(input_ids, dtype=np.int32)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {input_ids.shape}")
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask).reshape(input_ids.shape)
        options = self._options(input_ids.shape[1], int(mask.sum(axis=1).max()), kwargs)
        rng = np.random.default_rng(options.seed)
        rows = [self._decode_row(ids[m > 0], options, rng)
                for ids, m in zip(input_ids, mask) for _ in range(options.num_return_sequences)]
        steps = max(len(tokens) for tokens, _ in rows)
        new = np.full([len(rows), steps], options.pad_token_id, np.int32)
        logprobs = np.zeros([len(rows), steps], np.float32)
        for row, (tokens, row_logprobs) in enumerate(rows):
            new[row, :len(tokens)] = tokens
            logprobs[row, :len(tokens)] = row_logprobs
        sequences = np.concatenate([np.repeat(input_ids, options.num_return_sequences, axis=0), new], axis=1)
        if not return_dict_in_generate:
            return sequences
        return {"sequences": sequences, "token_logprobs": logprobs if output_scores else None}

    def complete(self, prompts, **kwargs):
        """For each prompt, a list of num_return_sequences `tfgen.tokenizer.Completion`s."""
        self._need_tokenizer()
        prompts = list(prompts)
        eos_ids = set(np.atleast_1d(kwargs.get("eos_token_id", self.config["eos_token_id"]) or []).tolist())
        results = []
        for prompt in prompts:
            prompt_ids = self.tokenizer.encode(prompt)
            sequences = self.generate([prompt_ids], **kwargs)
            results.append([self.tokenizer.completion(prompt_ids, row[len(prompt_ids):], eos_ids) for row in sequences])
        return results

    def generate_text(self, prompts, return_full_text=True, **kwargs):
        """As GPT2LM.generate_text: a string per prompt (a list of them when num_return_sequences > 1)."""
        single = isinstance(prompts, str)
        return completion_texts(self.complete([prompts] if single else prompts, **kwargs), return_full_text, single)

    def stream_text(self, prompt, **kwargs):
        """Yields the new text of one prompt piece by piece, as each token is decoded (no EOS text).

        A piece that ends inside a character spelled in several byte tokens
        waits for the rest of it.
        """
        if kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("stream_text streams one sequence; use generate_text for num_return_sequences > 1")
        self._need_tokenizer()
        prompt_ids = self.tokenizer.encode(prompt)
        options = self._options(len(prompt_ids), len(prompt_ids), kwargs)
        steps = self._steps(np.asarray(prompt_ids, np.int32), options, np.random.default_rng(options.seed))
        yield from self.tokenizer.text_pieces(prompt_ids, ([token] for token, _ in steps), options.eos_token_ids)

    def score(self, texts, stride=None):
        """As GPT2LM.score: per text, `tokens`, `token_logprobs`, `logprob` and `perplexity` (a str gives one dict).

        A text longer than the context is scored in windows (`scoring.windows`; stride default: half the context).
        """
        if isinstance(texts, str):
            return self.score([texts], stride)[0]
        self._need_tokenizer()
        texts = list(texts)
        rows = [self.tokenizer.encode(text) for text in texts]
        scoring.check_lengths(texts, map(len, rows))
        spans = [scoring.windows(len(ids), self.config["context"], stride) for ids in rows]
        return [scoring.summarize([self.tokenizer.token_text(t) for t in ids], self._token_logprobs(ids, row_spans))
                for ids, row_spans in zip(rows, spans)]

    def _token_logprobs(self, ids, spans):
        """The log-probability of each token of `ids` after the first: each window's scored ones, in order."""
        return np.concatenate([
            self._run["score"](input_ids=np.asarray([ids[begin:end]], np.int32))["token_logprobs"][0, -scored:]
            for begin, end, scored in spans
        ])

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this export has no tokenizer; pass token ids to generate() instead")

    def _options(self, prompt_width, longest_prompt, kwargs):
        kwargs = dict(kwargs)
        kwargs.setdefault("eos_token_id", self.config["eos_token_id"])
        kwargs.setdefault("pad_token_id", self.config["pad_token_id"])
        options = resolve_options(prompt_width, **kwargs)
        if options.num_beams > 1:
            raise ValueError("the LiteRT export has no beam search; use num_beams=1, or GPT2LM / the SavedModel export")
        if options.bad_words_ids:
            raise ValueError("the LiteRT export has no bad_words_ids; use GPT2LM or the SavedModel export")
        if longest_prompt + options.max_new_tokens > self.capacity:
            raise ValueError(
                f"the prompt ({longest_prompt} tokens) plus max_new_tokens ({options.max_new_tokens}) exceeds the "
                f"export's capacity of {self.capacity} tokens; shorten the prompt, lower max_new_tokens, or "
                "export with a larger --capacity"
            )
        return options

    def _decode_row(self, prompt_ids, options, rng):
        """The new tokens of one prompt (through EOS) and their log-probabilities."""
        steps = list(self._steps(prompt_ids, options, rng))
        return [token for token, _ in steps], [logprob for _, logprob in steps]

    def _steps(self, prompt_ids, options, rng):
        """Yields (token, logprob) for each new token of one prompt, the EOS token last if it comes."""
        length = len(prompt_ids)
        sequence = np.full([1, self.capacity], options.pad_token_id, np.int32)
        sequence[0, :length] = prompt_ids
        settings = {
            "do_sample": np.array(options.do_sample),
            "temperature": np.array(options.temperature, np.float32),
            "top_k": np.array(options.top_k, np.int32),
            "top_p": np.array(options.top_p, np.float32),
            "repetition_penalty": np.array(options.repetition_penalty, np.float32),
            "no_repeat_ngram_size": np.array(options.no_repeat_ngram_size, np.int32),
            "min_new_steps": np.array(options.min_new_steps, np.int32),
            "eos_ids": np.array(options.eos_token_ids, np.int32),
        }
        no_draw = np.zeros([1, 1], np.float32)
        logits = self._cached(self._run["prefill"](input_ids=np.asarray(prompt_ids, np.int32)[None]), 0)
        for step in range(options.max_new_tokens):
            uniform = rng.random([1, 1], dtype=np.float32) if options.do_sample else no_draw
            out = self._run["next_token"](logits=logits, sequence=sequence, length=np.array(length, np.int32),
                                          step=np.array(step, np.int32), uniform=uniform, **settings)
            token = int(out["token"][0])
            yield token, float(out["logprob"][0])
            if token in options.eos_token_ids or step + 1 == options.max_new_tokens:
                return
            sequence[0, length] = token
            logits = self._cached(self._run["decode"](token=np.array([[token]], np.int32),
                                                      position=np.array(length, np.int32), **self._cache_inputs), length)
            length += 1

    def _cached(self, out, column):
        """The logits of a prefill or decode call, after writing its keys and values into the cache from `column`."""
        width = out["keys"].shape[2]
        self._keys[:, 0, :, column:column + width] = out["keys"]
        self._values[:, 0, :, column:column + width] = out["values"]
        return out["logits"]
