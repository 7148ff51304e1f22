"""generate()'s settings: transformers' names and defaults, checked once for the API and the CLI."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

DEFAULT_MAX_LENGTH = 20  # transformers' GenerationConfig default
# no_repeat_ngram_size is a runtime tensor of the decode programs (tfgen.generation.processors); it may be at most this.
MAX_NGRAM_SIZE = 8
MAX_OPENAI_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2], as OpenAI's

# What the request-time settings must be, in the words of resolve_options and of the exported
# model's request checks (tfgen.export); {} is the value given.
RULES = {
    "max_new_tokens": "max_new_tokens must be a positive integer, got {}",
    "temperature": "temperature must be > 0 when sampling, got {}; use do_sample=False for greedy",
    "top_p": "top_p must be in (0, 1], got {}; 1 switches top-p filtering off",
    "top_k": "top_k must be a non-negative integer, got {}; 0 switches top-k filtering off",
    "repetition_penalty": "repetition_penalty must be > 0, got {}; 1 switches it off",
    "no_repeat_ngram_size": f"no_repeat_ngram_size must be an integer from 0 (off) to {MAX_NGRAM_SIZE}, got {{}}",
    "presence_penalty": "presence_penalty must be a number from -2 to 2, got {}; 0 switches it off",
    "frequency_penalty": "frequency_penalty must be a number from -2 to 2, got {}; 0 switches it off",
}


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    num_return_sequences: int
    eos_token_ids: tuple
    pad_token_id: int
    seed: int
    num_beams: int
    early_stopping: object  # True, False or "never"
    length_penalty: float
    repetition_penalty: float
    no_repeat_ngram_size: int
    min_new_steps: int  # EOS is banned before this many new tokens (min_length and min_new_tokens)
    bad_words_ids: tuple  # of token-id tuples
    presence_penalty: float = 0.0  # OpenAI's additive penalties (tfgen.generation.processors)
    frequency_penalty: float = 0.0


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _as_id_tuple(token_ids):
    if token_ids is None:
        return ()
    if isinstance(token_ids, int):
        return (token_ids,)
    return tuple(int(t) for t in token_ids)


def _bad_words(bad_words_ids, eos_token_ids):
    """Checked bad words; like transformers, a single-token bad word that is an EOS id is dropped."""
    if not bad_words_ids:
        return ()
    if not isinstance(bad_words_ids, (list, tuple)) or not all(
        isinstance(word, (list, tuple)) and word and all(_is_int(t) and t >= 0 for t in word) for word in bad_words_ids
    ):
        raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids, got {bad_words_ids!r}")
    return tuple(
        tuple(int(t) for t in word) for word in bad_words_ids if not (len(word) == 1 and word[0] in eos_token_ids)
    )


def resolve_options(
    prompt_length: int,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    num_beams: int = 1,
    early_stopping: bool | Literal["never"] = False,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_length: int = 0,
    min_new_tokens: int = 0,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> GenerationOptions:
    """Checks generate()'s arguments for prompts `prompt_length` tokens wide; raises ValueError naming the fix."""
    if max_new_tokens is None:
        max_length = DEFAULT_MAX_LENGTH if max_length is None else max_length
        max_new_tokens = max_length - prompt_length
        if max_new_tokens < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room after the prompt of {prompt_length} tokens; "
                "pass max_new_tokens (or a larger max_length)"
            )
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(RULES["max_new_tokens"].format(repr(max_new_tokens)))
    if do_sample and not temperature > 0:
        raise ValueError(RULES["temperature"].format(repr(temperature)))
    if not 0 < top_p <= 1:
        raise ValueError(RULES["top_p"].format(repr(top_p)))
    if top_k is None:
        top_k = 0
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(RULES["top_k"].format(repr(top_k)))
    if int(num_return_sequences) != num_return_sequences or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    if not _is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported; pick one")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be at most num_beams ({num_beams})")
    if num_return_sequences > 1 and num_beams == 1 and not do_sample:
        raise ValueError(
            "greedy decoding returns one sequence per prompt; num_return_sequences > 1 needs do_sample=True "
            "or num_beams >= num_return_sequences"
        )
    if early_stopping not in (True, False, "never"):
        raise ValueError(f'early_stopping must be True, False or "never", got {early_stopping!r}')
    if not repetition_penalty > 0:
        raise ValueError(RULES["repetition_penalty"].format(repr(repetition_penalty)))
    no_repeat_ngram_size = no_repeat_ngram_size or 0
    if not _is_int(no_repeat_ngram_size) or not 0 <= no_repeat_ngram_size <= MAX_NGRAM_SIZE:
        raise ValueError(RULES["no_repeat_ngram_size"].format(repr(no_repeat_ngram_size)))
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.number))
            or not -MAX_OPENAI_PENALTY <= value <= MAX_OPENAI_PENALTY
        ):
            raise ValueError(RULES[name].format(repr(value)))
    for name, value in (("min_length", min_length), ("min_new_tokens", min_new_tokens)):
        if not _is_int(value or 0) or (value or 0) < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    eos_token_ids = _as_id_tuple(eos_token_id)
    bad_words = _bad_words(bad_words_ids, eos_token_ids)
    if pad_token_id is None:
        pad_token_id = eos_token_ids[0] if eos_token_ids else 0
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    return GenerationOptions(
        max_new_tokens=int(max_new_tokens),
        do_sample=bool(do_sample),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        num_return_sequences=int(num_return_sequences),
        eos_token_ids=eos_token_ids,
        pad_token_id=int(pad_token_id),
        seed=int(seed),
        num_beams=int(num_beams),
        early_stopping=early_stopping,
        length_penalty=float(length_penalty),
        repetition_penalty=float(repetition_penalty),
        no_repeat_ngram_size=int(no_repeat_ngram_size),
        min_new_steps=max(int(min_new_tokens or 0), int(min_length or 0) - prompt_length),
        bad_words_ids=bad_words,
        presence_penalty=float(presence_penalty),
        frequency_penalty=float(frequency_penalty),
    )
