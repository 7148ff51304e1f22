"""CausalLM and its families' classes (GPT2LM, GPTJLM): Keras models around transformers' TF models, with their
tokenizer and compiled generate."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, overload

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from tfgen import checkpoint, families, lora
from tfgen.generation.decode import Decoder, drain
from tfgen.generation.options import resolve_options
from tfgen.tokenizer import Completion, Tokenizer, completion_texts, warn_if_vocabulary_differs
from tfgen.training import MaskedLMLoss, adamw, default_metrics, global_policy, xla_pays_off

# What from_pretrained fetches from a hub repository besides the one weights file it reads.
_HUB_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "*.model",
    "*.spiece",
]


@dataclasses.dataclass
class GenerationOutput:
    """generate(..., return_dict_in_generate=True): sequences, and with output_scores their scores."""

    sequences: tf.Tensor
    token_logprobs: tf.Tensor | None = None
    sequences_scores: tf.Tensor | None = None


_SAVE_INSTEAD = (
    "use lm.save_pretrained(directory) for a checkpoint (config, weights, tokenizer; CausalLM.from_pretrained reads it), "
    "tfgen.export_saved_model(lm, directory) or `tfgen export MODEL DIRECTORY` for a TF SavedModel that serves "
    "generation, lm.save('model.keras') for a Keras file, or save_weights for the weights alone"
)
PathLike = str | os.PathLike[str]
EMBEDDED_MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = "ko-mini"


def default_model_path() -> Path:
    """The directory of tfgen's embedded Korean model, ko-mini (HF layout: config, weights, tokenizer)."""
    return EMBEDDED_MODELS_DIR / DEFAULT_MODEL


def _is_hub_id(name):
    # "owner/name", or a bare name for the few repositories without an owner (gpt2, gpt2-xl).
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None and not os.path.splitext(name)[1]


def resolve_model_dir(name_or_path: PathLike) -> Path:
    """A local checkpoint directory, an embedded model's name ("ko-mini"), or a hub id fetched into HF's cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if (EMBEDDED_MODELS_DIR / str(name_or_path)).is_dir():
        return EMBEDDED_MODELS_DIR / str(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    if not _is_hub_id(str(name_or_path)):
        raise FileNotFoundError(
            f"no model directory at {path}; pass a checkpoint directory, an embedded model (ko-mini) or a hub id such as skt/kogpt2-base-v2"
        )
    try:
        return _hub_snapshot(str(name_or_path))
    except Exception as error:  # the hub client raises many types for "offline"
        raise OSError(
            f"could not fetch {name_or_path!r} from the Hugging Face hub, nor find it in the local cache "
            f"({type(error).__name__}: {error}); check the network, or pass a local checkpoint directory"
        ) from error


def _hub_snapshot(repo_id):
    """The snapshot directory of `repo_id` in HF's cache, fetching only the files from_pretrained reads.

    With HF_HUB_OFFLINE=1, or when the hub cannot be reached, the cached snapshot is used as it is.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        return Path(snapshot_download(repo_id, local_files_only=True))
    try:
        files = HfApi().list_repo_files(repo_id)
    except (OSError, ConnectionError) as error:  # requests' errors derive from OSError
        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:
            raise error from None
    return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + checkpoint.weights_to_fetch(files)))


def _model_type(directory):
    config = json.loads((directory / checkpoint.CONFIG_FILE).read_text(encoding="utf-8"))
    return config.get("model_type")


def _load_weights(cls, directory, tokenizer, dtype):
    """A `cls` model with the weights of `directory`, built in `dtype` and each tensor read into it (see read_weights)."""
    weights = checkpoint.weights_file({path.name for path in directory.iterdir()})
    if weights is None:
        raise FileNotFoundError(f"{directory} has no weights: expected one of {', '.join(checkpoint.WEIGHTS_FILES)}")
    with _policy(dtype):
        lm = cls(cls.family.config_class.from_pretrained(directory), tokenizer)
    checkpoint.read_weights(lm.net.weights, directory / weights)
    return lm


def _policy(dtype):
    """Variables and computation in `dtype` for the models built inside (float32: the global policy as it is)."""
    dtype = tf.as_dtype(dtype)
    if dtype not in (tf.float32, tf.float16, tf.bfloat16):
        raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype.name!r}")
    if dtype == tf.float32:
        return contextlib.nullcontext()
    return global_policy(tf.keras.mixed_precision.Policy(dtype.name))


class CausalLM(tf.keras.Model):
    """A causal language model: `call` gives logits, `generate` decodes with compiled XLA programs.

    The base of one class per model family (`GPT2LM`, `GPTJLM`): each wraps
    its family's transformers TF model (pass one, or a config to build a fresh
    one) and the `Tokenizer` that goes with it; `self.net` is the
    `tfgen.families.Family` that decoding runs through.
    `CausalLM.from_pretrained` picks the class from config.json's model_type.
    """

    # The tfgen.families class (a families.Family subclass), set by each subclass; Any, as the base's None is
    # never used where a family's attributes are read.
    family: ClassVar[Any] = None
    model_attribute: ClassVar[Any] = None  # where the wrapped transformers model is kept (lm.gpt2, lm.gptj)
    _by_model_type: ClassVar[dict[str, type[CausalLM]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:  # a family's own class, not a user's subclass of it
            CausalLM._by_model_type[cls.family.model_type] = cls

    def __init__(self, model_or_config: Any, tokenizer: Tokenizer | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if type(self) is CausalLM:
            raise TypeError("CausalLM is the base class; use CausalLM.from_pretrained, GPT2LM or GPTJLM")
        family = self.family
        model = (
            model_or_config if isinstance(model_or_config, family.transformers_class) else family.build(model_or_config)
        )
        setattr(self, self.model_attribute, model)
        self.net = family(model)
        self.tokenizer = tokenizer
        self.lora = None  # the `lora.Adapters` after enable_lora
        self.decoder = Decoder(self.net)
        self(tf.zeros([1, 1], tf.int32))  # builds the weights, so summary() and saving work at once

    @property
    def config(self) -> Any:
        return self.net.config

    def call(self, input_ids: Any, attention_mask: Any = None, training: bool = False) -> tf.Tensor:
        """Float32 logits [batch, len, vocab] (also under mixed precision).

        Takes ids and a mask, or a dict with those keys (Keras-style inputs).
        """
        if isinstance(input_ids, dict):
            input_ids, attention_mask = input_ids["input_ids"], input_ids.get("attention_mask")
        # Keras' build_from_config (loading a .keras file) calls with float zeros.
        return self.net.logits(tf.cast(input_ids, tf.int32), attention_mask, training)

    def compile(
        self,
        optimizer: Any = None,
        loss: Any = None,
        weighted_metrics: Any = None,
        jit_compile: bool | Literal["auto"] = "auto",
        **kwargs: Any,
    ) -> None:
        """Keras compile with language-model defaults.

        optimizer: `training.adamw()` (AdamW, lr 5e-5, no decay on LayerNorm and
        biases, global-norm clipping); loss: cross-entropy over real (non-pad)
        target tokens; weighted_metrics: masked accuracy and perplexity;
        jit_compile: True compiles the train step with XLA; "auto" does so on
        GPUs and TPUs, not on CPUs (see `training.xla_pays_off`).
        """
        if jit_compile == "auto":
            jit_compile = xla_pays_off(self.distribute_strategy)
        super().compile(
            optimizer=adamw() if optimizer is None else optimizer,
            loss=MaskedLMLoss() if loss is None else loss,
            weighted_metrics=default_metrics() if weighted_metrics is None else weighted_metrics,
            jit_compile=jit_compile,
            **kwargs,
        )

    def get_config(self):
        return self.config.to_dict()

    @classmethod
    def from_config(cls, config: Any, tokenizer: Tokenizer | None = None) -> CausalLM:
        """A new, randomly initialised model, for training from scratch.

        `config` is the family's config (`GPT2Config`, `GPTJConfig`) or a dict of its
        fields. With a tokenizer, the vocabulary size and the BOS/EOS/pad ids are taken from it.
        """
        config_class = cls.family.config_class
        config = config_class(**config) if isinstance(config, dict) else config_class(**config.to_dict())
        if tokenizer is not None:
            config.vocab_size = tokenizer.vocab_size
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
        return cls(config, tokenizer)

    @classmethod
    def from_pretrained(cls, name_or_path: PathLike, dtype: str = "float32", **special_tokens: str) -> CausalLM:
        """Loads an HF-layout checkpoint directory (or hub id) and the tokenizer stored beside it.

        Weights are read from the first of model.safetensors, its sharded index,
        tf_model.h5, pytorch_model.bin and its index that the directory has,
        by `checkpoint.read_weights` (neither TensorFlow's, transformers' nor
        PyTorch's loaders), so no torch is needed.
        `dtype` ("float32", "bfloat16" or "float16") is the dtype of the weights and the
        computation (logits stay float32): the model is built in it and each tensor is read
        from the files straight into its variable, so a model is never held in float32
        first nor twice.
        Called on `CausalLM`, the class comes from config.json's model_type (as
        `AutoModelForCausalLM` does): `GPT2LM` for gpt2, `GPTJLM` for gptj.
        `special_tokens` (bos_token="</s>", eos_token=..., unk_token, pad_token,
        mask_token) override the tokenizer's, as `PreTrainedTokenizerFast.from_pretrained`
        takes them; an overridden BOS, EOS or pad token also sets the model's id
        for it (what generate stops at and pads with).
        """
        directory = resolve_model_dir(name_or_path)
        if not (directory / checkpoint.CONFIG_FILE).exists():
            raise FileNotFoundError(f"{directory} has no {checkpoint.CONFIG_FILE}; is it a model checkpoint?")
        model_type = _model_type(directory) or (cls.family and cls.family.model_type)  # old configs lack it
        family = families.family_of(model_type, f"{directory / checkpoint.CONFIG_FILE}")
        if cls.family is None:
            cls = CausalLM._by_model_type[family.model_type]
        elif cls.family is not family:
            raise ValueError(
                f"{directory} holds a {model_type} model, which {cls.__name__} cannot load; "
                f"use tfgen.CausalLM.from_pretrained, which picks the class from config.json"
            )
        try:
            tokenizer = Tokenizer.from_pretrained(directory, **special_tokens)
        except FileNotFoundError:
            if special_tokens:
                raise ValueError(f"{directory} has no tokenizer files, so its special tokens cannot be set") from None
            tokenizer = None
        lm = _load_weights(cls, directory, tokenizer, dtype)
        warn_if_vocabulary_differs(tokenizer, lm.config.vocab_size, directory)
        for key in ("bos_token", "eos_token", "pad_token"):
            if key in special_tokens:
                setattr(lm.config, f"{key}_id", getattr(tokenizer, f"{key}_id"))
        return lm

    def with_dtype(self, dtype: str) -> CausalLM:
        """A copy with its weights and computation in `dtype`, e.g. "bfloat16" (half the memory; logits stay float32)."""
        if self.lora is not None:
            raise ValueError(
                "with_dtype copies the base weights only, not LoRA adapters; save_pretrained the model "
                "(merged weights) and load that with CausalLM.from_pretrained(directory, dtype=...)"
            )
        with _policy(dtype):
            copy = type(self)(self.family.config_class(**self.config.to_dict()), self.tokenizer)
        for target, source in zip(copy.net.weights, self.net.weights):
            target.assign(tf.cast(source, target.dtype))
        return copy

    def save(self, filepath, overwrite=True, save_format=None, **kwargs):
        """Keras' save, in the Keras format only: a `.keras` file (weights, config and tokenizer).

        Keras' HDF5 and SavedModel formats cannot hold this model; they raise
        an error that names what to use instead.
        """
        if self.lora is not None:
            raise NotImplementedError(
                "a model with LoRA adapters is saved with save_pretrained (merged weights) or "
                "save_lora_adapter (the adapter in PEFT's layout), not as a Keras file"
            )
        if save_format not in (None, "keras") or not str(filepath).endswith(".keras"):
            raise NotImplementedError(
                f"{type(self).__name__}.save writes only the Keras format (a path ending in .keras), "
                f"not {str(filepath)!r}; {_SAVE_INSTEAD}"
            )
        super().save(filepath, overwrite=overwrite, save_format=save_format, **kwargs)

    def save_assets(self, directory):
        """Keras-format hook: the tokenizer files go into the .keras archive."""
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    def load_assets(self, directory):
        """Keras-format hook: the tokenizer comes back from the .keras archive."""
        if any(Path(directory).iterdir()):
            self.tokenizer = Tokenizer.from_pretrained(directory)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # Keras' SavedModel format (tf.keras.models.save_model to a directory, tf.saved_model.save) cannot
        # trace the wrapped transformers model; checkpoints (save_weights) pass.
        if save_type == "savedmodel":
            raise NotImplementedError(f"{type(self).__name__} cannot be saved as a Keras SavedModel; {_SAVE_INSTEAD}")
        return super()._trackable_children(save_type, **kwargs)

    def save_pretrained(self, directory: PathLike) -> None:
        """Writes config, tf_model.h5, a PyTorch-layout model.safetensors and the tokenizer, atomically.

        With LoRA enabled the weights are merged (W + (alpha / r) A B in each
        target): a plain checkpoint that transformers and tfgen load without adapters.
        """
        with checkpoint.atomic_directory(directory) as staging:
            self.write_checkpoint_files(staging)

    def write_checkpoint_files(self, directory: PathLike) -> None:
        """save_pretrained's files, written into an existing directory (not atomically)."""
        directory = Path(directory)
        merged = (
            self.lora.merged_into_base(self.net.lora_layers()) if self.lora is not None else contextlib.nullcontext()
        )
        with merged:
            self.net.model.save_pretrained(directory, safe_serialization=False)
            checkpoint.write_safetensors(self.net.model.weights, directory / checkpoint.SAFETENSORS_FILE)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    def enable_lora(self, rank: int, alpha: float | None = None) -> None:
        """Freezes every weight and adds trainable rank-`rank` LoRA adapters on the attention projections.

        The targets are PEFT's defaults: GPT-2's fused q/k/v projection
        (`c_attn`), GPT-J's `q_proj` and `v_proj`. Each target computes
        x W + b + (alpha / rank) (x A) B; `alpha` defaults to the rank (a
        scaling of 1, as KerasHub's and PEFT's defaults at rank 8). B starts at
        zero, so outputs are unchanged until training. Everything that runs the
        model (call and fit, generate, score, exports) uses the adapters;
        `save_pretrained` writes merged weights, `save_lora_adapter` the adapter
        alone in PEFT's layout. Call it before `compile`.
        """
        self._check_lora_can_be_enabled()
        self._use_adapters(lora.Adapters(self.net.lora_layers(), rank, alpha))

    def _check_lora_can_be_enabled(self):
        if self.lora is not None:
            raise ValueError(
                f"LoRA is already enabled on this model (rank {self.lora.rank}); enable it once, or "
                "load the model again for other settings"
            )
        if self._is_compiled:
            raise ValueError(
                "enable_lora must come before compile(): compile sets up the optimizer for the "
                "trainable weights; call lm.enable_lora(rank) and then lm.compile()"
            )

    def _use_adapters(self, adapters):
        self.net.model.trainable = False
        adapters.attach(self.net.lora_layers())
        self.lora = self.net.adapters = adapters
        self.decoder = Decoder(self.net)  # programs traced before would run without the adapters

    def save_lora_adapter(self, directory: PathLike, base_model_name_or_path: str | None = None) -> None:
        """Writes the LoRA adapter alone in PEFT's layout (adapter_config.json, adapter_model.safetensors), atomically.

        `PeftModel.from_pretrained(base, directory)` and `load_lora_adapter`
        read it. base_model_name_or_path (the config's field) defaults to where the base model was loaded from.
        """
        if self.lora is None:
            raise ValueError("this model has no LoRA adapter; call enable_lora(rank) and train it first")
        with checkpoint.atomic_directory(directory) as staging:
            self.lora.write(staging, base_model_name_or_path or self.config.name_or_path)

    def load_lora_adapter(self, directory: PathLike) -> None:
        """Reads a PEFT LoRA adapter (as `save_lora_adapter` or PEFT writes it) onto this base model.

        Enables LoRA with the adapter's rank and alpha first, unless it is enabled with the same.
        """
        config = lora.read_peft_config(directory)
        if self.lora is not None:
            self.lora.read(directory)
            return
        self._check_lora_can_be_enabled()
        adapters = lora.Adapters(self.net.lora_layers(), config["r"], config["lora_alpha"])
        adapters.read(directory)
        self._use_adapters(adapters)

    @overload
    def generate(
        self,
        input_ids: npt.ArrayLike,
        attention_mask: npt.ArrayLike | None = None,
        return_dict_in_generate: Literal[False] = False,
        output_scores: bool = False,
        streamer: Any = None,
        **kwargs: Any,
    ) -> tf.Tensor: ...

    @overload
    def generate(
        self,
        input_ids: npt.ArrayLike,
        attention_mask: npt.ArrayLike | None = None,
        *,
        return_dict_in_generate: Literal[True],
        output_scores: bool = False,
        streamer: Any = None,
        **kwargs: Any,
    ) -> GenerationOutput: ...

    def generate(
        self,
        input_ids: npt.ArrayLike,
        attention_mask: npt.ArrayLike | None = None,
        return_dict_in_generate: bool = False,
        output_scores: bool = False,
        streamer: Any = None,
        **kwargs: Any,
    ) -> tf.Tensor | GenerationOutput:
        """Token ids [batch * num_return_sequences, len + new], as transformers' generate returns them.

        With return_dict_in_generate, a `GenerationOutput`; output_scores adds
        each new token's log-probability (under the processed and warped
        distribution it was chosen from, 0 after EOS) and, for beams, the
        sequence scores.

        Takes transformers' arguments (max_new_tokens, max_length, do_sample,
        temperature, top_k, top_p, num_return_sequences, eos_token_id (one id
        or a list), pad_token_id, num_beams, early_stopping, length_penalty,
        repetition_penalty, no_repeat_ngram_size, min_length, min_new_tokens)
        plus `seed` for reproducible sampling, and OpenAI's `presence_penalty` and `frequency_penalty` (from -2
        to 2: each new token's score less frequency_penalty times its count among the tokens generated so far,
        less presence_penalty if that count is positive).

        streamer: an object with transformers' streamer protocol (e.g. its
        `TextStreamer` or `TextIteratorStreamer` given this model's tokenizer):
        `put` gets the prompt ids [rows, len] once, then each step's new tokens
        [rows] as they are decoded, and `end` is called at the end. The tokens
        are the same as without a streamer. Not with beam search.
        """
        input_ids, attention_mask, options = self._checked(input_ids, attention_mask, kwargs)
        if streamer is not None and options.num_beams > 1:
            raise ValueError(
                "a streamer cannot be used with beam search (num_beams > 1); stream with greedy "
                "decoding or sampling, or drop the streamer"
            )
        repeats = 1 if options.num_beams > 1 else options.num_return_sequences  # beam search returns several itself
        input_ids, attention_mask = np.repeat(input_ids, repeats, axis=0), np.repeat(attention_mask, repeats, axis=0)
        if streamer is None:
            out = self.decoder(input_ids, attention_mask, options)
        else:
            streamer.put(input_ids)
            out = drain(
                self.decoder.stream(input_ids, attention_mask, options),
                lambda block: [streamer.put(column) for column in block.T],
            )
            streamer.end()
        if not return_dict_in_generate:
            return tf.constant(out["sequences"])
        scores = out["sequences_scores"]
        return GenerationOutput(
            sequences=tf.constant(out["sequences"]),
            token_logprobs=tf.constant(out["token_logprobs"]) if output_scores else None,
            sequences_scores=tf.constant(scores) if output_scores and scores is not None else None,
        )

    def _checked(self, input_ids, attention_mask, kwargs):
        """generate()'s inputs as numpy [batch, len] arrays and its checked `GenerationOptions`."""
        input_ids = np.asarray(input_ids, dtype=np.int32)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {input_ids.shape}")
        kwargs = {"eos_token_id": self.config.eos_token_id, "pad_token_id": self.config.pad_token_id, **kwargs}
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.asarray(attention_mask, dtype=np.int32).reshape(input_ids.shape)
        longest_prompt = int(attention_mask.sum(axis=1).max())
        options = resolve_options(input_ids.shape[1], **kwargs)
        if longest_prompt + options.max_new_tokens > self.net.context:
            raise ValueError(
                f"the prompt ({longest_prompt} tokens) plus max_new_tokens ({options.max_new_tokens}) exceeds the "
                f"model's context of {self.net.context} tokens; shorten the prompt or lower max_new_tokens"
            )
        return input_ids, attention_mask, options

    def _eos_ids(self, kwargs):
        return set(np.atleast_1d(kwargs.get("eos_token_id", self.config.eos_token_id) or []).tolist())

    def complete(self, prompts: Iterable[str], **kwargs: Any) -> list[list[Completion]]:
        """For each prompt, a list of num_return_sequences `Completion`s."""
        tokenizer = self._text_tokenizer()
        input_ids, attention_mask = tokenizer.encode_batch(list(prompts))
        sequences = self.generate(input_ids, attention_mask, **kwargs).numpy()
        eos_ids = self._eos_ids(kwargs)
        repeats = len(sequences) // len(input_ids)
        width = input_ids.shape[1]
        results = []
        for i, mask in enumerate(attention_mask):
            prompt_ids = input_ids[i][mask == 1].tolist()
            prompt_text = tokenizer.decode(prompt_ids)
            results.append(
                [
                    tokenizer.completion(prompt_ids, row[width:], eos_ids, prompt_text)
                    for row in sequences[i * repeats : (i + 1) * repeats]
                ]
            )
        return results

    def stream_text(self, prompt: str, return_full_text: bool = False, **kwargs: Any) -> Iterator[str]:
        """Generates from one prompt, yielding the new text in pieces as it is decoded.

        The pieces join to exactly what `generate_text(prompt,
        return_full_text=False, **kwargs)` returns (with return_full_text, the
        decoded prompt comes first). A piece never ends inside a character: a
        character spelled by several byte tokens waits for its last byte. Takes
        generate()'s settings, for one returned sequence and without beams.
        """
        if not isinstance(prompt, str):
            raise ValueError(
                f"stream_text takes one prompt string, got {type(prompt).__name__}; "
                "use generate_text for several prompts"
            )
        if kwargs.get("num_return_sequences", 1) != 1 or kwargs.get("num_beams", 1) != 1:
            raise ValueError(
                "stream_text makes one sequence without beams; use generate_text for "
                "num_return_sequences > 1 or num_beams > 1"
            )
        tokenizer = self._text_tokenizer()
        prompt_ids = tokenizer.encode(prompt)
        prompt_text = tokenizer.decode(prompt_ids)
        input_ids, attention_mask, options = self._checked([prompt_ids], None, kwargs)
        blocks = self.decoder.stream(input_ids, attention_mask, options)
        pieces = tokenizer.text_pieces(prompt_ids, (block[0] for block in blocks), self._eos_ids(kwargs), prompt_text)
        return itertools.chain([prompt_text], pieces) if return_full_text else pieces

    def _text_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids to generate() instead")
        return self.tokenizer

    def generate_text(
        self, prompts: str | Sequence[str], return_full_text: bool = True, **kwargs: Any
    ) -> str | list[str] | list[list[str]]:
        """Generates from a string or a list of strings.

        Returns a string per prompt (a list of them when num_return_sequences > 1);
        a single prompt gives a single result, a list gives a list.
        """
        single = isinstance(prompts, str)
        return completion_texts(
            self.complete([prompts] if isinstance(prompts, str) else prompts, **kwargs), return_full_text, single
        )

    def score(self, texts: str | Iterable[str], stride: int | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """How likely the model finds each text (a str gives one dict, a list a list of dicts).

        Each dict has `tokens` (the `Tokenizer.token_text` of each id of
        `tokenizer.encode(text)`, with the special tokens the tokenizer adds), `token_logprobs` (the natural-log
        probability of each token after the first given those before it),
        `logprob` (their sum) and `perplexity` (exp of minus their mean).
        A text longer than the context is scored in windows of the context, each
        `stride` tokens after the one before (1 <= stride < context; default: half
        the context), each token given the tokens before it in its window (see `scoring.windows`).
        """
        from tfgen import scoring

        if isinstance(texts, str):
            return scoring.score(self, [texts], stride)[0]
        return scoring.score(self, list(texts), stride)

    def top_choices(self, prompt: str, steps: int = 8, k: int = 5) -> list[dict[str, Any]]:
        """Greedy decoding laid open: one dict per step with `input` (the text so far) and `choices`.

        `choices` are the k likeliest next tokens as (token_text, probability),
        best first; the first is the one taken.
        """
        from tfgen import scoring

        return scoring.top_choices(self, prompt, steps, k)


class GPT2LM(CausalLM):
    """GPT-2 (KoGPT2, ko-mini): wraps a transformers `TFGPT2LMHeadModel` (`.gpt2`), or builds one from a `GPT2Config`."""

    family = families.GPT2
    model_attribute = "gpt2"


class GPTJLM(CausalLM):
    """GPT-J (KoGPT): wraps a transformers `TFGPTJForCausalLM` (`.gptj`), or builds one from a `GPTJConfig`."""

    family = families.GPTJ
    model_attribute = "gptj"
