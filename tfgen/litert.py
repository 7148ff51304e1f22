"""LiteRTLM: generation and scoring from a LiteRT export (`tfgen export --format litert`), without TensorFlow.

Needs only ai-edge-litert (`pip install "tfgen[litert]"`), numpy and
SentencePiece: importing this module imports neither TensorFlow nor
transformers. The model's signatures (see tfgen.export.litert) do the math;
the rows (`tfgen.litert_rows.LiteRTRows`: the KV cache, each row's history,
settings and seeded generator) run the decode loop, several prompts at once.
Each part of the export runs on one LiteRT CompiledModel (XNNPACK), which
prepares its weights once; a model cut into parts runs them one after another.
`generate` and the text methods queue one row per returned sequence and admit
them into the lowest free slots as rows finish, as the server's scheduler
does; text goes in and out through `tfgen.Tokenizer`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from tfgen import scoring
from tfgen._env import native_stderr_without, xnnpack_cache_file
from tfgen.generation.options import resolve_options
from tfgen.litert_host import aligned_zeros, host_buffer
from tfgen.litert_rows import Chain, LiteRTRows, extend_chunks
from tfgen.serving.protocol import Sampling, choice_seed
from tfgen.tokenizer import Completion, Tokenizer, completion_texts, warn_if_vocabulary_differs

MODEL_FILE = "model.tflite"
CONFIG_FILE = "litert.json"
FORMAT = "tfgen-litert"
# 2: the KV cache is the runtime's, passed to each decode step; 3: row tiers, per-row state; 4: static shapes
# (prompts prefilled in chunks), parts
FORMAT_VERSION = 4
# What LiteRT logs while it looks for accelerators a CPU machine does not have (GPU, NPU, vendor plugins).
_ACCELERATOR_NOISE = re.compile(r"^(INFO|WARNING): \[\w+\.cc:\d+\] |^\W*Could not load shared library")
_INSTALL = 'pip install "tfgen[litert]" (or pip install ai-edge-litert)'
BLOCK = 8  # tokens per row between admissions of queued rows


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
        raise ValueError(
            f"{path / CONFIG_FILE} is not a {FORMAT} version {FORMAT_VERSION} config; "
            "re-export the model with this tfgen"
        )
    return config


class LiteRTLM:
    """A GPT-2 or GPT-J LiteRT export: `generate`, `generate_text`, `stream_text` and `score` with GPT2LM's arguments.

    Greedy decoding, sampling (temperature, top_k, top_p, seed), repetition
    penalty, OpenAI's presence and frequency penalties, no-repeat n-grams and min_new_tokens / min_length; no beam search
    and no bad_words_ids (GPT2LM and the SavedModel export have them).
    `num_threads`: the CompiledModels' threads (default: the usable cores).
    """

    def __init__(self, path: str | os.PathLike[str], num_threads: int | None = None) -> None:
        try:
            import ai_edge_litert.compiled_model  # noqa: F401
        except ImportError as error:
            raise ImportError(f"the LiteRT runtime is not installed ({error}); {_INSTALL}") from None
        path = Path(path)
        self.config = read_config(path)
        self.tokenizer: Tokenizer | None
        try:
            self.tokenizer = Tokenizer.from_pretrained(path)
        except FileNotFoundError:
            self.tokenizer = None  # ids in and out only, as GPT2LM without a tokenizer
        warn_if_vocabulary_differs(self.tokenizer, self.config["vocab_size"], path)
        self.capacity = self.config["capacity"]
        threads = len(os.sched_getaffinity(0)) if num_threads is None else num_threads
        parts = []
        with native_stderr_without(_ACCELERATOR_NOISE):
            for part in self.config["parts"]:
                parts.append(BoundSignatures(_compiled(path / part["file"], threads)))
        self._chain = Chain(parts, [tuple(part["layers"]) for part in self.config["parts"]])
        self._rows = None  # the LiteRTRows of the last call, kept for its cache
        self._scratch = None  # a one-row cache's `extend` call, for scoring

    def generate(
        self,
        input_ids: Any,  # array-like [batch, len] or [len]
        attention_mask: npt.ArrayLike | None = None,
        return_dict_in_generate: bool = False,
        output_scores: bool = False,
        **kwargs: Any,
    ) -> Any:  # an int32 array; with return_dict_in_generate, a dict of arrays
        """Token ids [batch * num_return_sequences, len + new], as GPT2LM.generate returns them (a numpy array).

        Prompts of different lengths come padded with an attention_mask (either
        side), or as a list of lists. Rows that stop early are padded with the
        pad id. With return_dict_in_generate, a dict with `sequences` and, with
        output_scores, `token_logprobs` (each new token's log-probability under
        the distribution it was drawn from, 0 after EOS). Each returned sequence
        of a prompt has its own seed (`protocol.choice_seed` of the seed and its row).
        """
        input_ids, prompts = self._prompts(input_ids, attention_mask)
        options = self._options(input_ids.shape[1], max(len(ids) for ids in prompts), kwargs)
        rows = [prompt for prompt in prompts for _ in range(options.num_return_sequences)]
        results: list[tuple[list[int], list[float]]] = [([], []) for _ in rows]
        for row, tokens in self._decode_rows(rows, options, BLOCK):
            results[row][0].extend(tokens.ids)
            results[row][1].extend(tokens.logprobs)
        steps = max(len(tokens) for tokens, _ in results)
        new = np.full([len(rows), steps], options.pad_token_id, np.int32)
        logprobs = np.zeros([len(rows), steps], np.float32)
        for row, (tokens, row_logprobs) in enumerate(results):
            new[row, : len(tokens)] = tokens
            logprobs[row, : len(tokens)] = row_logprobs
        sequences = np.concatenate([np.repeat(input_ids, options.num_return_sequences, axis=0), new], axis=1)
        if not return_dict_in_generate:
            return sequences
        return {"sequences": sequences, "token_logprobs": logprobs if output_scores else None}

    def complete(self, prompts: Iterable[str], **kwargs: Any) -> list[list[Completion]]:
        """For each prompt, a list of num_return_sequences `tfgen.tokenizer.Completion`s (all decoded together)."""
        tokenizer = self._need_tokenizer()
        prompt_ids = [tokenizer.encode(prompt) for prompt in prompts]
        eos_ids = set(np.atleast_1d(kwargs.get("eos_token_id", self.config["eos_token_id"]) or []).tolist())
        sequences = self.generate(prompt_ids, **kwargs)
        width, returned = max(len(ids) for ids in prompt_ids), len(sequences) // len(prompt_ids)
        return [
            [tokenizer.completion(ids, row[width:], eos_ids) for row in sequences[i * returned : (i + 1) * returned]]
            for i, ids in enumerate(prompt_ids)
        ]

    def generate_text(
        self, prompts: str | Sequence[str], return_full_text: bool = True, **kwargs: Any
    ) -> str | list[str] | list[list[str]]:
        """As GPT2LM.generate_text: a string per prompt (a list of them when num_return_sequences > 1)."""
        single = isinstance(prompts, str)
        return completion_texts(
            self.complete([prompts] if isinstance(prompts, str) else prompts, **kwargs), return_full_text, single
        )

    def stream_text(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """Yields the new text of one prompt piece by piece, as each token is decoded (no EOS text).

        A piece that ends inside a character spelled in several byte tokens
        waits for the rest of it.
        """
        if kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("stream_text streams one sequence; use generate_text for num_return_sequences > 1")
        tokenizer = self._need_tokenizer()
        prompt_ids = tokenizer.encode(prompt)
        options = self._options(len(prompt_ids), len(prompt_ids), kwargs)
        pieces = (tokens.ids for _, tokens in self._decode_rows([prompt_ids], options, 1))
        yield from tokenizer.text_pieces(prompt_ids, pieces, options.eos_token_ids)

    def score(self, texts: str | Iterable[str], stride: int | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """As GPT2LM.score: per text, `tokens`, `token_logprobs`, `logprob` and `perplexity` (a str gives one dict).

        A text longer than the export's capacity (or the model's context, if less) is scored in windows of it
        (`scoring.windows`; stride default: half the window).
        """
        if isinstance(texts, str):
            return cast("list[dict[str, Any]]", self.score([texts], stride))[0]
        tokenizer = self._need_tokenizer()
        texts = list(texts)
        rows = [tokenizer.encode(text) for text in texts]
        scoring.check_lengths(texts, map(len, rows))
        window, name = min((self.config["context"], "the model's context"), (self.capacity, "the export's capacity"))
        spans = [scoring.windows(len(ids), window, stride, name) for ids in rows]
        return [
            scoring.summarize([tokenizer.token_text(t) for t in ids], self._token_logprobs(ids, row_spans))
            for ids, row_spans in zip(rows, spans)
        ]

    def _token_logprobs(self, ids, spans):
        """The log-probability of each token of `ids` after the first: each window's scored ones, in order."""
        scores = []
        for begin, end, scored in spans:
            window = ids[begin:end]
            logprobs = self._logprobs_after(window[:-1])  # each token's distribution over the one after it
            scores.append(logprobs[np.arange(len(window) - 1), window[1:]][-scored:])
        return np.concatenate(scores)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this export has no tokenizer; pass token ids to generate() instead")
        return self.tokenizer

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

    def _prompts(self, input_ids, attention_mask):
        """input_ids as a [batch, width] array (a list of ragged lists padded on the right) and each row's real ids."""
        if (
            attention_mask is None
            and isinstance(input_ids, (list, tuple))
            and input_ids
            and all(isinstance(ids, (list, tuple, np.ndarray)) for ids in input_ids)
        ):
            width = max(len(ids) for ids in input_ids)
            attention_mask = [[1] * len(ids) + [0] * (width - len(ids)) for ids in input_ids]
            input_ids = [list(ids) + [self.config["pad_token_id"] or 0] * (width - len(ids)) for ids in input_ids]
        input_ids = np.asarray(input_ids, dtype=np.int32)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {input_ids.shape}")
        mask = (
            np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask).reshape(input_ids.shape)
        )
        prompts = [ids[m > 0].tolist() for ids, m in zip(input_ids, mask)]
        if not all(prompts):
            raise ValueError("every prompt needs a token at least (an attention_mask row is all zeros)")
        return input_ids, prompts

    def decode_rows(self, slots=None, eos_ids=None, prefix_cache=None):
        """A `LiteRTRows` of `slots` rows (default: the export's most) on this export, the interface
        `tfgen.serving.rows` describes, ending rows at `eos_ids` (default: the model's EOS), taking prompt prefixes
        from `prefix_cache` (a `tfgen.serving.prefix_cache.PrefixCache`; None: none)."""
        eos_ids = np.atleast_1d(self.config["eos_token_id"] if eos_ids is None else eos_ids).tolist()
        return LiteRTRows(
            self._chain,
            self._chain.parts[-1],
            self.capacity,
            tuple(self.config["row_tiers"]),
            eos_ids,
            self.config["pad_token_id"] or 0,
            slots,
            prefix_cache,
        )

    def next_token_logprobs(self, ids, start):
        """log-softmax of the logits at positions start..len(ids)-2 of one text: a [len(ids) - 1 - start, vocab] array."""
        return self._logprobs_after(ids[:-1])[start:]

    def _logprobs_after(self, ids):
        """The log-softmax of the logits after each token of `ids` (at most the capacity): [len(ids), vocab]."""
        if len(ids) > self.capacity:
            raise ValueError(f"{len(ids)} tokens exceed the export's capacity of {self.capacity}")
        if self._scratch is None:
            layers, heads, capacity, head_dim = self._chain.cache_shape
            keys, values = (aligned_zeros([layers, 1, heads, capacity, head_dim]) for _ in range(2))
            self._scratch = self._chain.bind_extend(keys, values, 0)
        logits = np.concatenate(list(extend_chunks(self._scratch, ids)))
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    def _decode_rows(self, prompts, options, block):
        """Yields (row, RowTokens) as the rows of `prompts` decode, `block` tokens at a time; queued rows take the
        lowest free slots as others finish."""
        eos_ids = tuple(sorted(options.eos_token_ids))
        if self._rows is None or self._rows.eos_ids != eos_ids:
            self._rows = self.decode_rows(eos_ids=eos_ids)
        rows = self._rows
        queue = list(reversed(list(enumerate(prompts))))
        row_of = {}  # slot -> row
        try:
            while queue or row_of:
                starts = []
                for slot in [slot for slot in range(rows.slots) if slot not in row_of][: len(queue)]:
                    row, prompt = queue.pop()
                    row_of[slot] = row
                    starts.append((slot, prompt, _sampling(options, choice_seed(options.seed, row))))
                if starts:
                    rows.start_rows(starts)
                for slot, tokens in rows.advance(block).items():
                    yield row_of[slot], tokens
                    if tokens.finished:
                        rows.free_row(slot)
                        del row_of[slot]
        finally:  # a caller that stops early (a stream closed) leaves no row behind
            for slot in row_of:
                rows.free_row(slot)


def _compiled(model_file, threads):
    """A CompiledModel of `model_file` on XNNPACK with `threads` threads. Its packed weights are kept in a file
    (`tfgen._env.xnnpack_cache_file`, off with TFGEN_COMPILE_CACHE=off) that later loads map instead of packing the
    weights again: faster, and the packed weights are file pages the kernel can drop, not process memory."""
    from ai_edge_litert.compiled_model import CompiledModel, CpuOptions, HardwareAccelerator, Options

    cache = xnnpack_cache_file(model_file)
    cpu = CpuOptions(num_threads=threads, xnnpack_weight_cache_path="" if cache is None else str(cache))
    options = Options(HardwareAccelerator.CPU, cpu_options=cpu)
    if cache is None:
        return CompiledModel.from_file(str(model_file), options=options)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process writes a cache file, the others wait and map it
        return CompiledModel.from_file(str(model_file), options=options)


class BoundSignatures:
    """A LiteRT CompiledModel's signatures, each bound once to numpy arrays (`bind`) that it reads and writes in place."""

    def __init__(self, compiled):
        self._compiled = compiled

    def input_details(self, name):
        return self._compiled.get_input_tensor_details(name)

    def output_details(self, name):
        return self._compiled.get_output_tensor_details(name)

    def bind(self, name, inputs, outputs):
        """A `BoundSignature` running `name` from the arrays of `inputs` into those of `outputs` (name -> array, each
        of the signature's shape, from `litert_host.aligned_zeros` or a contiguous view of one that starts aligned)."""
        return BoundSignature(self._compiled, name, inputs, outputs)


class BoundSignature:
    """Calling it runs its signature on the current contents of `inputs` and returns `outputs`, rewritten."""

    def __init__(self, compiled, name, inputs, outputs):
        self._compiled, self._name = compiled, name
        self.inputs, self.outputs = inputs, outputs
        self._input_buffers = {key: host_buffer(array) for key, array in inputs.items()}
        self._output_buffers = {key: host_buffer(array) for key, array in outputs.items()}

    def __call__(self):
        self._compiled.run_by_name(self._name, self._input_buffers, self._output_buffers)
        return self.outputs


def _sampling(options, seed):
    """One row's `Sampling` from generate's resolved options."""
    return Sampling(
        max_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        repetition_penalty=options.repetition_penalty,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
        min_tokens=options.min_new_steps,
        seed=seed,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
    )
