"""LiteRTRows: decode rows on a LiteRT export, the interface of `tfgen.serving.rows`, without TensorFlow.

A rows object owns `slots` rows of KV cache (numpy, [layers, rows, heads,
capacity, head_dim] for keys and for values) and each row's state: its token
history, length, new-token count, limit, settings, random generator and the
logits its next token is chosen from. `start_rows` prefills new rows together
(one `prefill` over their ragged prompts) and writes their keys and values
into their slots; each `step` iteration picks a token for every running row
(`next_token_R`) and feeds it back (`decode_R`, which reads the cache and
returns one column per row, written in here), R being the smallest row tier
that holds the busy slots: the cache's first R rows are views, not copies, and
the model reads them where they are (zero-copy buffers of a LiteRT
CompiledModel, bound once per tier). A sampling row draws one uniform number
per token from its own numpy Generator, seeded by its request, so what a row decodes depends on its prompt,
settings and seed alone: not on the rows beside it, its slot or when it joined.
"""

import random
from typing import NamedTuple

import numpy as np

from tfgen.litert_host import aligned_zeros
from tfgen.serving.protocol import logit_bias_row, row_settings

# The row settings the model takes ([rows] inputs of `next_token_R`), at their neutral values.
SETTINGS = {"temperature": (np.float32, 0.0), "top_k": (np.int32, 0), "top_p": (np.float32, 1.0),
            "repetition_penalty": (np.float32, 1.0), "no_repeat_ngram_size": (np.int32, 0),
            "min_new_steps": (np.int32, 0), "presence_penalty": (np.float32, 0.0),
            "frequency_penalty": (np.float32, 0.0)}


class RowTokens(NamedTuple):
    """A row's new tokens in one `advance`, their log-probabilities, and whether the row is done (by EOS)."""

    ids: list
    logprobs: list
    finished: bool
    reached_eos: bool


def tier_for(tiers, rows):
    """The smallest of the ascending `tiers` that holds `rows` rows."""
    return next(tier for tier in tiers if tier >= rows)


def right_padded(prompts, pad_id):
    """Prompts as one [rows, longest] int32 array, padded on the right, and their lengths."""
    lengths = np.array([len(ids) for ids in prompts], np.int32)
    padded = np.full([len(prompts), lengths.max()], pad_id, np.int32)
    for row, ids in enumerate(prompts):
        padded[row, :len(ids)] = ids
    return padded, lengths


class LiteRTRows:
    """Decode rows on a LiteRT export: `decode_R` through `decode` (a `tfgen.litert.BoundSignatures`: each tier's
    decode bound once to numpy arrays), the other signatures through `runners` (name -> callable of numpy arrays).

    `tiers`: the export's row tiers; `slots`: at most the largest; `eos_ids`:
    the tokens that end a row.
    """

    def __init__(self, runners, decode, capacity, tiers, eos_ids, pad_id, slots=None):
        slots = tiers[-1] if slots is None else slots
        if not 1 <= slots <= tiers[-1]:
            raise ValueError(f"slots must be from 1 to the export's {tiers[-1]} rows, got {slots}")
        self.slots, self.capacity = slots, capacity
        self.tiers = tuple(tier for tier in tiers if tier < slots) + (tier_for(tiers, slots),)
        self._runners = runners
        self.eos_ids = tuple(sorted(eos_ids))
        self._eos_array = np.array(self.eos_ids, np.int32)
        self._pad_id = pad_id
        rows = self.tiers[-1]
        inputs = decode.input_details(f"decode_{rows}")
        layers = sum(name.startswith("key_cache_") for name in inputs)
        self._keys = aligned_zeros([layers, *inputs["key_cache_0"]["shape"]])
        self._values = aligned_zeros(self._keys.shape)
        # Each tier's decode, bound once to its inputs and outputs: its cache inputs are the first `tier` rows of
        # every layer's keys and values (views: the model reads the cache where it is, no copy).
        self._decoders = {}
        for tier in self.tiers:
            name = f"decode_{tier}"
            views = {f"{kind}_cache_{layer}": cache[layer, :tier] for layer in range(layers)
                     for kind, cache in (("key", self._keys), ("value", self._values))}
            self._decoders[tier] = decode.bind(
                name, {"token": aligned_zeros([tier, 1], np.int32), "positions": aligned_zeros([tier], np.int32),
                       **views},
                {output: aligned_zeros(details["shape"], details["dtype"])
                 for output, details in decode.output_details(name).items()})
        choice_inputs = runners[f"next_token_{rows}"].get_input_details()
        if "logit_bias" not in choice_inputs:
            raise ValueError("this LiteRT export predates OpenAI's penalties and logit_bias (its next_token has no "
                             "logit_bias input); export it again with this tfgen")
        vocab = choice_inputs["logits"]["shape"][1]
        self._logits = np.zeros([rows, vocab], np.float32)
        self._sequence = np.full([rows, capacity], pad_id, np.int32)
        self._lengths = np.zeros(rows, np.int32)  # tokens in each row's history: its next token's column
        self._steps = np.zeros(rows, np.int32)  # new tokens so far
        self._limits = np.zeros(rows, np.int32)
        self._settings = {name: np.zeros(rows, dtype) for name, (dtype, _) in SETTINGS.items()}
        self._logit_bias = np.zeros([rows, vocab], np.float32)  # the `logit_bias` input: a row's bias per token
        self._generators = {}  # slot -> its numpy Generator, for sampling rows
        self._started = set()  # until free_row
        self._running = set()  # started and not done
        for slot in range(rows):
            self._idle(slot)

    def start_rows(self, starts):
        """Prefills each (slot, prompt_ids, sampling) of `starts` into its free slot, together; other rows are left as
        they are."""
        for slot, prompt_ids, sampling in starts:
            if slot in self._started or not 0 <= slot < self.slots:
                raise ValueError(f"slot {slot} is taken or out of range")
            if not 1 <= len(prompt_ids) <= self.capacity - sampling.max_tokens:
                raise ValueError(f"{len(prompt_ids)} prompt tokens + max_tokens {sampling.max_tokens} exceed the "
                                 f"capacity {self.capacity} (or the prompt is empty)")
        out, lengths = self._prefill([prompt_ids for _, prompt_ids, _ in starts])
        for row, ((slot, prompt_ids, sampling), length) in enumerate(zip(starts, lengths)):
            self._keys[:, slot, :, :length] = out["keys"][:, row, :, :length]
            self._values[:, slot, :, :length] = out["values"][:, row, :, :length]
            self._logits[slot] = out["logits"][row]
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
            tokens, logprobs = self._choose(tier, self._uniforms(tier))
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
        """Runs prefill and every tier's decode and next_token once (the first call of each prepares its kernels)."""
        self._prefill([prompt_ids])
        for tier in self.tiers:
            self._choose(tier, np.zeros([tier, 1], np.float32))
            self._decode(tier, [])

    def _idle(self, slot):
        """Greedy settings and one clear best logit for a row that is not running but runs in a tier: its choice
        stays among the best candidates, so it never makes next_token sort the vocabulary."""
        for name, (_, neutral) in SETTINGS.items():
            self._settings[name][slot] = neutral
        self._logit_bias[slot] = 0.0
        self._logits[slot] = 0.0
        self._logits[slot, 0] = 1.0

    def _prefill(self, prompts):
        padded, lengths = right_padded(prompts, self._pad_id)
        return self._runners["prefill"](input_ids=padded, lengths=lengths), lengths

    def _uniforms(self, tier):
        """[tier, 1]: the next number of each running sampling row's generator (one per token), 0 elsewhere."""
        uniform = np.zeros([tier, 1], np.float32)
        for slot in self._running:
            if self._generators[slot] is not None:
                uniform[slot] = self._generators[slot].random(dtype=np.float32)
        return uniform

    def _choose(self, tier, uniform):
        """Each of the first `tier` rows' next token and its log-probability, from the row's logits and settings."""
        out = self._runners[f"next_token_{tier}"](
            logits=self._logits[:tier], sequence=self._sequence[:tier], lengths=self._lengths[:tier],
            steps=self._steps[:tier], uniform=uniform, eos_ids=self._eos_array, logit_bias=self._logit_bias[:tier],
            **{name: value[:tier] for name, value in self._settings.items()})
        return out["token"], out["logprob"]

    def _decode(self, tier, slots):
        """Feeds each of `slots` its last token: its logits for the next choice, its keys and values into the cache.

        The tier's other rows run on their stale state; their outputs are dropped.
        """
        positions = np.maximum(self._lengths[:tier] - 1, 0)
        decoder = self._decoders[tier]
        decoder.inputs["token"][:, 0] = self._sequence[np.arange(tier), positions]
        decoder.inputs["positions"][:] = positions
        out = decoder()
        slots = np.asarray(slots, np.int64)
        columns = self._lengths[slots] - 1
        self._keys[:, slots, :, columns] = out["keys"][:, slots, :, 0]
        self._values[:, slots, :, columns] = out["values"][:, slots, :, 0]
        self._logits[slots] = out["logits"][slots]
