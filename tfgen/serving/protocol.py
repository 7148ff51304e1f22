"""OpenAI's completions and chat completions APIs: request checking and the response objects, as pure functions over dicts.

A request body becomes a `CompletionRequest` (or an `APIError` naming the field and the fix);
responses, stream chunks and errors are the JSON objects OpenAI's clients parse.
"""

import dataclasses
import time
import uuid

import numpy as np

from tfgen.generation.options import MAX_NGRAM_SIZE, MAX_OPENAI_PENALTY

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
DEFAULT_CHAT_MAX_TOKENS = 256
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple = ()  # (token id, bias) pairs


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A checked completions (or chat completions) request."""

    model: str
    prompts: tuple  # each a string, or a tuple of token ids
    n: int
    stream: bool
    stop: tuple
    logprobs: int  # None: no logprobs
    sampling: Sampling
    user: str = None
    echo: bool = False  # the prompt's text (and with logprobs its tokens') comes first
    include_usage: bool = False  # a stream's last chunk carries `usage`


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
        raise APIError(
            f"`{name}` must be in {left}{low}, {high if high is not None else 'inf'}], got {value!r}", param=name
        )
    return value


def _is_token_ids(value):
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _prompts(value):
    """`prompt` as OpenAI takes it: a string, a list of strings, a list of token ids or a list of such lists."""
    if isinstance(value, str):
        prompts = (value,)
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = tuple(value)
    elif _is_token_ids(value):
        prompts = (tuple(value),)
    elif isinstance(value, list) and value and all(_is_token_ids(p) for p in value):
        prompts = tuple(tuple(p) for p in value)
    else:
        raise APIError(
            "`prompt` must be a string, a non-empty list of strings, a list of token ids or a list of "
            f"such lists, got {type(value).__name__}",
            param="prompt",
        )
    if any(not p for p in prompts):
        raise APIError("`prompt` must not be empty; give some text", param="prompt")
    if any(t < 0 for p in prompts if not isinstance(p, str) for t in p):
        raise APIError("token ids in `prompt` must be non-negative", param="prompt")
    return prompts


def _stop(value):
    if value is None:
        return ()
    stops = (value,) if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError("`stop` must be a non-empty string or a list of up to 4 of them", param="stop")
    return tuple(stops)


def _logit_bias(value):
    """`logit_bias` as (token id, bias) pairs: keys are token ids as strings, values biases from -100 to 100."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise APIError("`logit_bias` must be an object of token id (a string) to bias", param="logit_bias")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise APIError(
                f'`logit_bias` keys must be token ids written as strings, like "42"; got {key!r}', param="logit_bias"
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise APIError(
                f"`logit_bias` values must be numbers from -100 to 100, got {bias!r} for {key}", param="logit_bias"
            )
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def _include_usage(body, stream):
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise APIError("`stream_options` is only allowed with `stream: true`", param="stream_options")
    if (
        not isinstance(options, dict)
        or set(options) - {"include_usage"}
        or not isinstance(options.get("include_usage", False), bool)
    ):
        raise APIError('`stream_options` must be {"include_usage": true or false}', param="stream_options")
    return options.get("include_usage", False)


_SAMPLING_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "seed",
    "stop",
    "user",
    "top_k",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stream_options",
}
KNOWN_FIELDS = _SAMPLING_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
# OpenAI fields tfgen does not implement: accepted only at the value that means "off".
_NEUTRAL = {"best_of": (1,), "suffix": ("",), "logprobs": (False,), "top_logprobs": (0,)}


def _checked_fields(body, known, served_model, neutral):
    """The body's `model`, after checks common to both endpoints: a JSON object of known fields, the served model."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(f"unknown field(s) {', '.join(unknown)}; see the API reference", param=unknown[0])
    for name in neutral:
        if body.get(name) is not None and body[name] not in _NEUTRAL[name]:
            raise APIError(f"`{name}` is not supported by tfgen serve; leave it out", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("`model` is required: a string (GET /v1/models lists the served model)", param="model")
    if model != served_model:
        raise APIError(
            f"model {model!r} is not served here; this server serves {served_model!r}",
            status=404,
            param="model",
            code="model_not_found",
        )
    for name in ("stream", "echo"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise APIError(f"`{name}` must be true or false", param=name)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise APIError("`user` must be a string", param="user")
    return model


def _sampling(body, max_tokens):
    temperature = _number(body, "temperature", 1.0, 0, 2)
    sampling = Sampling(
        max_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=float(temperature) if temperature > 0 else 1.0,
        top_k=_number(body, "top_k", 0, 0, integer=True),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, low_open=True)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0, low_open=True)),
        no_repeat_ngram_size=_number(body, "no_repeat_ngram_size", 0, 0, MAX_NGRAM_SIZE, integer=True),
        min_tokens=_number(body, "min_tokens", 0, 0, integer=True),
        seed=_number(body, "seed", None, 0, 2**31 - 1, integer=True),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -MAX_OPENAI_PENALTY, MAX_OPENAI_PENALTY)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -MAX_OPENAI_PENALTY, MAX_OPENAI_PENALTY)),
        logit_bias=_logit_bias(body.get("logit_bias")),
    )
    if sampling.min_tokens > sampling.max_tokens:
        raise APIError(
            f"`min_tokens` ({sampling.min_tokens}) must be at most `max_tokens` ({sampling.max_tokens})",
            param="min_tokens",
        )
    return sampling


def parse_completion_request(body, served_model):
    """A checked CompletionRequest from a decoded JSON body; APIError (400) naming the field otherwise."""
    model = _checked_fields(body, KNOWN_FIELDS, served_model, ("best_of", "suffix"))
    if "prompt" not in body:
        raise APIError("`prompt` is required", param="prompt")
    logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    stream, echo = bool(body.get("stream")), bool(body.get("echo"))
    if stream and logprobs is not None:
        raise APIError(
            "`logprobs` with `stream` is not supported; ask for logprobs without streaming", param="logprobs"
        )
    max_tokens = _number(body, "max_tokens", DEFAULT_MAX_TOKENS, 0, integer=True)
    if max_tokens == 0 and not echo:
        raise APIError(
            "`max_tokens` must be at least 1 (0 is allowed with `echo`, to score the prompt)", param="max_tokens"
        )
    return CompletionRequest(
        model=model,
        prompts=_prompts(body["prompt"]),
        n=_number(body, "n", 1, 1, 128, integer=True),
        stream=stream,
        stop=_stop(body.get("stop")),
        logprobs=logprobs,
        sampling=_sampling(body, max_tokens),
        user=body.get("user"),
        echo=echo,
        include_usage=_include_usage(body, stream),
    )


def _message_text(message, index):
    """A chat message's content as text: a string, or a list of text parts (joined)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(f"`{where}` must be an object with a `role` string and a `content`", param="messages")
    content = message.get("content")
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise APIError(
            f"`{where}.content` must be a string or a list of text parts (tfgen serves text only)", param="messages"
        )
    return {"role": message["role"], "content": content}


def parse_chat_request(body, served_model, render):
    """A checked CompletionRequest from a chat completions body, its one prompt `render(messages)` (the chat
    template's text, or an APIError); APIError (400) naming the field otherwise."""
    model = _checked_fields(body, CHAT_FIELDS, served_model, ("logprobs", "top_logprobs"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("`messages` is required: a non-empty list of {role, content} objects", param="messages")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise APIError("give `max_completion_tokens` or `max_tokens`, not both", param="max_tokens")
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    # OpenAI's chat default is as many as fit: tfgen's is the completions API's, a bound on the row's time.
    max_tokens = _number(body, limit, DEFAULT_CHAT_MAX_TOKENS, 1, integer=True)
    stream = bool(body.get("stream"))
    return CompletionRequest(
        model=model,
        prompts=(render([_message_text(m, i) for i, m in enumerate(messages)]),),
        n=_number(body, "n", 1, 1, 128, integer=True),
        stream=stream,
        stop=_stop(body.get("stop")),
        logprobs=None,
        sampling=_sampling(body, max_tokens),
        user=body.get("user"),
        include_usage=_include_usage(body, stream),
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
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
    }


def logit_bias_row(sampling, vocab):
    """A row's `logit_bias` setting: [vocab] float32, each biased token's bias, 0 elsewhere."""
    row = np.zeros(vocab, np.float32)
    for token, bias in sampling.logit_bias:
        row[token] = bias
    return row


def choice(index, text, finish_reason, logprobs=None):
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(index, text, finish_reason):
    return choice(index, text, finish_reason)


def completion_opening(index, echoed):
    """A completions stream's first chunk of a choice: the echoed prompt, if any."""
    return choice(index, echoed, None) if echoed else None


def chat_choice(index, text, finish_reason, logprobs=None):
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def chat_chunk(index, text, finish_reason):
    """A chat stream's chunk of a choice: a piece of its content, or (with a finish_reason) an empty delta."""
    return {
        "index": index,
        "delta": {"content": text} if finish_reason is None else {},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


def chat_opening(index, echoed):
    """A chat stream's first chunk of a choice: the assistant's role, as OpenAI's."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


@dataclasses.dataclass(frozen=True)
class API:
    """How one endpoint writes its objects: ids, object types, choices and stream chunks."""

    id_prefix: str
    object: str
    chunk_object: str
    choice: object  # (index, text, finish_reason, logprobs) -> a response's choice
    chunk: object  # (index, text, finish_reason) -> a stream chunk's choice
    opening_chunk: object  # (index, echoed text) -> a stream's first choice chunk, or None


COMPLETIONS = API("cmpl", "text_completion", "text_completion", choice, completion_chunk, completion_opening)
CHAT = API("chatcmpl", "chat.completion", "chat.completion.chunk", chat_choice, chat_chunk, chat_opening)


def response_id(api):
    return f"{api.id_prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens, completion_tokens):
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(api, request_id, model, choices, usage=None, created=None, chunk=False):
    """A response of `api`, or (`chunk`) a stream chunk; `usage` where given."""
    body = {
        "id": request_id,
        "object": api.chunk_object if chunk else api.object,
        "created": int(created or time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def logprobs_object(tokens, token_logprobs, top_logprobs, text_offset):
    """OpenAI's legacy `logprobs`: per token its text, log-probability, best alternatives and character offset."""
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def models_list(model, created):
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "tfgen"}]}
