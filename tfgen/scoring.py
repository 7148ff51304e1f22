"""How likely a model finds a text: per-token log-probabilities and perplexity (a text longer than the context in
windows); the top candidates at greedy steps.

TensorFlow is imported only by the functions that compute with it: the LiteRT
runtime (tfgen.litert), which runs without TensorFlow, shares the rest.
"""

import math

import numpy as np

BATCH = 16  # windows (a text each, where it fits the context) scored in one model call


def next_token_logprobs(logits, input_ids):
    """log P(input_ids[:, t + 1] | input_ids[:, :t + 1]) for each t: a [batch, len - 1] float32 tensor."""
    import tensorflow as tf

    logprobs = tf.nn.log_softmax(tf.cast(logits[:, :-1], tf.float32), axis=-1)
    return tf.gather(logprobs, input_ids[:, 1:], batch_dims=2)


def summarize(tokens, token_logprobs):
    """score()'s dict for one text: its tokens, each later token's log-probability, their sum and the perplexity."""
    token_logprobs = [float(x) for x in token_logprobs]
    logprob = sum(token_logprobs)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "logprob": logprob,
        "perplexity": math.exp(-logprob / len(token_logprobs)),
    }


def check_lengths(texts, lengths):
    """Every text needs a token to condition on and one to score."""
    for text, length in zip(texts, lengths):
        if length < 2:
            raise ValueError(
                f"text {text!r} is {length} token(s); scoring needs at least 2 (the first is only context): "
                "pass a longer text"
            )


def windows(length, context, stride=None, window_name="the model's context"):
    """How a text of `length` tokens is scored by a model of `context` tokens: a (begin, end, scored) per window.

    The window ids[begin:end] goes through the model and gives the log-probabilities of its last `scored` tokens:
    those past the previous window's end (in the first window, all but token 0). Each window starts `stride`
    tokens after the one before (default: half the context) and is at most the context long; the last one ends at
    the text's end. So every token after the first is scored once, given the window's tokens before it (past the
    first window, at least `context` - `stride` of them), as transformers' perplexity guide does. A text that fits
    the context is one window, whatever the stride. `window_name`: what `context` is, for the error message.
    """
    if length <= context:
        return [(0, length, length - 1)]
    stride = context // 2 if stride is None else stride
    if not (isinstance(stride, int) and 1 <= stride < context):
        raise ValueError(
            f"stride must be an integer from 1 to {context - 1} (less than {window_name} of {context} "
            f"tokens) to score a text of {length} tokens in windows, got {stride!r}"
        )
    spans, scored_to = [], 1
    for begin in range(0, length - context + stride, stride):  # up to the first window that reaches the end
        end = min(begin + context, length)
        spans.append((begin, end, end - scored_to))
        scored_to = end
    return spans


def top_probabilities(logits, k):
    """The k most likely token ids of a next-token logits vector, best first, and their softmax probabilities."""
    import tensorflow as tf

    probs = tf.nn.softmax(tf.cast(logits, tf.float32))
    top = tf.math.top_k(probs, k=k)
    return top.indices.numpy(), top.values.numpy()


def _tokenizer(lm):
    if lm.tokenizer is None:
        raise ValueError("this model has no tokenizer; load a checkpoint saved with its tokenizer")
    return lm.tokenizer


def score(lm, texts, stride=None):
    """CausalLM.score: one summarize() dict per text, its windows() through the model up to BATCH at a time."""
    tokenizer = _tokenizer(lm)
    rows = [tokenizer.encode(text) for text in texts]
    check_lengths(texts, map(len, rows))
    spans = [
        (row, ids[begin:end], scored)
        for row, ids in enumerate(rows)
        for begin, end, scored in windows(len(ids), lm.net.context, stride)
    ]
    token_logprobs = [[] for _ in rows]
    for start in range(0, len(spans), BATCH):
        batch = spans[start : start + BATCH]
        ids, mask = tokenizer.left_pad([window for _, window, _ in batch])
        logprobs = next_token_logprobs(lm(ids, mask), ids).numpy()
        for (row, _, scored), window_logprobs in zip(batch, logprobs):
            token_logprobs[row].extend(window_logprobs[-scored:])
    return [
        summarize([tokenizer.token_text(t) for t in ids], row_logprobs)
        for ids, row_logprobs in zip(rows, token_logprobs)
    ]


def top_choices(lm, prompt, steps, k):
    """CausalLM.top_choices: per greedy step, the text so far and the k likeliest next tokens with probabilities."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    tokenizer = _tokenizer(lm)
    if not (isinstance(k, int) and 1 <= k <= tokenizer.vocab_size):
        raise ValueError(f"k must be an integer from 1 to the vocabulary size {tokenizer.vocab_size}, got {k!r}")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give some text")
    if len(ids) + steps - 1 > lm.net.context:
        raise ValueError(
            f"the prompt ({len(ids)} tokens) plus {steps} steps exceeds the model's context of "
            f"{lm.net.context} tokens; shorten the prompt or take fewer steps"
        )
    table = []
    for _ in range(steps):
        token_ids, probs = top_probabilities(lm(np.array([ids], np.int32))[0, -1], k)
        choices = [(tokenizer.token_text(t), float(p)) for t, p in zip(token_ids, probs)]
        table.append({"input": tokenizer.decode(ids), "choices": choices})
        ids.append(int(token_ids[0]))
    return table
