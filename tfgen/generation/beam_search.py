"""Beam search with transformers' semantics (its vectorised PyTorch algorithm), compiled.

Per prompt, `num_beams` running beams and `num_beams` finished hypotheses are
kept in fixed-shape tensors. Each step takes the best K = max(2, 1 + #EOS) x
num_beams continuations over all beams; those that end (EOS or the length
limit) compete for the finished slots, scored with the length penalty; the
best num_beams others keep running. It starts from a prefilled decode state
(tfgen.generation.state) whose rows are each prompt repeated num_beams times;
the KV cache lives as [batch x beams, ...] and is reordered by a gather each step.
"""

import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from tfgen.generation import processors
from tfgen.generation.shapes import dims
from tfgen.generation.state import CACHE, feed_last

NEVER_SCORE = -1.0e9  # transformers' stand-in for an impossible beam


def _gather_beams(tensor, indices):
    """tensor [batch, beams, ...] -> the beams at `indices` [batch, k], per batch row."""
    return tf.gather(tensor, indices, axis=1, batch_dims=1)


def _stop_heuristic_unsatisfied(unsatisfied, running_scores, beam_scores, is_finished, generated, settings):
    """Can a running beam still beat the worst finished one? (transformers' _check_early_stop_heuristic)."""
    length_penalty = settings["length_penalty"]
    never = tf.logical_and(tf.equal(settings["early_stopping"], 2), length_penalty > 0.0)
    best_length = tf.cast(tf.where(never, settings["max_new_tokens"], generated), tf.float32)
    best_running = running_scores[:, :1] / best_length**length_penalty
    worst_finished = tf.where(is_finished, tf.reduce_min(beam_scores, axis=1, keepdims=True), NEVER_SCORE)
    return tf.logical_and(unsatisfied, tf.reduce_any(best_running > worst_finished, axis=-1, keepdims=True))


def _put_column(buffer, token, column):
    """buffer [batch, k, capacity] with token [batch, k] written at column [batch] of each batch row."""
    at = tf.range(dims(buffer)[2])[None, None, :] == column[:, None, None]
    return tf.where(at, token[:, :, None], buffer)


def search(net, state, settings, num_beams, num_return_sequences):
    """Returns the best num_return_sequences finished beams per prompt, a dict of: `sequences`
    [batch * num_return_sequences, capacity] (prompt from column 0, then the new tokens), `prompt_lengths`,
    `lengths` (prompt + new tokens), `token_logprobs` [.., capacity] (each new token's processed
    log-probability, by step) and `sequences_scores` (length-penalised beam scores)."""
    rows, capacity = dims(state["tokens"])
    batch = rows // num_beams
    prompt_lengths = tf.reshape(state["prompt_lengths"], [batch, num_beams])[:, 0]
    vocab = net.config.vocab_size
    eos_ids = settings["eos_ids"]
    keep = max(2, 1 + eos_ids.shape[0]) * num_beams
    top_beams_mask = tf.range(keep) < num_beams
    early_true = tf.equal(settings["early_stopping"], 1)

    def row_lengths(step):
        return tf.repeat(prompt_lengths + step, num_beams)

    logits, cache = feed_last(net, state["tokens"], state["lengths"], state[CACHE])
    running = tf.reshape(state["tokens"], [batch, num_beams, capacity])
    state = dict(
        running=running,
        running_scores=tf.tile(tf.where(tf.range(num_beams) == 0, 0.0, NEVER_SCORE)[None], [batch, 1]),
        finished=running,
        running_logprobs=tf.zeros([batch, num_beams, capacity]),
        finished_logprobs=tf.zeros([batch, num_beams, capacity]),
        finished_scores=tf.fill([batch, num_beams], NEVER_SCORE),
        finished_lengths=tf.zeros([batch, num_beams], tf.int32),
        is_finished=tf.zeros([batch, num_beams], tf.bool),
        unsatisfied=tf.ones([batch, 1], tf.bool),
        all_hit=tf.constant(False),
    )

    def select(state, logits, step):
        """One beam step from next-token logits [rows, vocab]; returns the new state and each row's parent beam."""
        flat_running = tf.reshape(state["running"], [rows, capacity])
        log_probs = tf.nn.log_softmax(logits, axis=-1)
        log_probs = processors.process(log_probs, flat_running, row_lengths(step), step, settings)
        log_probs = tf.reshape(log_probs, [batch, num_beams * vocab])
        totals = tf.reshape(log_probs, [batch, num_beams, vocab]) + state["running_scores"][:, :, None]
        top_scores, top_indices = tf.math.top_k(tf.reshape(totals, [batch, num_beams * vocab]), keep)
        parent, token = top_indices // vocab, top_indices % vocab
        candidates = _put_column(_gather_beams(state["running"], parent), token, prompt_lengths + step)
        candidate_logprobs = xla.dynamic_update_slice(
            _gather_beams(state["running_logprobs"], parent),
            tf.gather(log_probs, top_indices, batch_dims=1)[:, :, None],
            [0, 0, step],
        )
        hits = tf.logical_or(
            tf.reduce_any(token[:, :, None] == eos_ids[None, None, :], axis=-1),
            step + 1 >= settings["max_new_tokens"],
        )

        running_scores = top_scores + tf.cast(hits, tf.float32) * NEVER_SCORE
        survivors = tf.math.top_k(running_scores, num_beams).indices

        just_finished = tf.logical_and(hits, top_beams_mask[None, :])
        scores = top_scores / tf.cast(step + 1, tf.float32) ** settings["length_penalty"]
        full = tf.logical_and(tf.reduce_all(state["is_finished"], axis=-1, keepdims=True), early_true)
        blocked = tf.logical_or(
            tf.logical_or(full, tf.logical_not(state["unsatisfied"])), tf.logical_not(just_finished)
        )
        scores += tf.cast(blocked, tf.float32) * NEVER_SCORE
        merged_scores = tf.concat([state["finished_scores"], scores], axis=1)
        best = tf.math.top_k(merged_scores, num_beams).indices

        def merge(old, new):
            return _gather_beams(tf.concat([old, new], axis=1), best)

        new_state = dict(
            running=_gather_beams(candidates, survivors),
            running_logprobs=_gather_beams(candidate_logprobs, survivors),
            finished_logprobs=merge(state["finished_logprobs"], candidate_logprobs),
            running_scores=_gather_beams(running_scores, survivors),
            finished=merge(state["finished"], candidates),
            finished_scores=_gather_beams(merged_scores, best),
            finished_lengths=merge(state["finished_lengths"], tf.fill([batch, keep], step + 1)),
            is_finished=merge(state["is_finished"], just_finished),
            all_hit=tf.reduce_all(hits),
        )
        new_state["unsatisfied"] = _stop_heuristic_unsatisfied(
            state["unsatisfied"],
            new_state["running_scores"],
            new_state["finished_scores"],
            new_state["is_finished"],
            step + 1,
            settings,
        )
        rows_parent = tf.reshape(_gather_beams(parent, survivors) + tf.range(batch)[:, None] * num_beams, [rows])
        return new_state, rows_parent

    def reorder(cache, rows_parent):
        return [(tf.gather(k, rows_parent), tf.gather(v, rows_parent)) for k, v in cache]

    def not_done(step, state, cache):
        improvable = tf.reduce_any(state["unsatisfied"])
        open_beam = tf.logical_not(tf.logical_and(tf.reduce_all(state["is_finished"]), early_true))
        return tf.logical_and(tf.logical_and(improvable, open_beam), tf.logical_not(state["all_hit"]))

    def advance(step, state, cache):
        flat_running = tf.reshape(state["running"], [rows, capacity])
        logits, cache = feed_last(net, flat_running, row_lengths(step), cache)
        state, rows_parent = select(state, logits, step)
        return step + 1, state, reorder(cache, rows_parent)

    state, rows_parent = select(state, logits, tf.constant(0))
    _, state, _ = tf.while_loop(not_done, advance, (tf.constant(1), state, reorder(cache, rows_parent)))

    def best(name):
        value = state[name][:, :num_return_sequences]
        return tf.reshape(value, [batch * num_return_sequences, *dims(value)[2:]])

    new_lengths = best("finished_lengths")
    after_end = tf.range(capacity)[None, :] >= new_lengths[:, None]
    returned_prompt_lengths = tf.repeat(prompt_lengths, num_return_sequences)
    return {
        "sequences": best("finished"),
        "prompt_lengths": returned_prompt_lengths,
        "lengths": returned_prompt_lengths + new_lengths,
        "token_logprobs": tf.where(after_end, 0.0, best("finished_logprobs")),
        "sequences_scores": best("finished_scores"),
    }
