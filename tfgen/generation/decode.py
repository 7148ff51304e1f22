"""Decoding programs: the compiled engine behind GPT2LM.generate, and the one-shot program of the export.

The engine (`Decoder`) keeps a `state.DecodeState` per (rows, capacity tier)
and compiles, per state, one prefill program (the prompts' columns, CHUNK at
a time, for chosen rows) and one advance program per strategy (every
unfinished row on by a runtime number of steps), plus a beam-search program
per beam count. A server's state (`own_programs`) also has a prefill of chosen
rows alone per span and row count and advance programs over a span and its first rows (see
`_Programs`). Prompts of any length and any max_new_tokens within a tier
run the same programs; every setting enters as a tensor (see
`settings_tensors`), so nothing retraces once a tier is warm. A generation
that streams runs the same advance program in blocks of steps, so it gives
the same tokens as one that does not.

`program` is the one-shot form, from prompt to finished sequences in one XLA
call, built from the same state functions; the exported SavedModel
(tfgen.export) holds it, traced with unknown batch and prompt length, with
`decode` padding prompts to a bucket of BUCKET tokens and the new-token
buffer to a multiple of BUCKET.
"""

import collections
import contextlib
import threading

import numpy as np
import tensorflow as tf

from tfgen import _env
from tfgen.generation import beam_search, program_store, sampling
from tfgen.generation import state as decode_state
from tfgen.generation.shapes import dims, per_row

BUCKET = 32
CHUNK = (
    16  # prompt columns per prefill iteration (a 16-column matmul costs little more per column than a wider one here)
)
# Capacities (prompt + new tokens) the engine compiles for; the model's context caps them.
TIERS = (128, 256, 512, 1024)
STREAM_BLOCKS = (1, 4)  # a streamed generation's steps per advance call: the first, then every later one
MAX_STATES = 4  # decode states (and their programs) kept, the least recently used dropped first
EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}
# The settings a call may give per row ([rows] instead of a scalar), with their dtypes; `draw_index` (which of
# its step's draws a sampling row takes, see sampling.row_draws) is given only per row, and defaults to the row's index.
ROW_SETTINGS = {
    "temperature": np.float32,
    "top_k": np.int32,
    "top_p": np.float32,
    "seed": np.int64,
    "draw_index": np.int32,
    "repetition_penalty": np.float32,
    "no_repeat_ngram_size": np.int32,
    "min_new_steps": np.int32,
    "presence_penalty": np.float32,
    "frequency_penalty": np.float32,
}


def round_up(n, multiple=BUCKET):
    """n rounded up to a multiple (an int, or a scalar tensor)."""
    return -(-n // multiple) * multiple


def left_pad(input_ids, attention_mask, width, pad_token_id):
    """Pads [batch, len] tensors on the left to [batch, width]."""
    paddings = [[0, 0], [width - tf.shape(input_ids)[1], 0]]
    return tf.pad(input_ids, paddings, constant_values=pad_token_id), tf.pad(attention_mask, paddings)


def settings_tensors(options):
    """The runtime settings of one call, as the tensors a compiled program takes.

    A field of `options` may already be a tensor (the exported model's request inputs). Each setting is a
    scalar, for every row alike; the row settings (ROW_SETTINGS) may instead be given [rows], one per row,
    as a server's rows are (`tfgen.serving.rows.StateRows`), and `logit_bias` [rows, vocab]. The processors and the choice broadcast a
    scalar, so both run the same code.
    """
    return {
        "max_new_tokens": tf.cast(options.max_new_tokens, tf.int32),
        "eos_ids": tf.constant(options.eos_token_ids, tf.int32, shape=[len(options.eos_token_ids)]),
        "pad_id": tf.cast(options.pad_token_id, tf.int32),
        "temperature": tf.cast(options.temperature, tf.float32),
        "top_k": tf.cast(options.top_k, tf.int32),
        "top_p": tf.cast(options.top_p, tf.float32),
        "seed": tf.cast(options.seed, tf.int64),
        "repetition_penalty": tf.cast(options.repetition_penalty, tf.float32),
        "no_repeat_ngram_size": tf.cast(options.no_repeat_ngram_size, tf.int32),
        "min_new_steps": tf.cast(options.min_new_steps, tf.int32),
        "presence_penalty": tf.cast(options.presence_penalty, tf.float32),
        "frequency_penalty": tf.cast(options.frequency_penalty, tf.float32),
        "logit_bias": tf.zeros([], tf.float32),  # none; a server's rows give theirs, [rows, vocab]
        "length_penalty": tf.cast(options.length_penalty, tf.float32),
        "early_stopping": tf.constant(EARLY_STOPPING_CODES[options.early_stopping], tf.int32),
        **bad_word_tensors(options.bad_words_ids),
    }


def bad_word_tensors(bad_words_ids):
    """Bad words left-aligned in a [n_words, longest] matrix, with their lengths."""
    longest = max((len(word) for word in bad_words_ids), default=1)
    words = np.zeros((len(bad_words_ids), longest), np.int32)
    for row, word in enumerate(bad_words_ids):
        words[row, : len(word)] = word
    return {
        "bad_words": tf.constant(words),
        "bad_word_lengths": tf.constant([len(word) for word in bad_words_ids], tf.int32, shape=[len(bad_words_ids)]),
    }


def greedy_choice(scores):
    """The best token of each row and its log-probability."""
    token = tf.argmax(scores, axis=-1, output_type=tf.int32)
    return token, sampling.chosen_logprob(scores, token)


def chooser(strategy):
    """The token choice of "greedy" or "sample": (scores, steps, settings) -> (tokens, log-probabilities).

    "sample" draws row r's token with `sampling.row_draws` from its seed, its step count (`steps` [rows])
    and its `draw_index` (a setting; without it, r); a row at temperature 0 takes the best token.
    """
    if strategy == "greedy":
        return lambda scores, steps, settings: greedy_choice(scores)

    def sample(scores, steps, settings):
        rows = dims(scores)[0]
        draw_index = settings["draw_index"] if "draw_index" in settings else tf.range(rows)
        uniform = sampling.row_draws(per_row(settings["seed"], rows, tf.int64), steps, draw_index)
        return choose_at(scores, settings["temperature"], settings["top_k"], settings["top_p"], uniform)

    return sample


def choose_at(scores, temperature, top_k, top_p, uniform):
    """Each row's token and log-probability: the best where its temperature is 0, else a top-k / top-p draw at its
    `uniform` number [rows, 1] (each setting a scalar or one per row)."""
    rows = dims(scores)[0]
    temperature = per_row(temperature, rows, tf.float32)
    greedy = temperature == 0.0
    warped = sampling.apply_temperature(scores, tf.where(greedy, 1.0, temperature))
    # A greedy row's top-k of 1 keeps the draw among the best logits (no row needs the whole vocabulary).
    top_k = tf.where(greedy, 1, per_row(top_k, rows, tf.int32))
    token, logprob = sampling.sample_top_k_top_p_at(warped, top_k, top_p, uniform)
    best, best_logprob = greedy_choice(scores)
    return tf.where(greedy, best, token), tf.where(greedy, best_logprob, logprob)


def token_results(state):
    """What a greedy or sampling run leaves, in the form `caller_layout` takes (the new tokens' log-probabilities by step)."""
    capacity = dims(state["tokens"])[1]
    logprobs = decode_state.new_columns(state["logprobs"], state["prompt_lengths"], state["lengths"], 0, capacity, 0.0)
    return {
        "sequences": state["tokens"],
        "prompt_lengths": state["prompt_lengths"],
        "lengths": state["lengths"],
        "token_logprobs": logprobs,
    }


def program(net, strategy, num_beams=1, num_return_sequences=1):
    """The one-shot decode program of a strategy ("greedy", "sample" or "beam"): (input_ids, attention_mask, settings) -> dict.

    The prompts come padded to their bucket, with `new_token_slots` in the
    settings (as `decode` passes them); the result is in `caller_layout`'s form.
    """
    rows_per_prompt = num_beams if strategy == "beam" else 1

    def one_shot(input_ids, attention_mask, settings):
        batch, width = dims(input_ids)
        capacity = width + dims(settings["new_token_slots"])[0]
        prompts, lengths = decode_state.compact(input_ids, attention_mask, settings["pad_id"])
        prompts, lengths = tf.repeat(prompts, rows_per_prompt, axis=0), tf.repeat(lengths, rows_per_prompt)
        state = decode_state.empty(net, batch * rows_per_prompt, capacity, settings["pad_id"])
        state = decode_state.with_prompts(state, prompts, lengths, settings["max_new_tokens"])
        state = decode_state.prefill(net, state, 0, width, tf.ones([batch * rows_per_prompt], tf.bool))
        if strategy == "beam":
            return beam_search.search(net, state, settings, num_beams, num_return_sequences)
        state = decode_state.advance(net, state, settings["max_new_tokens"], settings, chooser(strategy))
        return token_results(state)

    return one_shot


def caller_layout(input_ids, results, pad_id):
    """A program's results as GPT2LM.generate returns them: `sequences` [rows, len + steps] (the prompts as
    given, repeated per returned row, then the new tokens, pads after a row's end), `token_logprobs` [rows, steps]
    and, with beams, `sequences_scores`."""
    prompt_lengths, lengths = results["prompt_lengths"], results["lengths"]
    steps = tf.reduce_max(lengths - prompt_lengths)
    new = decode_state.new_columns(results["sequences"], prompt_lengths, lengths, 0, steps, pad_id)
    repeats = tf.shape(new)[0] // tf.shape(input_ids)[0]
    out = {
        "sequences": tf.concat([tf.repeat(input_ids, repeats, axis=0), new], axis=1),
        "token_logprobs": results["token_logprobs"][:, :steps],
    }
    if "sequences_scores" in results:
        out["sequences_scores"] = results["sequences_scores"]
    return out


def decode(program, input_ids, attention_mask, settings):
    """Runs a one-shot program on prompts [batch, len] and `settings_tensors`; returns `caller_layout`'s dict.

    Pads the prompts to a bucket and sizes the new-token buffer (the shapes
    the program is compiled for). Runs in a traced function with unknown
    shapes (the exported model's signatures) as well as eagerly.
    """
    width = round_up(tf.shape(input_ids)[1])
    padded_ids, padded_mask = left_pad(input_ids, attention_mask, width, settings["pad_id"])
    # Its length is the new-token buffer: a shape, so XLA compiles a program per buffer size.
    settings = {**settings, "new_token_slots": tf.zeros([round_up(settings["max_new_tokens"])], tf.int32)}
    return caller_layout(input_ids, program(padded_ids, padded_mask, settings), settings["pad_id"])


def drain(generator, on_item=lambda item: None):
    """Runs a generator to its end, passing each item to `on_item`; returns the generator's return value."""
    while True:
        try:
            on_item(next(generator))
        except StopIteration as done:
            return done.value


def capacity_tier(needed, context):
    """The capacity the engine compiles for when a call needs `needed` columns: a tier, at most the context."""
    return min(next((tier for tier in TIERS if tier >= needed), context), context)


def _quiet_first_call(compiled):
    """`compiled` with its first call (the one that may load from XLA's persistent cache) run without the
    cache's read noise on stderr (`_env.CACHE_READ_NOISE`)."""
    first = [True]

    def call(*args):
        if not first[0]:
            return compiled(*args)
        first[0] = False
        with _env.native_stderr_without(_env.CACHE_READ_NOISE):
            return compiled(*args)

    return call


class _Programs:
    """A DecodeState and the compiled programs that move it."""

    def __init__(self, net, rows, capacity, pad_id, on_made):
        self.state = decode_state.DecodeState(net, rows, capacity, pad_id)
        self.net, self._on_made, self._functions = net, on_made, {}
        self._variables = net.weights + list(self.state.variables)
        self._description = net.trace_description()

        def layout(input_ids):
            return caller_layout(input_ids, token_results(self.state.read()), pad_id)

        # One graph call instead of a dozen eager ops after each generate; any prompt width, so it traces once.
        # Not XLA and not counted among the compiled programs' traces.
        self.layout = tf.function(layout, autograph=False, input_signature=[tf.TensorSpec([None, None], tf.int32)])
        self.layout._omit_frequent_tracing_warning = True

    def prefill_columns(self, width, writing):
        """The prefill call over columns 0..width-2 of the rows where `writing` [rows] holds (a prompt of `width`
        tokens: its last one is fed by the first step)."""
        if width > 1:

            def prefill(columns, writing):
                self.state.write(decode_state.prefill_columns(self.net, self.state.read(), columns, CHUNK, writing))

            self._compiled("prefill", prefill)(tf.constant(width - 1), tf.constant(writing))

    def prefill_rows(self, rows, starts, ends, span):
        """The prefill call of the rows `rows` alone (a list; its length picks the program): their columns
        starts..ends-1 (lists: a row's columns before its start hold its cached prefix; a prompt of n tokens ends
        at n-1, its last token fed by the first step), within the first `span` of the cache."""
        if max(end - start for start, end in zip(starts, ends)) > 0:
            # About CHUNK positions an iteration, as generate's prefill of one row: many rows of short prompts
            # (a server's new rows) then compute few pad columns.
            chunk = max(1, CHUNK // len(rows))

            def prefill_rows(rows, starts, ends):
                self.state.write(
                    decode_state.prefill_rows(self.net, self.state.read(), rows, starts, ends, chunk, span)
                )

            self._compiled(("prefill_rows", span, len(rows)), prefill_rows)(
                *(tf.constant(values, tf.int32) for values in (rows, starts, ends))
            )

    def _compiled(self, key, function):
        """The compiled program of `function` under `key`: traced (or loaded from the program store) on first use."""
        if key not in self._functions:
            state = self.state
            program = program_store.Program(
                function,
                self._variables,
                self._description,
                [key, state.rows, state.capacity, state.pad_id],
                self._on_made,
            )
            self._functions[key] = _quiet_first_call(program)
        return self._functions[key]

    def advance(self, strategy, span=None, rows=None):
        """The program (num_steps, settings) that moves every unfinished row on by up to num_steps; returns the
        rows' tokens, lengths and finished flags after. With `span`, attention reads the cache's first span
        columns only (decode_state.step): every unfinished row's limit must lie within them. With `rows`, the
        program moves the state's first `rows` rows only (every unfinished row must be among them; row settings
        given per row are theirs, [rows]) and returns theirs."""
        choose = chooser(strategy)
        rows = rows or self.state.rows

        def advance(num_steps, settings):
            state = self.state.read()
            first = decode_state.advance(
                self.net, decode_state.first_rows(state, rows), num_steps, settings, choose, span
            )
            self.state.write(decode_state.with_first_rows(state, first))
            return {name: first[name] for name in ("tokens", "lengths", "finished")}  # what the host reads

        return self._compiled((strategy, span, rows), advance)

    def beam(self, num_beams, num_return_sequences):
        """The program (settings) -> beam_search.search's results, from the prefilled state."""

        def beam(settings):
            return beam_search.search(self.net, self.state.read(), settings, num_beams, num_return_sequences)

        return self._compiled(("beam", num_beams, num_return_sequences), beam)


class Decoder:
    """The decode engine of one model (a `tfgen.families.Family`): decode states per (rows, capacity tier) and their programs."""

    def __init__(self, net):
        self.net = net
        # Programs made in this process: each a trace, or a load of a stored trace (program_store) counted in both.
        self.trace_count = self.loaded_count = 0
        self._programs = collections.OrderedDict()
        self._busy = set()  # ids of the _Programs whose state a running generation holds
        self._lock = threading.Lock()

    def programs(self, rows, capacity, pad_id):
        """The `_Programs` of a (rows, capacity): made on first use, kept for the MAX_STATES most recent."""
        key = (rows, capacity, pad_id)
        if key not in self._programs:
            self._programs[key] = _Programs(self.net, rows, capacity, pad_id, self._made)
            if len(self._programs) > MAX_STATES:
                self._programs.popitem(last=False)
        self._programs.move_to_end(key)
        return self._programs[key]

    def own_programs(self, rows, capacity, pad_id):
        """A `_Programs` for one caller alone, outside the ones generate calls share: rows that live across
        calls (a server's slots)."""
        return _Programs(self.net, rows, capacity, pad_id, self._made)

    @contextlib.contextmanager
    def _held(self, rows, capacity, pad_id):
        """Programs whose state no other generation is using: the cached ones, or (while those are held, as by
        a generate running in another thread) a fresh set for this generation alone."""
        with self._lock:
            programs = self.programs(rows, capacity, pad_id)
            if id(programs) in self._busy:
                programs = self.own_programs(rows, capacity, pad_id)
            self._busy.add(id(programs))
        try:
            yield programs
        finally:
            with self._lock:
                self._busy.discard(id(programs))

    def __call__(self, input_ids, attention_mask, options):
        """`stream` run to its end without looking at the blocks: its dict of numpy arrays."""
        return drain(self.stream(input_ids, attention_mask, options, streaming=False))

    def stream(self, input_ids, attention_mask, options, streaming=True):
        """A generator: yields each block of new tokens [rows, k] as decoded, returns a dict of numpy arrays.

        The dict: `sequences` [rows, len + steps], the prompts as given then the
        new tokens; `token_logprobs` [rows, steps]: each new token's
        log-probability under the distribution it was chosen from (0 after
        EOS); `sequences_scores` [rows]: beam scores (None without beams).
        Greedy and sampling give one row per input row, beam search
        num_return_sequences (and yields no blocks). Without `streaming` the
        advance program runs all steps in one call.
        """
        beams = options.num_beams
        strategy = "beam" if beams > 1 else "sample" if options.do_sample else "greedy"
        pad_id = options.pad_token_id
        input_ids = tf.constant(input_ids)
        prompts, prompt_lengths = decode_state.compact(input_ids, tf.constant(attention_mask), pad_id)
        prompts, prompt_lengths = np.repeat(prompts.numpy(), beams, axis=0), np.repeat(prompt_lengths.numpy(), beams)
        longest = int(prompt_lengths.max())
        capacity = capacity_tier(longest + options.max_new_tokens, self.net.context)
        with self._held(len(prompts), capacity, pad_id) as programs:
            out = yield from self._run(
                programs, strategy, input_ids, prompts[:, :longest], prompt_lengths, options, streaming
            )
        return {
            "sequences": out["sequences"].numpy(),
            "token_logprobs": out["token_logprobs"].numpy(),
            "sequences_scores": out["sequences_scores"].numpy() if "sequences_scores" in out else None,
        }

    @staticmethod
    def _run(programs, strategy, input_ids, prompts, prompt_lengths, options, streaming):
        """stream's work on a held state: yields the blocks, returns `caller_layout`'s dict."""
        state, pad_id = programs.state, options.pad_token_id
        state.start(prompts, prompt_lengths, prompt_lengths + options.max_new_tokens)
        programs.prefill_columns(prompts.shape[1], np.ones(state.rows, bool))
        settings = settings_tensors(options)
        if strategy == "beam":
            return caller_layout(
                input_ids, programs.beam(options.num_beams, options.num_return_sequences)(settings), pad_id
            )
        advance = programs.advance(strategy)
        blocks = iter(
            STREAM_BLOCKS[:1] + STREAM_BLOCKS[1:] * options.max_new_tokens if streaming else [options.max_new_tokens]
        )
        starts, emitted, finished = prompt_lengths, 0, False
        while not finished:
            now = {name: value.numpy() for name, value in advance(tf.constant(next(blocks)), settings).items()}
            finished = now["finished"].all()
            steps = int((now["lengths"] - starts).max())
            if streaming:
                columns = starts[:, None] + np.arange(emitted, steps)[None, :]
                yield np.where(
                    columns < now["lengths"][:, None],
                    np.take_along_axis(now["tokens"], np.minimum(columns, state.capacity - 1), axis=1),
                    pad_id,
                )
            emitted = steps
        return programs.layout(input_ids)

    def _made(self, loaded):
        self.trace_count += 1
        self.loaded_count += loaded
