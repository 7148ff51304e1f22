"""Decode rows: the interface the scheduler drives, on the decode state that keeps each row's KV cache.

The scheduler owns a fixed set of slots; between steps it starts requests' rows in free slots
(`start_rows`), advances every started row by up to k tokens (`step`) and frees rows that are done
(`free_row`); `warm_up` compiles before the first request. Any object with these methods and `slots`
can drive the server.

`StateRows` implements them on one `DecodeState` of `slots` rows at the model's context: new rows
are put into their slots and prefilled there together (a program over those rows' cache only, as
many rows as a row tier, about 16 positions an iteration) while the other rows keep their cache and tokens, and each step is one advance program call over the first
slots, as many as a row tier (1, 4, 16, ... slots) that holds every running row: a step costs a
token per row of the tier. Both read the cache only up to a span (a capacity tier) that holds the
rows they serve. Every row has its own settings ([rows] setting tensors,
decode.ROW_SETTINGS) and its own sampling counter, so what a row decodes does not depend on the
rows beside it, nor on its slot or when it joined. With a prefix cache (`serving.prefix_cache`), a new row
whose prompt starts with cached blocks has their keys and values copied into its slot and prefills from there.
"""

import random

import numpy as np
import tensorflow as tf

from tfgen.generation import decode
from tfgen.generation.decode import ROW_SETTINGS, capacity_tier, settings_tensors
from tfgen.generation.options import resolve_options
from tfgen.serving.prefix_cache import PrefixCache
from tfgen.serving.protocol import logit_bias_row, row_settings


class StateRows:
    """Decode rows on a decode state of `slots` rows whose capacity is the model's context."""

    def __init__(self, lm, slots, prefix_cache=None):
        """`prefix_cache`: a `serving.prefix_cache.PrefixCache` that rows take prompt prefixes from and give theirs
        to (None: none, as a cache of 0 tokens)."""
        config = lm.config
        options = resolve_options(
            1, max_new_tokens=1, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        self.slots = slots
        self.prefix_cache = PrefixCache(0) if prefix_cache is None else prefix_cache
        self.capacity = lm.net.context  # a prompt with its max_tokens must fit (the server checks before queuing)
        # The programs read the cache's first `span` columns only: a step the smallest span that holds every running
        # row's limit, a row's prefill the smallest that holds its prompt (short requests never pay for the context).
        self.spans = tuple(sorted({self.span(columns) for columns in (*decode.TIERS, self.capacity)}))
        # A step moves the first `rows` slots only, the smallest of these that holds every running row (slots are
        # taken lowest first), so a few requests cost what a small batch costs.
        self.row_tiers = tuple(4**i for i in range(slots) if 4**i < slots) + (slots,)
        self._programs = lm.decoder.own_programs(slots, self.capacity, options.pad_token_id)
        self._pad_id = options.pad_token_id
        self._eos_ids = set(options.eos_token_ids)
        self._shared = settings_tensors(options)  # EOS, pad and the (empty) bad words: the same for every row
        self._settings = {name: np.zeros(slots, dtype) for name, dtype in ROW_SETTINGS.items()}
        self._settings["logit_bias"] = np.zeros([slots, config.vocab_size], np.float32)
        self._sent = {}  # slot -> the row's tokens (prompt and new) handed to the scheduler so far
        self._limits = {}  # slot -> the row's length when it stops (prompt + max_tokens)

    def span(self, columns):
        """The smallest span that holds `columns` columns: the capacity tier `generate` would use."""
        return capacity_tier(columns, self.capacity)

    def rows_tier(self, slots):
        """The smallest row tier that holds the slots 0..slots-1."""
        return next(rows for rows in self.row_tiers if rows >= slots)

    def start_rows(self, starts):
        """Puts each (slot, prompt_ids, sampling) of `starts` into its free slot and prefills them there together
        (one prefill over those rows alone, as many as a row tier); the other rows are left as they are. A row whose
        prompt begins with cached blocks (`prefix_cache`) gets their keys and values and prefills the rest only.
        Returns each row's count of prompt tokens taken from the cache."""
        for slot, prompt_ids, sampling in starts:
            if slot in self._sent or not 0 <= slot < self.slots:
                raise ValueError(f"slot {slot} is taken or out of range")
            if len(prompt_ids) + sampling.max_tokens > self.capacity:
                raise ValueError(
                    f"{len(prompt_ids)} prompt tokens + max_tokens {sampling.max_tokens} exceed the "
                    f"capacity {self.capacity}"
                )
        slots = [slot for slot, _, _ in starts]
        lengths = [len(prompt_ids) for _, prompt_ids, _ in starts]
        limits = [length + sampling.max_tokens for length, (_, _, sampling) in zip(lengths, starts)]
        width = max(lengths)
        prompts = [prompt_ids + [self._pad_id] * (width - len(prompt_ids)) for _, prompt_ids, _ in starts]
        self._programs.state.start_rows(slots, prompts, lengths, limits)
        reused = [self._copy_cached_prefix(slot, prompt_ids) for slot, prompt_ids, _ in starts]
        tier = self.rows_tier(len(slots))
        # A row twice is prefilled twice alike.
        padded = [values + values[:1] * (tier - len(values)) for values in (slots, reused, [n - 1 for n in lengths])]
        self._programs.prefill_rows(*padded, self.span(width))
        for (slot, prompt_ids, sampling), length, limit in zip(starts, lengths, limits):
            seed = random.randrange(2**31) if sampling.seed is None else sampling.seed
            for name, value in row_settings(sampling, seed).items():
                self._settings[name][slot] = value
            self._settings["logit_bias"][slot] = logit_bias_row(sampling, self._settings["logit_bias"].shape[1])
            self._sent[slot], self._limits[slot] = length, limit
            self._cache_prefix(slot, prompt_ids)
        return reused

    def _copy_cached_prefix(self, slot, prompt_ids):
        """Writes the keys and values of the prompt's cached first blocks into its slot; returns their token count."""
        count, keys, values = self.prefix_cache.take(prompt_ids)
        if count:
            for (k, v), layer_keys, layer_values in zip(self._programs.state.cache, keys, values):
                k[slot, :, :count].assign(layer_keys)
                v[slot, :, :count].assign(layer_values)
        return count

    def _cache_prefix(self, slot, prompt_ids):
        """Hands the prefix cache the prefilled slot's prompt blocks."""
        cache = self._programs.state.cache
        self.prefix_cache.add(
            prompt_ids,
            lambda start, end: tuple(np.stack([kv[i][slot, :, start:end].numpy() for kv in cache]) for i in (0, 1)),
        )

    def free_row(self, slot):
        """Ends the row at once: its slot is finished, so the next step leaves it alone."""
        if self._sent.pop(slot, None) is not None:
            del self._limits[slot]
            self._programs.state.finish_rows([slot])

    def step(self, k):
        """Up to k new token ids per started slot: {slot: (ids, reached_eos)}; the ids end at an EOS."""
        if not self._sent:
            return {}
        sampled = any(self._settings["temperature"][slot] > 0 for slot in self._sent)
        rows = self.rows_tier(max(self._sent) + 1)
        advance = self._programs.advance("sample" if sampled else "greedy", self.span(max(self._limits.values())), rows)
        now = {name: value.numpy() for name, value in advance(tf.constant(k), self._settings_tensors(rows)).items()}
        out = {}
        for slot, sent in self._sent.items():
            new_ids = now["tokens"][slot, sent : now["lengths"][slot]].tolist()
            self._sent[slot] = sent + len(new_ids)
            out[slot] = (new_ids, bool(new_ids) and bool(now["finished"][slot]) and new_ids[-1] in self._eos_ids)
        return out

    def warm_up(self, prompt_ids):
        """Compiles what requests run, the prefill and the greedy and the sampling advance at every span and row
        tier (a request never waits for a compile); `prompt_ids`: two tokens at least."""
        state = self._programs.state
        for span in self.spans:
            state.start_rows([0], [prompt_ids], [len(prompt_ids)], [span])
            for rows in self.row_tiers:
                self._programs.prefill_rows([0] * rows, [0] * rows, [len(prompt_ids) - 1] * rows, span)
                for strategy in ("greedy", "sample"):
                    self._programs.advance(strategy, span, rows)(tf.constant(1), self._settings_tensors(rows))
            state.finish_rows([0])

    def _settings_tensors(self, rows):
        """The shared settings and the first `rows` rows' own."""
        return {**self._shared, **{name: tf.constant(value[:rows]) for name, value in self._settings.items()}}
