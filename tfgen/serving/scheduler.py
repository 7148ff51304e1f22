"""The scheduler: a bounded queue of rows waiting for a slot, and the loop that steps the slots.

One thread owns the model. Between steps it frees the slots of rows that are finished, cancelled
(client gone) or past their time limit, and starts waiting rows in the free slots; then it
advances every started row by a few tokens (`rows.step`) and hands each row its new text. A step's
token count aims at STEP_SECONDS of decoding (from the time the last steps took per token), so a request
that arrives while a step runs waits about that long for its slot, on any model and machine; the step
right after an admission of at least half the busy rows is one token, so that the new rows' first tokens go out
as soon as they are prefilled.
Requests talk to it through `Job`s; a job's `emit` callback receives its events (from this thread).
"""

import collections
import dataclasses
import logging
import threading
import time

from tfgen.serving.protocol import Sampling
from tfgen.tokenizer import INCOMPLETE

log = logging.getLogger("uvicorn.error")  # the server's log
STEP_SECONDS = 0.05  # how long a step should take: short enough that a new request waits little, long enough that
# the host's work between steps (a few ms) costs little
MAX_STEP_TOKENS = 16
# An idle engine admits once no request arrived for GATHER_QUIET seconds, or GATHER_LONGEST after the first: clients
# that start together arrive over 10-30 ms, and the first one admitted alone would hold up the rest by its prefill
# and its step.
GATHER_QUIET = 0.005
GATHER_LONGEST = 0.03


class QueueFull(Exception):
    """More rows waiting than the queue holds."""


@dataclasses.dataclass
class Job:
    """One choice of a request: a row's prompt, settings and progress.

    `emit(kind, value)` gets ("text", piece) as text becomes final, then one ("done", finish_reason)
    (finish_reason "stop", "length", "cancelled" when the client went away, or "error" when the
    engine step failed; the server's log has why).
    """

    prompt_ids: list
    prompt_text: str
    sampling: Sampling
    stop: tuple
    deadline: float  # time.monotonic() after which the row ends with finish_reason "length"
    emit: object
    top_logprobs: int = None  # a `logprobs` object with this many alternatives per token is wanted
    echo: bool = False  # the `logprobs` object covers the prompt's tokens too
    logprobs: dict = None
    new_ids: list = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` emitted
    finish_reason: str = None
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float = None


def settled_text(text, stops, final):
    """How much of `text` can be sent: all once final; else not a trailing partial character (U+FFFD of
    byte-fallback pieces) nor a tail that may grow into a stop sequence."""
    if final:
        return len(text)
    end = len(text.rstrip(INCOMPLETE))
    hold = max((len(s) - 1 for s in stops), default=0)
    return max(min(end, len(text) - hold), 0)


def find_stop(text, stops):
    """The index of the earliest stop sequence in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class Scheduler:
    def __init__(self, rows, tokenizer, max_queue, metrics, logprobs=None):
        """`logprobs(job)`: the `logprobs` object of a finished job that asks for it."""
        self.rows = rows
        self.logprobs = logprobs
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.metrics = metrics
        self._seconds_per_token = {}  # busy rows -> what steps of that many rows took per token (running averages)
        self.waiting = collections.deque()
        self.active = {}  # slot -> Job
        self._wake = threading.Condition()
        self._stopping = False

    # Called from request handlers (any thread).
    def submit(self, jobs):
        with self._wake:
            if len(self.waiting) + len(jobs) > self.max_queue + self.rows.slots - len(self.active):
                raise QueueFull
            self.waiting.extend(jobs)
            self.metrics.queue_depth.set(len(self.waiting))
            self._wake.notify()

    def cancel(self, job):
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    def busy_slots(self):
        return len(self.active)

    def stop(self):
        with self._wake:
            self._stopping = True
            self._wake.notify()

    # The engine thread.
    def run(self):
        while True:
            with self._wake:
                while not (self._stopping or self.waiting or self.active):
                    self._wake.wait()
                if self.waiting and not self.active:
                    self._gather_arrivals()
                if self._stopping:
                    break
                self._free_done_rows()
                self._admit()
            if self.active:
                try:
                    self._step()
                except Exception:  # the rows in the batch fail; the server goes on with the next requests
                    log.exception("an engine step failed")
                    self._fail_active()
        for job in list(self.active.values()) + list(self.waiting):
            self._finish(job, "cancelled")

    def _gather_arrivals(self):
        """Waits, on an idle engine, for the requests arriving together with the first waiting one, so that they
        are prefilled and stepped together (see GATHER_QUIET)."""
        first = self.waiting[0].submitted
        while not self._stopping and len(self.waiting) < self.rows.slots:
            wait = min(self.waiting[-1].submitted + GATHER_QUIET, first + GATHER_LONGEST) - time.monotonic()
            if wait <= 0:
                break
            self._wake.wait(wait)

    def _admit(self):
        free = [slot for slot in range(self.rows.slots) if slot not in self.active]
        starts = []
        while free and self.waiting:
            job = self.waiting.popleft()
            if job.cancelled:
                self._finish(job, "cancelled")
                continue
            if job.sampling.max_tokens == 0:  # an echo of the prompt alone: no row to decode
                self._finish(job, "length")
                continue
            slot = free.pop(0)
            starts.append((slot, job.prompt_ids, job.sampling))
            self.active[slot] = job
        if starts:
            for reused in self.rows.start_rows(starts):
                (self.metrics.prefix_cache_hits if reused else self.metrics.prefix_cache_misses).inc()
                self.metrics.prefix_cache_reused_tokens.inc(reused)
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.busy_slots.set(len(self.active))

    def _free_done_rows(self):
        now = time.monotonic()
        for slot, job in list(self.active.items()):
            if job.cancelled:
                job.finish_reason = "cancelled"
            elif job.finish_reason is None and now > job.deadline:
                job.finish_reason = "length"
            if job.finish_reason is not None:
                self.rows.free_row(slot)
                del self.active[slot]
                self._finish(job, job.finish_reason)
        self.metrics.busy_slots.set(len(self.active))

    def _fail_active(self):
        with self._wake:
            for slot, job in list(self.active.items()):
                self.rows.free_row(slot)
                del self.active[slot]
                self._finish(job, "error")

    def step_tokens(self):
        """Tokens for the next step: 1 while at least half the busy rows have no token yet (just admitted), else
        about STEP_SECONDS of decoding as many rows as now (1 until such a step has been timed)."""
        per_token = self._seconds_per_token.get(len(self.active))
        # Not for a few rows joining many: one-token steps cost the running rows a step's host work each.
        waiting_for_first = sum(not job.new_ids for job in self.active.values())
        if per_token is None or 2 * waiting_for_first >= len(self.active):
            return 1
        return int(min(max(round(STEP_SECONDS / per_token), 1), MAX_STEP_TOKENS))

    def _step(self):
        k, busy = self.step_tokens(), len(self.active)
        started = time.monotonic()
        out = self.rows.step(k)
        steps = max((len(new_ids) for new_ids, _ in out.values()), default=0)  # fewer than k if every row ended
        per_token = (time.monotonic() - started) / max(steps, 1)
        previous = self._seconds_per_token.get(busy, per_token)
        self._seconds_per_token[busy] = 0.7 * previous + 0.3 * per_token
        self.metrics.steps.inc()
        self.metrics.step_rows.observe(len(out))
        now = time.monotonic()
        for slot, (new_ids, reached_eos) in out.items():
            job = self.active[slot]
            if new_ids and job.first_token_at is None:
                job.first_token_at = now
                self.metrics.time_to_first_token.observe(now - job.submitted)
            self.metrics.completion_tokens.inc(len(new_ids))
            self._advance(job, new_ids, reached_eos)

    def _advance(self, job, new_ids, reached_eos):
        job.new_ids.extend(new_ids)
        # A row's new_ids end at its EOS (the decode state stops the row there), so no more ids end it here.
        text = self.tokenizer.completion(job.prompt_ids, job.new_ids, (), job.prompt_text).new_text
        stop_at = find_stop(text, job.stop)
        if stop_at is not None:
            text, job.finish_reason = text[:stop_at], "stop"
        elif reached_eos:
            job.finish_reason = "stop"
        elif len(job.new_ids) >= job.sampling.max_tokens:
            job.finish_reason = "length"
        job.text = text
        end = settled_text(text, job.stop, job.finish_reason is not None)
        if end > job.sent:
            job.emit("text", text[job.sent : end])
            job.sent = end

    def _finish(self, job, finish_reason):
        job.finish_reason = finish_reason
        self.metrics.finished_rows.labels(finish_reason).inc()
        if finish_reason not in ("cancelled", "error"):
            if len(job.text) > job.sent:
                job.emit("text", job.text[job.sent :])
                job.sent = len(job.text)
            if job.top_logprobs is not None:
                job.logprobs = self.logprobs(job)
            self.metrics.latency.observe(time.monotonic() - job.submitted)
        job.emit("done", finish_reason)
