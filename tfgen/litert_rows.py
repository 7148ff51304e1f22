"""LiteRTRows: decode rows on a LiteRT export, the interface of `tfgen.serving.rows`, without TensorFlow.

A rows object owns `slots` rows of KV cache (numpy, [layers, rows, heads,
capacity, head_dim] for keys and for values) and each row's state: its token
history, length, new-token count, limit, settings, random generator and the
logits its next token is chosen from. `start_rows` prefills each new row's
prompt into its slot, a chunk of tokens per `extend` call; each `step`
iteration picks a token for every running row (`next_token_R`) and feeds it
back (`decode_R`, which reads the cache and returns one column per row,
written in here), R being the smallest row tier that holds the busy slots.
Every signature runs on a LiteRT CompiledModel bound once to this object's
arrays (zero-copy buffers): the model reads the cache and the rows' state where
they are. An export cut into parts runs as a `Chain`: each part's hidden states
feed the next in place. A sampling row draws one uniform number per token from
its own numpy Generator, seeded by its request, so what a row decodes depends
on its prompt, settings and seed alone: not on the rows beside it, its slot or
when it joined. With a prefix cache (`tfgen.serving.prefix_cache`, numpy only),
a row whose prompt starts with cached blocks takes their keys and values and
prefills the rest of its prompt after them.
"""

import functools
import random
from typing import NamedTuple

import numpy as np

from tfgen.litert_host import aligned_zeros
from tfgen.serving.prefix_cache import PrefixCache
from tfgen.serving.protocol import logit_bias_row, row_settings

MAX_EOS_IDS = 8  # the length of next_token's eos_ids input (padded with -1)
# The row settings the model takes ([rows] inputs of `next_token_R`), at their neutral values.
SETTINGS = {
    "temperature": (np.float32, 0.0),
    "top_k": (np.int32, 0),
    "top_p": (np.float32, 1.0),
    "repetition_penalty": (np.float32, 1.0),
    "no_repeat_ngram_size": (np.int32, 0),
    "min_new_steps": (np.int32, 0),
    "presence_penalty": (np.float32, 0.0),
    "frequency_penalty": (np.float32, 0.0),
}


class RowTokens(NamedTuple):
    """A row's new tokens in one `advance`, their log-probabilities, and whether the row is done (by EOS)."""

    ids: list
    logprobs: list
    finished: bool
    reached_eos: bool


def tier_for(tiers, rows):
    """The smallest of the ascending `tiers` that holds `rows` rows."""
    return next(tier for tier in tiers if tier >= rows)


class Chain:
    """An export's parts in order (each a `tfgen.litert.BoundSignatures` and its (start, stop) layers): `bind` makes
    one call of a signature that every part has, each part reading the hidden states the one before wrote."""

    def __init__(self, parts, layers):
        self.parts, self.layers = parts, layers
        cache = next(part.input_details("extend") for part, (start, stop) in zip(parts, layers) if stop > start)
        self.cache_shape = [layers[-1][1], *cache["key_cache_0"]["shape"][1:]]  # [layers, heads, capacity, head_dim]
        self.chunk = parts[0].input_details("extend")["token"]["shape"][1]

    def bind_extend(self, keys, values, row):
        """A `ChainCall` of `extend` (one chunk of tokens) over cache row `row` of `keys` and `values`."""
        token, positions = aligned_zeros([1, self.chunk], np.int32), aligned_zeros([1], np.int32)
        return self.bind("extend", token, positions, keys, values, slice(row, row + 1))

    def bind(self, name, token, positions, keys, values, rows):
        """A `ChainCall` of `name` ("extend" or "decode_R") over the int32 arrays `token` [R, n] and `positions` [R]
        and the cache rows `rows` (a slice of R rows) of every layer's `keys` and `values`."""
        count, n = token.shape
        new_keys = aligned_zeros([self.cache_shape[0], count, self.cache_shape[1], n, self.cache_shape[3]])
        new_values = aligned_zeros(new_keys.shape)
        taken, calls = {"token": token}, []  # the first part takes tokens, the others the hidden states before
        for part, (start, stop) in zip(self.parts, self.layers):
            caches = {
                f"{kind}_cache_{layer - start}": cache[layer, rows]
                for layer in range(start, stop)
                for kind, cache in (("key", keys), ("value", values))
            }
            outputs = {"keys": new_keys[start:stop], "values": new_values[start:stop]} if stop > start else {}
            given = "hidden" if "hidden" in part.output_details(name) else "logits"  # logits: the last part
            details = part.output_details(name)[given]
            outputs[given] = aligned_zeros(details["shape"], details["dtype"])
            calls.append(part.bind(name, {**taken, "positions": positions, **caches}, outputs))
            taken = {"hidden": outputs[given]}
        return ChainCall(
            calls,
            token,
            positions,
            (keys, values, rows),
            {"logits": outputs["logits"], "keys": new_keys, "values": new_values},
        )


class ChainCall:
    """Calling it runs its parts' bound signatures on the current `token` and `positions` in order and returns
    `outputs` (logits, keys, values), rewritten; `cache`: the (keys, values, rows) it reads."""

    def __init__(self, calls, token, positions, cache, outputs):
        self._calls, self.token, self.positions, self.cache, self.outputs = calls, token, positions, cache, outputs

    def __call__(self):
        for call in self._calls:
            call()
        return self.outputs


def extend_chunks(extend, ids, start=0):
    """Runs `ids` through an `extend` ChainCall from column `start` of its cache row, a chunk at a time (the last one
    padded on the right), writing their keys and values into the row; yields each chunk's logits [count, vocab] (a
    copy: the next call rewrites the output)."""
    chunk = extend.token.shape[1]
    keys, values, rows = extend.cache
    for begin in range(0, len(ids), chunk):
        count, column = min(chunk, len(ids) - begin), start + begin
        extend.token[0, :count] = ids[begin : begin + count]
        extend.token[0, count:] = ids[-1]
        extend.positions[0] = column
        out = extend()
        keys[:, rows.start, :, column : column + count] = out["keys"][:, 0, :, :count]
        values[:, rows.start, :, column : column + count] = out["values"][:, 0, :, :count]
        yield out["logits"][:count].copy()


class LiteRTRows:
    """Decode rows on a LiteRT export: `extend` and `decode_R` through `chain` (a `Chain` of the export's parts),
    `next_token_R` through `chooser` (the last part's `tfgen.litert.BoundSignatures`).

    `tiers`: the export's row tiers; `slots`: at most the largest; `eos_ids`:
    the tokens that end a row (at most `MAX_EOS_IDS`); `prefix_cache`: a
    `tfgen.serving.prefix_cache.PrefixCache` (None: none).
    """

    def __init__(self, chain, chooser, capacity, tiers, eos_ids, pad_id, slots=None, prefix_cache=None):
        slots = tiers[-1] if slots is None else slots
        self.prefix_cache = PrefixCache(0) if prefix_cache is None else prefix_cache
        if not 1 <= slots <= tiers[-1]:
            raise ValueError(f"slots must be from 1 to the export's {tiers[-1]} rows, got {slots}")
        if len(eos_ids) > MAX_EOS_IDS:
            raise ValueError(f"at most {MAX_EOS_IDS} EOS ids, got {len(eos_ids)}")
        self.slots, self.capacity = slots, capacity
        self.tiers = tuple(tier for tier in tiers if tier < slots) + (tier_for(tiers, slots),)
        self.eos_ids = tuple(sorted(eos_ids))
        self._chain = chain
        self._pad_id = pad_id
        rows = self.tiers[-1]
        layers, heads, _, head_dim = chain.cache_shape
        self._keys = aligned_zeros([layers, rows, heads, capacity, head_dim])
        self._values = aligned_zeros(self._keys.shape)
        vocab = chooser.input_details(f"next_token_{rows}")["logits"]["shape"][1]
        self._logits = aligned_zeros([rows, vocab])
        self._sequence = aligned_zeros([rows, capacity], np.int32)
        self._sequence[:] = pad_id
        self._lengths = aligned_zeros([rows], np.int32)  # tokens in each row's history: its next token's column
        self._steps = aligned_zeros([rows], np.int32)  # new tokens so far
        self._limits = np.zeros(rows, np.int32)
        self._settings = {name: aligned_zeros([rows], dtype) for name, (dtype, _) in SETTINGS.items()}
        self._logit_bias = aligned_zeros([rows, vocab])  # the `logit_bias` input: a row's bias per token
        eos = aligned_zeros([MAX_EOS_IDS], np.int32)
        eos[:] = -1
        eos[: len(self.eos_ids)] = self.eos_ids
        # Each tier's signatures, bound once: their inputs are the first `tier` rows of the cache and the state
        # (views: the model reads them where they are, no copy).
        self._decoders, self._choosers = {}, {}
        for tier in self.tiers:
            self._decoders[tier] = chain.bind(
                f"decode_{tier}",
                aligned_zeros([tier, 1], np.int32),
                aligned_zeros([tier], np.int32),
                self._keys,
                self._values,
                slice(0, tier),
            )
            self._choosers[tier] = chooser.bind(
                f"next_token_{tier}",
                {
                    "logits": self._logits[:tier],
                    "sequence": self._sequence[:tier],
                    "lengths": self._lengths[:tier],
                    "steps": self._steps[:tier],
                    "uniform": aligned_zeros([tier, 1]),
                    "eos_ids": eos,
                    "logit_bias": self._logit_bias[:tier],
                    **{name: value[:tier] for name, value in self._settings.items()},
                },
                {"token": aligned_zeros([tier], np.int32), "logprob": aligned_zeros([tier])},
            )
        self._extenders = {}  # slot -> its `extend` call, bound on first use
        self._generators = {}  # slot -> its numpy Generator, for sampling rows
        self._started = set()  # until free_row
        self._running = set()  # started and not done
        for slot in range(rows):
            self._idle(slot)

    def start_rows(self, starts):
        """Prefills each (slot, prompt_ids, sampling) of `starts` into its free slot; other rows are left as they are.

        A prompt's cached first blocks (`prefix_cache`) are copied, not prefilled. Returns each row's count of prompt
        tokens taken from the cache."""
        for slot, prompt_ids, sampling in starts:
            if slot in self._started or not 0 <= slot < self.slots:
                raise ValueError(f"slot {slot} is taken or out of range")
            if not 1 <= len(prompt_ids) <= self.capacity - sampling.max_tokens:
                raise ValueError(
                    f"{len(prompt_ids)} prompt tokens + max_tokens {sampling.max_tokens} exceed the "
                    f"capacity {self.capacity} (or the prompt is empty)"
                )
        reused = []
        for slot, prompt_ids, sampling in starts:
            count, keys, values = self.prefix_cache.take(prompt_ids)
            self._keys[:, slot, :, :count], self._values[:, slot, :, :count] = keys, values
            self._prefill(slot, prompt_ids, count)
            self.prefix_cache.add(prompt_ids, functools.partial(self._columns, slot))
            reused.append(count)
            length = len(prompt_ids)
            self._sequence[slot, :length] = prompt_ids
            self._lengths[slot], self._steps[slot], self._limits[slot] = length, 0, length + sampling.max_tokens
            seed = random.randrange(2**31) if sampling.seed is None else sampling.seed
            settings = row_settings(sampling, seed)
            for name in SETTINGS:
                self._settings[name][slot] = settings[name]
            self._logit_bias[slot] = logit_bias_row(sampling, self._logit_bias.shape[1])
            self._generators[slot] = np.random.default_rng(seed) if sampling.do_sample else None
            self._started.add(slot)
            if sampling.max_tokens > 0:
                self._running.add(slot)
        return reused

    def free_row(self, slot):
        """Ends the row at once: its slot is free for `start_rows`, and steps leave it alone."""
        self._started.discard(slot)
        self._running.discard(slot)
        self._idle(slot)

    def step(self, k):
        """Up to k new token ids per started slot: {slot: (ids, reached_eos)}; the ids end at an EOS."""
        return {slot: (row.ids, row.reached_eos) for slot, row in self.advance(k).items()}

    def advance(self, k):
        """Up to k tokens of every running row: {slot: RowTokens} for each started slot."""
        out = {slot: RowTokens([], [], slot not in self._running, False) for slot in self._started}
        for _ in range(k):
            if not self._running:
                break
            tier = tier_for(self.tiers, max(self._running) + 1)
            tokens, logprobs = self._choose(tier)
            for slot in sorted(self._running):
                token = int(tokens[slot])
                out[slot].ids.append(token)
                out[slot].logprobs.append(float(logprobs[slot]))
                self._sequence[slot, self._lengths[slot]] = token
                self._lengths[slot] += 1
                self._steps[slot] += 1
                reached_eos = token in self.eos_ids
                if reached_eos or self._lengths[slot] == self._limits[slot]:
                    self._running.discard(slot)
                    self._idle(slot)
                    out[slot] = out[slot]._replace(finished=True, reached_eos=reached_eos)
            if self._running:
                self._decode(tier_for(self.tiers, max(self._running) + 1), sorted(self._running))
        return out

    def warm_up(self, prompt_ids):
        """Runs extend and every tier's decode and next_token once (the first call of each prepares its kernels)."""
        self._prefill(0, prompt_ids)
        self._idle(0)
        for tier in self.tiers:
            self._choosers[tier]()
            self._decode(tier, [])

    def _idle(self, slot):
        """Greedy settings and one clear best logit for a row that is not running but runs in a tier: its choice
        stays among the best candidates, so it never makes next_token sort the vocabulary."""
        for name, (_, neutral) in SETTINGS.items():
            self._settings[name][slot] = neutral
        self._logit_bias[slot] = 0.0
        self._logits[slot] = 0.0
        self._logits[slot, 0] = 1.0

    def _columns(self, slot, start, end):
        """The slot's keys and values of columns start..end-1: [layers, heads, end - start, head_dim] each."""
        return self._keys[:, slot, :, start:end], self._values[:, slot, :, start:end]

    def _prefill(self, slot, prompt_ids, start=0):
        """The prompt's keys and values from column `start` on into the slot's cache, its last token's logits into
        the slot's."""
        if slot not in self._extenders:
            self._extenders[slot] = self._chain.bind_extend(self._keys, self._values, slot)
        *_, last_chunk = extend_chunks(self._extenders[slot], prompt_ids[start:], start)
        self._logits[slot] = last_chunk[-1]

    def _choose(self, tier):
        """Each of the first `tier` rows' next token and its log-probability, from the row's logits and settings;
        each running sampling row draws its uniform number from its generator (one per token)."""
        chooser = self._choosers[tier]
        uniform = chooser.inputs["uniform"]
        uniform[:] = 0.0
        for slot in self._running:
            if self._generators[slot] is not None:
                uniform[slot] = self._generators[slot].random(dtype=np.float32)
        out = chooser()
        return out["token"], out["logprob"]

    def _decode(self, tier, slots):
        """Feeds each of `slots` its last token: its logits for the next choice, its keys and values into the cache.

        The tier's other rows run on their stale state; their outputs are dropped.
        """
        positions = np.maximum(self._lengths[:tier] - 1, 0)
        decoder = self._decoders[tier]
        decoder.token[:, 0] = self._sequence[np.arange(tier), positions]
        decoder.positions[:] = positions
        out = decoder()
        slots = np.asarray(slots, np.int64)
        columns = self._lengths[slots] - 1
        self._keys[:, slots, :, columns] = out["keys"][:, slots, :, 0]
        self._values[:, slots, :, columns] = out["values"][:, slots, :, 0]
        self._logits[slots] = out["logits"][slots]
