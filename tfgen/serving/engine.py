"""The engine: loads the model on its own thread, warms it up, then runs the scheduler's loop there.

The model (TensorFlow or LiteRT, see serving.models) runs only on this thread; request handlers reach it
through the scheduler.
"""

import logging
import threading
import time

import numpy as np

from tfgen.serving import protocol
from tfgen.serving.prefix_cache import PrefixCache
from tfgen.serving.scheduler import Scheduler
from tfgen.tokenizer import INCOMPLETE

WARMUP_PROMPT = "안녕하세요"
log = logging.getLogger("uvicorn.error")  # the server's log


def token_logprobs(model, prompt_ids, new_ids, top, echo=False):
    """OpenAI's `logprobs` object for new_ids after prompt_ids (with `echo`, for the prompt's tokens first; the
    first token, which nothing precedes, has null for its log-probability and alternatives): the model's own
    log-probabilities (before temperature and the logits processors, as `score` reports them)."""
    tokenizer = model.tokenizer
    ids = prompt_ids + new_ids
    first = 0 if echo else len(prompt_ids)  # the first token reported
    if first == len(ids):
        return protocol.logprobs_object([], [], [], [])
    logprobs = model.next_token_logprobs(ids, max(first - 1, 0))  # a row per token from max(first, 1) on
    unscored = [None] * (first == 0)
    # As OpenAI's: where each token's text starts in prompt + completion; a token inside a character
    # spelled by byte pieces starts where the character does.
    offsets = [len(tokenizer.decode(ids[:i]).rstrip(INCOMPLETE)) for i in range(first, len(ids))]
    top_logprobs = []
    for row in logprobs:
        best = np.argsort(-row)[:top]
        top_logprobs.append({tokenizer.token_text(int(t)): float(row[t]) for t in best})
    return protocol.logprobs_object(
        tokens=[tokenizer.token_text(t) for t in ids[first:]],
        token_logprobs=unscored + [float(row[t]) for row, t in zip(logprobs, ids[max(first, 1) :])],
        top_logprobs=unscored + top_logprobs,
        text_offset=offsets,
    )


class Engine:
    """`load()` (a serving.models model) runs on the engine thread; `ready` is set once the model answered a
    warm-up request. `prefix_cache_tokens`: the prefix cache's budget (serving.prefix_cache; 0: no cache)."""

    def __init__(self, load, max_batch, max_queue, metrics, prefix_cache_tokens=0):
        self._load = load
        self.prefix_cache_tokens = prefix_cache_tokens
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.model = None
        self.scheduler = None
        self.ready = threading.Event()
        self.failed = None  # the error that stopped loading
        self._loaded = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tfgen-engine", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._loaded.wait()
        if self.scheduler is not None:
            self.scheduler.stop()
        self._thread.join()

    def _run(self):
        started = time.monotonic()
        try:
            self.model = self._load()
            rows = self.model.decode_rows(self.max_batch, prefix_cache=PrefixCache(self.prefix_cache_tokens))
            self.scheduler = Scheduler(
                rows,
                self.model.tokenizer,
                self.max_queue,
                self.metrics,
                logprobs=lambda job: token_logprobs(
                    self.model, job.prompt_ids, job.new_ids, job.top_logprobs, job.echo
                ),
            )
            self._warm_up(rows)
        except Exception as error:  # reported by /health and the completions endpoint
            log.exception("the model failed to load")
            self.failed = error
            return
        finally:
            self._loaded.set()
        log.info("model loaded and warmed up in %.1f s; ready", time.monotonic() - started)
        self.ready.set()
        self.scheduler.run()

    def _warm_up(self, rows):
        """Compiles the rows' programs (what every later request runs, whatever its prompt and settings)."""
        rows.warm_up(self.model.tokenizer.encode(WARMUP_PROMPT) * 2)  # two tokens at least: prefill runs too
