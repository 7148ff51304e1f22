"""The scheduler's admissions, on rows that record what they are asked to do (no model)."""

import dataclasses
import threading
import time
import types

from tfgen.serving import scheduler
from tfgen.serving.metrics import Metrics
from tfgen.serving.protocol import Sampling
from tfgen.serving.scheduler import Job, Scheduler


class RecordingRows:
    """Decode rows that record the slots of each admission; every started row ends with one token (EOS)."""

    slots = 16

    def __init__(self):
        self.admissions = []
        self._started = set()

    def start_rows(self, starts):
        self.admissions.append([slot for slot, _, _ in starts])
        self._started.update(slot for slot, _, _ in starts)
        return [0] * len(starts)  # no prompt token taken from a prefix cache

    def free_row(self, slot):
        self._started.discard(slot)

    def step(self, k):
        return {slot: ([1], True) for slot in self._started}


class OneTokenTokenizer:
    def completion(self, prompt_ids, new_ids, stop, prompt_text):
        return types.SimpleNamespace(new_text="가" * len(new_ids))


GREEDY = Sampling(
    max_tokens=4,
    do_sample=False,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    min_tokens=0,
)


def _job(done):
    return Job(
        prompt_ids=[1, 2],
        prompt_text="안녕",
        sampling=GREEDY,
        stop=(),
        deadline=time.monotonic() + 60,
        emit=lambda kind, value: done.release() if kind == "done" else None,
    )


def _admissions(arrivals, monkeypatch, quiet, longest):
    """The admissions of one job arriving after each delay of `arrivals` (seconds), at an idle engine."""
    monkeypatch.setattr(scheduler, "GATHER_QUIET", quiet)
    monkeypatch.setattr(scheduler, "GATHER_LONGEST", longest)
    rows, done = RecordingRows(), threading.Semaphore(0)
    engine = Scheduler(rows, OneTokenTokenizer(), max_queue=16, metrics=Metrics(rows.slots))
    thread = threading.Thread(target=engine.run)
    thread.start()
    try:
        for delay in arrivals:
            time.sleep(delay)
            engine.submit([_job(done)])
        for _ in arrivals:
            assert done.acquire(timeout=30)
    finally:
        engine.stop()
        thread.join()
    return rows.admissions


def test_requests_arriving_together_at_an_idle_engine_are_admitted_together(monkeypatch):
    """Four requests 20 ms apart, within the quiet time of one another: one admission (without the gathering each
    would be admitted alone, its row finished before the next arrived)."""
    assert _admissions([0, 0.02, 0.02, 0.02], monkeypatch, quiet=0.5, longest=5.0) == [[0, 1, 2, 3]]


def test_gathering_ends_after_the_quiet_time_or_the_longest_wait(monkeypatch):
    # A request after the quiet time is admitted on its own.
    assert _admissions([0, 1.0], monkeypatch, quiet=0.1, longest=5.0) == [[0], [0]]
    # Requests that keep arriving are admitted once the longest wait from the first has passed.
    admissions = _admissions([0] + [0.05] * 12, monkeypatch, quiet=0.5, longest=0.3)
    assert len(admissions) >= 2 and 2 <= len(admissions[0]) < 12, admissions


class CountingRows(RecordingRows):
    """Rows that record each step's token count and make that many tokens (never EOS)."""

    def __init__(self):
        super().__init__()
        self.steps, self.admitted_before_step = [], []

    def start_rows(self, starts):
        self.admitted_before_step.append(len(self.steps))
        return super().start_rows(starts)

    def step(self, k):
        self.steps.append(k)
        return {slot: ([5] * k, False) for slot in self._started}


def test_the_step_after_an_admission_is_one_token():
    """New rows' first tokens go out right after their prefill; later steps make as many tokens as fit the
    step time (here many: the recording rows take no time)."""
    rows, done = CountingRows(), threading.Semaphore(0)
    engine = Scheduler(rows, OneTokenTokenizer(), max_queue=16, metrics=Metrics(rows.slots))
    thread = threading.Thread(target=engine.run)
    thread.start()
    try:
        for _ in range(2):  # the second request finds the step time measured
            engine.submit([dataclasses.replace(_job(done), sampling=dataclasses.replace(GREEDY, max_tokens=40))])
            assert done.acquire(timeout=30)
    finally:
        engine.stop()
        thread.join()
    assert len(rows.admitted_before_step) == 2
    for first in rows.admitted_before_step:
        assert rows.steps[first] == 1 and rows.steps[first + 1] > 1, rows.steps
