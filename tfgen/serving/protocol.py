"""OpenAI's completions API: request checking and the response objects, as pure functions over dicts.

A request body becomes a `CompletionRequest` (or an `APIError` naming the field and the fix);
responses, stream chunks and errors are the JSON objects OpenAI's clients parse.
"""

import dataclasses
import time
import uuid

import numpy as np

from tfgen.generation.options import MAX_NGRAM_SIZE

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
MAX_LOGPROBS = 5  # OpenAI's limit on `logprobs`


class APIError(Exception):
    """An error the client gets as OpenAI's error object, with an HTTP status."""

    def __init__(self, message, status=400, param=None, error_type="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.message, self.status, self.param, self.error_type, self.code = message, status, param, error_type, code
        self.headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one row decodes: tfgen's generate settings for one choice."""

    max_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    no_repeat_ngram_size: int
    min_tokens: int
    seed: int = None  # None: the server draws the randomness


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple
    n: int
    stream: bool
    stop: tuple
    logprobs: int  # None: no logprobs
    sampling: Sampling
    user: str = None


def _number(body, name, default, low=None, high=None, low_open=False, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(f"`{name}` must be {kind}, got {value!r}", param=name)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        left = "(" if low_open else "["
        raise APIError(f"`{name}` must be in {left}{low}, {high if high is not None else 'inf'}], got {value!r}",
                       param=name)
    return value


def _prompts(value):
    if isinstance(value, str):
        prompts = (value,)
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = tuple(value)
    else:
        raise APIError("`prompt` must be a string or a non-empty list of strings (token-id prompts are not "
                       f"supported), got {type(value).__name__}", param="prompt")
    if any(not p for p in prompts):
        raise APIError("`prompt` must not be empty; give some text", param="prompt")
    return prompts


def _stop(value):
    if value is None:
        return ()
    stops = (value,) if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError("`stop` must be a non-empty string or a list of up to 4 of them", param="stop")
    return tuple(stops)


KNOWN_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "seed", "stop", "logprobs",
                "user", "top_k", "repetition_penalty", "no_repeat_ngram_size", "min_tokens", "echo", "best_of",
                "presence_penalty", "frequency_penalty", "logit_bias", "suffix", "stream_options"}
# OpenAI fields tfgen does not implement: accepted only at the value that means "off".
_NEUTRAL = {"echo": (False,), "best_of": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
            "logit_bias": ({},), "suffix": ("",), "stream_options": ()}


def parse_completion_request(body, served_model):
    """A checked CompletionRequest from a decoded JSON body; APIError (400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(f"unknown field(s) {', '.join(unknown)}; see the completions API", param=unknown[0])
    for name, neutral in _NEUTRAL.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise APIError(f"`{name}` is not supported by tfgen serve; leave it out", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("`model` is required: a string (GET /v1/models lists the served model)", param="model")
    if model != served_model:
        raise APIError(f"model {model!r} is not served here; this server serves {served_model!r}",
                       status=404, param="model", code="model_not_found")
    if "prompt" not in body:
        raise APIError("`prompt` is required", param="prompt")
    for name in ("stream",):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise APIError(f"`{name}` must be true or false", param=name)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise APIError("`user` must be a string", param="user")
    temperature = _number(body, "temperature", 1.0, 0, 2)
    logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    stream = bool(body.get("stream"))
    if stream and logprobs is not None:
        raise APIError("`logprobs` with `stream` is not supported; ask for logprobs without streaming",
                       param="logprobs")
    sampling = Sampling(
        max_tokens=_number(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, integer=True),
        do_sample=temperature > 0,
        temperature=float(temperature) if temperature > 0 else 1.0,
        top_k=_number(body, "top_k", 0, 0, integer=True),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, low_open=True)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0, low_open=True)),
        no_repeat_ngram_size=_number(body, "no_repeat_ngram_size", 0, 0, MAX_NGRAM_SIZE, integer=True),
        min_tokens=_number(body, "min_tokens", 0, 0, integer=True),
        seed=_number(body, "seed", None, 0, 2**31 - 1, integer=True),
    )
    if sampling.min_tokens > sampling.max_tokens:
        raise APIError(f"`min_tokens` ({sampling.min_tokens}) must be at most `max_tokens` ({sampling.max_tokens})",
                       param="min_tokens")
    return CompletionRequest(
        model=model, prompts=_prompts(body["prompt"]), n=_number(body, "n", 1, 1, 128, integer=True),
        stream=stream, stop=_stop(body.get("stop")), logprobs=logprobs, sampling=sampling, user=body.get("user"),
    )


def choice_seed(seed, choice):
    """The seed of a request's choice: its `seed` for the first, one drawn from (seed, choice) for the others, so
    the `n` choices of a seeded request differ and the request repeats exactly; None (unseeded) stays None."""
    if seed is None or choice == 0:
        return seed
    return int(np.random.SeedSequence([seed, choice]).generate_state(1)[0]) % 2**31


def row_settings(sampling, seed):
    """A row's values of tfgen.generation.decode.ROW_SETTINGS for a request's `Sampling` (temperature 0: greedy)."""
    return {
        "temperature": sampling.temperature if sampling.do_sample else 0.0,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "seed": seed,
        "draw_index": 0,  # the row's draws come from its own seed and step count alone
        "repetition_penalty": sampling.repetition_penalty,
        "no_repeat_ngram_size": sampling.no_repeat_ngram_size,
        "min_new_steps": sampling.min_tokens,
    }


def completion_id():
    return f"cmpl-{uuid.uuid4().hex}"


def choice(index, text, finish_reason, logprobs=None):
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(request_id, model, choices, prompt_tokens, completion_tokens, created=None):
    """The response of a non-streamed request, or (with one choice) a stream chunk."""
    body = {"id": request_id, "object": "text_completion", "created": int(created or time.time()), "model": model,
            "choices": choices}
    if prompt_tokens is not None:
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
    return body


def logprobs_object(tokens, token_logprobs, top_logprobs, text_offset):
    """OpenAI's legacy `logprobs`: per token its text, log-probability, best alternatives and character offset."""
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def models_list(model, created):
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "tfgen"}]}
