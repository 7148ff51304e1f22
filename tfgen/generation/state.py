"""The decode state and the pure functions that move it.

A state is a dict of tensors with a fixed number of rows (slots) and a fixed
capacity (buffer columns):

- `cache`: keys and values per layer (kv_cache; written by the model family's `blocks`), [rows, heads, capacity, head_dim];
- `tokens` [rows, capacity]: each row's prompt from column 0, then its new tokens;
- `logprobs` [rows, capacity]: each new token's log-probability, at its column;
- `lengths` [rows]: tokens in the row; `prompt_lengths` [rows]: where its new tokens start;
- `limits` [rows]: the length at which the row stops; `finished` [rows]: done (EOS,
  limit, or a free slot);
- `steps` [rows]: each row's sampling counter, its steps since it started (its step i samples with
  seed [seed, i], the row's seed).

The cache holds keys and values for columns 0..length-2 of a running row; the
token at length-1 is fed by the next step, so prefill never needs logits and
every step is the same program. Rows are independent: `start_rows` (in
`DecodeState`) puts prompts into chosen rows, `prefill` writes chosen rows'
prompts into the cache, `advance` moves every unfinished row on. The one-shot
program (decode.program) and the compiled programs over `DecodeState`'s
variables (decode.Decoder) both run these functions.
"""

import numpy as np
import tensorflow as tf

from tfgen.generation import kv_cache, processors
from tfgen.generation.shapes import dims

CACHE = "cache"
FIELDS = ("tokens", "logprobs", "lengths", "prompt_lengths", "limits", "finished", "steps")


def empty(net, rows, capacity, pad_id=0):
    """A state with every row free (finished, empty); `net` is the model's `tfgen.families.Family`."""
    return {
        CACHE: net.empty_cache(rows, capacity),
        "tokens": tf.fill([rows, capacity], tf.cast(pad_id, tf.int32)),
        "logprobs": tf.zeros([rows, capacity]),
        "lengths": tf.zeros([rows], tf.int32),
        "prompt_lengths": tf.zeros([rows], tf.int32),
        "limits": tf.zeros([rows], tf.int32),
        "finished": tf.ones([rows], tf.bool),
        "steps": tf.zeros([rows], tf.int32),
    }


def compact(input_ids, attention_mask, pad_id):
    """Prompts [batch, len] with any mask -> (their real tokens from column 0, pads after; their lengths)."""
    order = tf.argsort(1 - attention_mask, axis=1, stable=True)  # real tokens first, in their order
    lengths = tf.reduce_sum(attention_mask, axis=1)
    ids = tf.gather(input_ids, order, batch_dims=1)
    real = tf.range(dims(input_ids)[1])[None, :] < lengths[:, None]
    return tf.where(real, ids, pad_id), lengths


def with_prompts(state, prompts, prompt_lengths, max_new_tokens):
    """Every row started on `prompts` [rows, width <= capacity] (compact), stopping after max_new_tokens."""
    rows, capacity = dims(state["tokens"])
    width = dims(prompts)[1]
    return {
        **state,
        "tokens": tf.concat([prompts, state["tokens"][:, width:]], axis=1),
        "logprobs": tf.zeros([rows, capacity]),
        "lengths": prompt_lengths,
        "prompt_lengths": prompt_lengths,
        "limits": prompt_lengths + max_new_tokens,
        "finished": tf.zeros([rows], tf.bool),
        "steps": tf.zeros([rows], tf.int32),
    }


def prefill(net, state, offset, width, writing):
    """Writes the keys and values of columns offset..offset+width of the rows where `writing` [rows] holds.

    Other rows are left as they are (their writes are aimed past the capacity
    and dropped). Columns past a row's prompt get keys and values of its pads:
    never attended to, and overwritten as the row grows.
    """
    rows, capacity = dims(state["tokens"])
    columns = offset + tf.range(width)[None, :]
    token_ids = tf.gather(state["tokens"], tf.minimum(columns, capacity - 1)[0], axis=1)
    columns = tf.where(writing[:, None], tf.broadcast_to(columns, [rows, width]), capacity)
    _, cache = net.blocks(token_ids, columns, state[CACHE])
    return {**state, CACHE: cache}


def prefill_columns(net, state, columns, chunk, writing):
    """`prefill` of columns 0..columns-1 (a scalar tensor) of the rows where `writing` holds, `chunk` columns at a
    time in a loop: one program for any prompt length, at most chunk-1 columns computed in vain."""

    def body(offset, state):
        return offset + chunk, prefill(net, state, offset, chunk, writing)

    _, state = tf.while_loop(lambda offset, state: offset < columns, body, (tf.constant(0), state))
    return state


def prefill_rows(net, state, rows, starts, ends, chunk, span):
    """The keys and values of columns starts..ends-1 ([n] each) of the rows `rows` [n] alone, `chunk` columns an
    iteration, over the first `span` columns of their cache, within which their prompts lie: the cost of an n-row
    prefill, however many rows the state holds. A row's columns before its start are kept (a prefix whose keys and
    values are there already). A row may be listed twice (the same values are written twice)."""

    # A gather, not a slice at a row: XLA takes a slice's start as a constant, compiling a program per row.
    def cut(cache):  # [slots, heads, capacity, d] -> [n, heads, span, d]
        return tf.gather(cache, rows)[:, :, :span]

    tokens = tf.gather(state["tokens"], rows)[:, :span]

    def body(offset, cache):
        # Columns past a row's end get its pads' keys and values (overwritten as it grows); past the span, dropped.
        columns = (starts + offset)[:, None] + tf.range(chunk)[None, :]
        token_ids = tf.gather(tokens, tf.minimum(columns, span - 1), batch_dims=1)
        return offset + chunk, net.blocks(token_ids, columns, cache)[1]

    longest = tf.reduce_max(ends - starts)
    _, alone = tf.while_loop(
        lambda offset, cache: offset < longest, body, (tf.constant(0), [(cut(k), cut(v)) for k, v in state[CACHE]])
    )
    where = (tf.broadcast_to(tf.range(span)[None, :], [dims(rows)[0], span]), rows)  # their columns 0..span-1
    cache = [
        (kv_cache.write(k, new_k, *where), kv_cache.write(v, new_v, *where))
        for (k, v), (new_k, new_v) in zip(state[CACHE], alone)
    ]
    return {**state, CACHE: cache}


def feed_last(net, tokens, lengths, cache, span=None):
    """Logits [rows, vocab] after each row's last token (column length-1), whose keys and values are written;
    attention over the cache's first `span` columns (None: all)."""
    column = tf.maximum(lengths - 1, 0)
    last = tf.gather(tokens, column, batch_dims=1)[:, None]
    hidden, cache = net.blocks(last, column[:, None], cache, attend=kv_cache.attending(span))
    return net.head(hidden[:, -1]), cache


def _put(buffer, column, value, where):
    """buffer [rows, capacity] with value [rows] at `column` [rows] of the rows where `where` holds."""
    at = tf.logical_and(tf.range(dims(buffer)[1])[None, :] == column[:, None], where[:, None])
    return tf.where(at, value[:, None], buffer)


def step(net, state, settings, choose, span=None):
    """One new token for every unfinished row. `choose(scores, steps, settings)` -> (tokens, log-probabilities).

    Settings are scalars (every row alike) or [rows] (each row its own); see decode.settings_tensors.
    With `span`, attention reads the cache's first span columns only: every unfinished row's limit lies within.
    """
    logits, cache = feed_last(net, state["tokens"], state["lengths"], state[CACHE], span)
    lengths = state["lengths"]
    scores = processors.process(logits, state["tokens"], lengths, lengths - state["prompt_lengths"], settings)
    token, logprob = choose(scores, state["steps"], settings)
    running = tf.logical_not(state["finished"])
    lengths_after = lengths + tf.cast(running, tf.int32)
    is_eos = tf.reduce_any(token[:, None] == settings["eos_ids"][None, :], axis=1)
    ends = tf.logical_or(is_eos, lengths_after >= state["limits"])
    return {
        **state,
        CACHE: cache,
        "tokens": _put(state["tokens"], lengths, token, running),
        "logprobs": _put(state["logprobs"], lengths, logprob, running),
        "lengths": lengths_after,
        "finished": tf.logical_or(state["finished"], tf.logical_and(running, ends)),
        "steps": state["steps"] + tf.cast(running, tf.int32),
    }


def advance(net, state, num_steps, settings, choose, span=None):
    """Up to `num_steps` steps (a scalar tensor), fewer if every row finishes; `span` as in `step`."""

    def not_done(i, state):
        return tf.logical_and(i < num_steps, tf.logical_not(tf.reduce_all(state["finished"])))

    def body(i, state):
        return i + 1, step(net, state, settings, choose, span)

    _, state = tf.while_loop(not_done, body, (tf.constant(0), state))
    return state


def first_rows(state, rows):
    """The fields of the state's first `rows` rows (a static int), with the whole cache: `step` and `advance` over
    them read and write the cache in those rows only (kv_cache.attend)."""
    return {CACHE: state[CACHE], **{name: state[name][:rows] for name in FIELDS}}


def with_first_rows(state, first):
    """`state` with the fields of its first rows and the cache from `first` (a `first_rows` state moved on)."""
    rows = dims(first["tokens"])[0]
    return {CACHE: first[CACHE], **{name: tf.concat([first[name], state[name][rows:]], axis=0) for name in FIELDS}}


def new_columns(buffer, prompt_lengths, lengths, first, count, fill):
    """Columns first..first+count of each row's new tokens [rows, count]; `fill` where a row has none."""
    index = prompt_lengths[:, None] + first + tf.range(count)[None, :]
    values = tf.gather(buffer, tf.minimum(index, dims(buffer)[1] - 1), batch_dims=1)
    return tf.where(index < lengths[:, None], values, fill)


class DecodeState(tf.Module):
    """A state in tf.Variables, for compiled programs that read it and assign the result.

    XLA updates a variable that a compiled function assigns in place, so a
    program call moves the state without copying the cache (passing the cache
    in and out as tensors would copy it on every call).
    """

    def __init__(self, net, rows, capacity, pad_id):
        super().__init__(name="decode_state")
        self.rows, self.capacity, self.pad_id = rows, capacity, pad_id
        initial = empty(net, rows, capacity, pad_id)
        self.cache = [(tf.Variable(k, trainable=False), tf.Variable(v, trainable=False)) for k, v in initial[CACHE]]
        self.fields = {name: tf.Variable(initial[name], trainable=False) for name in FIELDS}

    def read(self):
        return {
            CACHE: [(k.read_value(), v.read_value()) for k, v in self.cache],
            **{name: variable.read_value() for name, variable in self.fields.items()},
        }

    def write(self, state):
        for (k, v), (new_k, new_v) in zip(self.cache, state[CACHE]):
            k.assign(new_k)
            v.assign(new_v)
        for name, variable in self.fields.items():
            variable.assign(state[name])

    def start_rows(self, rows, prompts, prompt_lengths, limits):
        """Puts compact `prompts` [n, width] into the slots `rows` [n]; they run until `limits` [n] tokens.

        Other rows are untouched; the rows' sampling counters start at 0 and
        their cache is filled by prefill programs next.
        """
        rows = tf.convert_to_tensor(rows, tf.int32)[:, None]
        prompts = tf.convert_to_tensor(prompts, tf.int32)
        tokens = tf.pad(prompts, [[0, 0], [0, self.capacity - prompts.shape[1]]], constant_values=self.pad_id)
        fields = self.fields
        fields["tokens"].scatter_nd_update(rows, tokens)
        fields["logprobs"].scatter_nd_update(rows, tf.zeros(tokens.shape))
        fields["lengths"].scatter_nd_update(rows, prompt_lengths)
        fields["prompt_lengths"].scatter_nd_update(rows, prompt_lengths)
        fields["limits"].scatter_nd_update(rows, limits)
        fields["finished"].scatter_nd_update(rows, tf.zeros(rows.shape[:1], tf.bool))
        fields["steps"].scatter_nd_update(rows, tf.zeros(rows.shape[:1], tf.int32))

    def finish_rows(self, rows):
        """Marks the slots `rows` finished (free): the next advance leaves them as they are."""
        rows = tf.convert_to_tensor(rows, tf.int32)[:, None]
        self.fields["finished"].scatter_nd_update(rows, tf.ones(rows.shape[:1], tf.bool))

    def start(self, prompts, prompt_lengths, limits):
        """start_rows on every row (as a fresh generate call)."""
        prompts = np.asarray(prompts, np.int32)
        tokens = np.full([self.rows, self.capacity], self.pad_id, np.int32)
        tokens[:, : prompts.shape[1]] = prompts
        values = {
            "tokens": tokens,
            "logprobs": np.zeros(tokens.shape, np.float32),
            "lengths": prompt_lengths,
            "prompt_lengths": prompt_lengths,
            "limits": limits,
            "finished": np.zeros(self.rows, bool),
            "steps": np.zeros(self.rows, np.int32),
        }
        for name, value in values.items():
            self.fields[name].assign(value)

    def value(self, name):
        """A field's current value as numpy (tokens, lengths, finished, ...)."""
        return self.fields[name].numpy()
