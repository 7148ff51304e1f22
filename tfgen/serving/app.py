"""The ASGI app: OpenAI's completions and chat completions APIs, models, health, metrics, the playground page."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tfgen.serving import protocol
from tfgen.serving.chat import ChatTemplate, ChatTemplateError
from tfgen.serving.engine import Engine
from tfgen.serving.metrics import Metrics
from tfgen.serving.prefix_cache import DEFAULT_TOKENS
from tfgen.serving.protocol import APIError
from tfgen.serving.scheduler import Job, QueueFull

STATIC_DIR = Path(__file__).resolve().parent / "static"
DISCONNECT_POLL_SECONDS = 0.1
_ENGINE_FAILED = APIError("decoding failed on the server; see its log", status=500, error_type="server_error")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    model_name: str  # the id clients pass as `model`
    max_batch: int = 16  # decode slots
    max_queue: int = 64  # rows waiting beyond the slots
    prefix_cache_tokens: int = DEFAULT_TOKENS  # prompt prefixes' keys and values kept for reuse, in tokens; 0: off
    api_key: str | None = None  # None: no authentication
    request_timeout: float = 120.0  # seconds from arrival; a row past it ends with finish_reason "length"
    retry_after: int = 1  # seconds, in a 429's Retry-After
    chat_template: ChatTemplate | None = None  # None: /v1/chat/completions answers 400


def _error_response(error):
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Server:
    """The app's state: settings, metrics and the engine (which owns the model)."""

    def __init__(self, load, settings):
        self.settings = settings
        self.metrics = Metrics(settings.max_batch)
        self.engine = Engine(load, settings.max_batch, settings.max_queue, self.metrics, settings.prefix_cache_tokens)
        self.created = int(time.time())

    def check_key(self, request):
        if self.settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.settings.api_key.encode()):
            raise APIError(
                "missing or wrong API key: send `Authorization: Bearer KEY` with the server's key",
                status=401,
                error_type="authentication_error",
                code="invalid_api_key",
            )

    def check_ready(self):
        if self.engine.failed is not None:
            raise APIError(f"the model failed to load: {self.engine.failed}", status=503, error_type="server_error")
        if not self.engine.ready.is_set():
            raise APIError(
                "the model is still loading; retry shortly (GET /health says when it is ready)",
                status=503,
                error_type="server_error",
                headers={"Retry-After": "1"},
            )

    def jobs_for(self, request, emit):
        """One Job per (prompt, choice), in OpenAI's choice order; 400 for a prompt that does not fit."""
        tokenizer = self.engine.model.tokenizer
        context = self.engine.scheduler.rows.capacity
        deadline = time.monotonic() + self.settings.request_timeout
        unknown = [token for token, _ in request.sampling.logit_bias if not tokenizer.knows(token)]
        if unknown:
            raise APIError(
                f"`logit_bias` names token {unknown[0]}, outside the vocabulary of {tokenizer.vocab_size} tokens",
                param="logit_bias",
            )
        jobs = []
        for prompt in request.prompts:
            prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            if not all(tokenizer.knows(token) for token in prompt_ids):
                raise APIError(
                    f"`prompt` has token ids outside the vocabulary of {tokenizer.vocab_size} tokens", param="prompt"
                )
            if len(prompt_ids) + request.sampling.max_tokens > context:
                raise APIError(
                    f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({request.sampling.max_tokens}) exceeds "
                    f"the model's context of {context} tokens; shorten the prompt or lower max_tokens",
                    param="prompt",
                    code="context_length_exceeded",
                )
            prompt_text = tokenizer.decode(prompt_ids)
            for choice in range(request.n):
                index = len(jobs)
                sampling = dataclasses.replace(
                    request.sampling, seed=protocol.choice_seed(request.sampling.seed, choice)
                )
                jobs.append(
                    Job(
                        prompt_ids,
                        prompt_text,
                        sampling,
                        request.stop,
                        deadline,
                        emit=lambda kind, value, index=index: emit(index, kind, value),
                        top_logprobs=request.logprobs,
                        echo=request.echo,
                    )
                )
        most = self.settings.max_queue + self.settings.max_batch
        if len(jobs) > most:
            raise APIError(
                f"this request needs {len(jobs)} rows (prompts x n); the server holds at most {most}; "
                "send fewer prompts or a smaller n",
                param="n",
            )
        return jobs

    def render_chat(self, messages):
        """The prompt of a chat: its messages rendered by the served chat template."""
        if self.settings.chat_template is None:
            raise APIError(
                "this model has no chat template (no `chat_template` in its tokenizer_config.json); "
                "start the server with `tfgen serve --chat-template FILE` (a Jinja2 template, e.g. "
                "tfgen/serving/templates/interview.jinja), or use /v1/completions",
                param="messages",
            )
        try:
            return self.settings.chat_template.render(messages)
        except ChatTemplateError as error:
            raise APIError(str(error), param="messages") from None


async def _body(request):
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(f"the request body is not valid JSON ({error}); send a JSON object") from None


async def completions(request):
    server = request.app.state.server
    server.check_key(request)
    server.check_ready()
    parsed = protocol.parse_completion_request(await _body(request), server.settings.model_name)
    return await _answer(server, request, parsed, protocol.COMPLETIONS)


async def chat_completions(request):
    server = request.app.state.server
    server.check_key(request)
    body = await _body(request)
    parsed = protocol.parse_chat_request(body, server.settings.model_name, server.render_chat)
    server.check_ready()
    return await _answer(server, request, parsed, protocol.CHAT)


async def _answer(server, request, parsed, api):
    """Queues a parsed request's jobs and answers it in `api`'s objects (protocol.COMPLETIONS or CHAT)."""
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()

    def emit(index, kind, value):  # called on the engine thread
        with contextlib.suppress(RuntimeError):  # the request's event loop is gone (shutdown)
            loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))

    jobs = server.jobs_for(parsed, emit)
    try:
        server.engine.scheduler.submit(jobs)
    except QueueFull:
        raise APIError(
            "the server's queue is full; retry after the Retry-After seconds",
            status=429,
            error_type="rate_limit_exceeded",
            code="queue_full",
            headers={"Retry-After": str(server.settings.retry_after)},
        ) from None
    server.metrics.prompt_tokens.inc(sum(len(job.prompt_ids) for job in jobs))
    answer = _Answer(server, api, parsed, jobs)
    if parsed.stream:
        return EventSourceResponse(
            _stream(answer, events),
            # SIGTERM: let streams in flight finish (uvicorn stops taking new connections meanwhile).
            shutdown_event=anyio.Event(),
            shutdown_grace_period=server.settings.request_timeout,
        )
    return await _collect(answer, request, events)


class _Answer:
    """A request's jobs and how its response objects are written."""

    def __init__(self, server, api, parsed, jobs):
        self.server, self.api, self.parsed, self.jobs = server, api, parsed, jobs
        self.id, self.created = protocol.response_id(api), int(time.time())

    def body(self, choices, usage=None, chunk=False):
        return protocol.response(
            self.api, self.id, self.server.settings.model_name, choices, usage, self.created, chunk
        )

    def usage(self):
        prompt_tokens = sum(len(job.prompt_ids) for job in self.jobs[:: self.parsed.n])  # n jobs per prompt
        return protocol.usage(prompt_tokens, sum(len(job.new_ids) for job in self.jobs))

    def text(self, job):
        return (job.prompt_text if self.parsed.echo else "") + job.text


def _cancel_unfinished(server, jobs):
    for job in jobs:
        if job.finish_reason is None:
            server.engine.scheduler.cancel(job)


async def _collect(answer, request, events):
    """Waits for every job of a non-streamed request; a client that goes away cancels them."""
    server, jobs = answer.server, answer.jobs
    done = 0
    try:
        while done < len(jobs):
            try:
                _, kind, _ = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            done += kind == "done"
    finally:
        _cancel_unfinished(server, jobs)
    if any(job.finish_reason == "error" for job in jobs):
        raise _ENGINE_FAILED
    server.metrics.requests.labels("200").inc()
    choices = [answer.api.choice(i, answer.text(job), job.finish_reason, job.logprobs) for i, job in enumerate(jobs)]
    return JSONResponse(answer.body(choices, answer.usage()))


def _chunk(answer, choice):
    return json.dumps(answer.body([choice], chunk=True), ensure_ascii=False)


async def _stream(answer, events):
    """Server-sent events: a chunk per new piece of text, one with each choice's finish_reason, then [DONE] (after a
    chunk with the usage, for `stream_options.include_usage`). The generator is cancelled when the client goes
    away; its jobs are cancelled with it."""
    server, jobs, api = answer.server, answer.jobs, answer.api
    done = 0
    try:
        for index, job in enumerate(jobs):  # the chat's assistant role, the echoed prompt
            opening = api.opening_chunk(index, job.prompt_text if answer.parsed.echo else "")
            if opening is not None:
                yield _chunk(answer, opening)
        while done < len(jobs):
            index, kind, value = await events.get()
            if kind == "done" and value == "error":
                yield json.dumps(_ENGINE_FAILED.body())
                return
            if kind == "text":
                yield _chunk(answer, api.chunk(index, value, None))
            else:
                done += 1
                yield _chunk(answer, api.chunk(index, "", value))
        if answer.parsed.include_usage:
            yield json.dumps(answer.body([], answer.usage(), chunk=True))
        server.metrics.requests.labels("200").inc()
        yield "[DONE]"
    finally:
        _cancel_unfinished(server, jobs)


async def models(request):
    server = request.app.state.server
    server.check_key(request)
    return JSONResponse(protocol.models_list(server.settings.model_name, server.created))


async def health(request):
    engine = request.app.state.server.engine
    if engine.failed is not None:
        return JSONResponse({"status": "failed", "error": str(engine.failed)}, status_code=503)
    if not engine.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    scheduler = engine.scheduler
    return JSONResponse(
        {
            "status": "ok",
            "busy_slots": scheduler.busy_slots(),
            "slots": scheduler.rows.slots,
            "queued": len(scheduler.waiting),
        }
    )


async def metrics(request):
    return Response(generate_latest(request.app.state.server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def playground(request):
    return FileResponse(STATIC_DIR / "index.html")


async def _api_error(request, error):
    request.app.state.server.metrics.requests.labels(str(error.status)).inc()
    return _error_response(error)


async def _http_error(request, error):
    return _error_response(APIError(error.detail, status=error.status_code, error_type="invalid_request_error"))


async def _internal_error(request, error):
    # Never a traceback to the client; the server's log has it.
    return _error_response(
        APIError(f"internal error ({type(error).__name__}); see the server log", status=500, error_type="server_error")
    )


def create_app(load: Callable[[], Any], settings: ServerSettings) -> Starlette:
    """The Starlette app; `load()` returns the model to serve, a serving.models model (called on the engine thread
    at startup)."""
    server = Server(load, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        await anyio.to_thread.run_sync(server.engine.stop)

    app = Starlette(
        routes=[
            Route("/", playground),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.server = server
    return app
