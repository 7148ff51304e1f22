"""generate()'s settings: transformers' names and defaults, checked once for the API and the CLI."""

import dataclasses
import random

DEFAULT_MAX_LENGTH = 20  # transformers' GenerationConfig default


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


def _as_id_tuple(token_ids):
    if token_ids is None:
        return ()
    if isinstance(token_ids, int):
        return (token_ids,)
    return tuple(int(t) for t in token_ids)


def resolve_options(
    prompt_length,
    *,
    max_new_tokens=None,
    max_length=None,
    do_sample=False,
    temperature=1.0,
    top_k=50,
    top_p=1.0,
    num_return_sequences=1,
    eos_token_id=None,
    pad_token_id=None,
    seed=None,
):
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
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}; use do_sample=False for greedy")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}; 1 switches top-p filtering off")
    if top_k is None:
        top_k = 0
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}; 0 switches top-k filtering off")
    if int(num_return_sequences) != num_return_sequences or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError(
            "greedy decoding returns one sequence per prompt; num_return_sequences > 1 needs do_sample=True"
        )
    eos_token_ids = _as_id_tuple(eos_token_id)
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
    )
