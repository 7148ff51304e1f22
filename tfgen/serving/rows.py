"""Decode rows: the interface the scheduler drives, and its implementation over `GPT2LM.generate`.

The scheduler owns a fixed set of slots; between steps it starts a request's row in a free slot
(`start_row`), advances every started row by up to k tokens (`step`) and frees rows that are done
(`free_row`). Any object with these three methods and `slots` can drive the server.

`GenerateRows` implements them with today's one-shot decode program: each step re-runs the rows'
whole text so far (prompt plus tokens decoded) through `GPT2LM.generate` for k more tokens, rows
that share their settings in one batch. Rows join and leave between steps, which is what
continuous batching needs, but every step pays a prefill of the whole text, and a prompt bucket
(decode.BUCKET) it has not seen compiles a program. Each call runs at the full slot count (unused
rows repeat the first and are discarded), so one program per (strategy, bucket) serves any
occupancy; a fixed-slot decode state costs the same. A decode state that keeps the KV cache of
each row across steps (issue 16) makes a step cost one token per row; it plugs in here.
"""

import dataclasses
import random

import numpy as np

from tfgen.serving.protocol import Sampling


@dataclasses.dataclass
class _Row:
    ids: list  # the prompt, then the tokens decoded so far
    sampling: Sampling
    decoded: int = 0
    steps: int = 0  # steps this row has taken (derives a seeded row's per-step seed)


def left_padded(rows, pad_id, batch):
    """[batch, longest] ids and mask, rows right-aligned; rows past len(rows) repeat the first (discarded)."""
    rows = rows + [rows[0]] * (batch - len(rows))
    width = max(len(r) for r in rows)
    ids = np.full((batch, width), pad_id, np.int32)
    mask = np.zeros((batch, width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def cut_at_eos(new_ids, eos_ids):
    """The ids through the first EOS, and whether one was there."""
    for i, token in enumerate(new_ids):
        if token in eos_ids:
            return new_ids[: i + 1], True
    return new_ids, False


def _eos_ban(row, k):
    """How many of the row's next k tokens may not be EOS (min_tokens)."""
    return min(max(row.sampling.min_tokens - row.decoded, 0), k)


class GenerateRows:
    """Decode rows over `GPT2LM.generate`: each step regenerates k tokens from each row's text so far."""

    def __init__(self, lm, slots):
        self.lm = lm
        self.slots = slots
        self._rows = {}
        self._eos_ids = {lm.config.eos_token_id} if lm.config.eos_token_id is not None else set()
        self._pad_id = lm.tokenizer.padding_id

    def start_row(self, slot, prompt_ids, sampling):
        if slot in self._rows or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is taken or out of range")
        self._rows[slot] = _Row(list(prompt_ids), sampling)

    def free_row(self, slot):
        self._rows.pop(slot, None)

    def step(self, k):
        """Up to k new token ids per started slot: {slot: (ids, reached_eos)}."""
        groups = {}
        for slot, row in self._rows.items():
            groups.setdefault(self._group(slot, row, k), []).append(slot)
        out = {}
        for slots in groups.values():
            out.update(self._step_group(slots, k))
        return out

    def _group(self, slot, row, k):
        """Rows that can share one generate call: the same settings and the same EOS ban within the next k
        tokens; a seeded row always runs alone, at batch row 0, so its tokens repeat whatever else the
        server decodes."""
        s = row.sampling
        alone = slot if s.seed is not None and s.do_sample else None
        return (s.do_sample, s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.no_repeat_ngram_size,
                _eos_ban(row, k), alone)

    def _step_group(self, slots, k):
        rows = [self._rows[slot] for slot in slots]
        s = rows[0].sampling
        remaining = [row.sampling.max_tokens - row.decoded for row in rows]
        ids, mask = left_padded([row.ids for row in rows], self._pad_id, self.slots)
        if s.seed is not None:
            seed = (s.seed * 1_000_003 + rows[0].steps) % 2**31
        else:
            seed = random.randrange(2**31)
        # Each row fits the context with its own remaining tokens; the longest row bounds what the batch may add.
        room = self.lm.config.n_positions - ids.shape[1]
        sequences = self.lm.generate(
            ids, mask, max_new_tokens=min(k, max(remaining), room), do_sample=s.do_sample, temperature=s.temperature,
            top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
            no_repeat_ngram_size=s.no_repeat_ngram_size, min_new_tokens=_eos_ban(rows[0], k),
            seed=seed,
        ).numpy()
        out = {}
        for i, (slot, row) in enumerate(zip(slots, rows)):
            new_ids, reached_eos = cut_at_eos(sequences[i, ids.shape[1]:][: remaining[i]].tolist(), self._eos_ids)
            row.ids.extend(new_ids)
            row.decoded += len(new_ids)
            row.steps += 1
            out[slot] = (new_ids, reached_eos)
        return out
