"""How likely a model finds a text: per-token log-probabilities and perplexity; the top candidates at greedy steps.

TensorFlow is imported only by the functions that compute with it: the LiteRT
runtime (tfgen.litert), which runs without TensorFlow, shares the rest.
"""

import math

import numpy as np

BATCH = 16  # texts scored in one model call


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


def check_lengths(texts, lengths, context):
    """Every text needs a token to condition on and one to score, and must fit the model's context."""
    for text, length in zip(texts, lengths):
        if length < 2:
            raise ValueError(
                f"text {text!r} is {length} token(s); scoring needs at least 2 (the first is only context): "
                "pass a longer text"
            )
        if length > context:
            raise ValueError(
                f"text {text!r} is {length} tokens, more than the model's context of {context}; shorten it"
            )


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


def score(lm, texts):
    """CausalLM.score: one summarize() dict per text, batches of up to BATCH texts per model call."""
    tokenizer = _tokenizer(lm)
    input_ids, attention_mask = tokenizer.encode_batch(texts)
    lengths = attention_mask.sum(axis=1)
    check_lengths(texts, lengths, lm.net.context)
    results = []
    for start in range(0, len(texts), BATCH):
        rows = slice(start, start + BATCH)
        width = lengths[rows].max()  # drop the columns that are padding in every row of this batch
        ids, mask = input_ids[rows, -width:], attention_mask[rows, -width:]
        logprobs = next_token_logprobs(lm(ids, mask), ids).numpy()
        for row_ids, row_logprobs, length in zip(ids, logprobs, lengths[rows]):
            tokens = [tokenizer.token_text(t) for t in row_ids[-length:]]
            results.append(summarize(tokens, row_logprobs[1 - length:]))
    return results


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
