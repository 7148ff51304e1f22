"""Prefix caching: time to first token of a server row whose prompt starts with a cached 200-token prefix, against
the same prompt prefilled whole.

On the server's XLA rows (tfgen.serving.rows.StateRows, one slot): a row's time to first token is its
`start_rows` (copy of the cached blocks, prefill of the rest) and its first one-token step, as the scheduler
runs them; HTTP and queueing are left out. The prompts are a PREFIX_TOKENS-token prefix and SUFFIX_TOKENS
tokens of their own (random ids); the cache is warmed by one prompt first. Models: the embedded ko-mini, and a
random-weight GPT-2 of KoGPT2-base size unless --small.

    python benchmarks/prefix_cache.py            # ko-mini and KoGPT2-base size
    python benchmarks/prefix_cache.py --small    # smoke run: ko-mini and a tiny random model
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ["TFGEN_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="prefix_cache-cache-")  # not the user's cache

import numpy as np  # noqa: E402

from _harness import command_line, format_table, gpt2_config, machine_info, print_machine, results_path, write_results  # noqa: E402

PREFIX_TOKENS = 200
SUFFIX_TOKENS = 8


def first_token_seconds(rows, prompt):
    """A row's start and first token, as the scheduler runs them; the slot is freed after."""
    from tfgen.serving.protocol import Sampling

    sampling = Sampling(
        max_tokens=1,
        do_sample=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_tokens=0,
    )
    start = time.perf_counter()
    reused = rows.start_rows([(0, prompt, sampling)])[0]
    rows.step(1)
    seconds = time.perf_counter() - start
    rows.free_row(0)
    return seconds, reused


def measure(name, lm, repeats):
    from tfgen.serving.prefix_cache import PrefixCache
    from tfgen.serving.rows import StateRows

    rng = np.random.default_rng(0)
    prefix = rng.integers(4, lm.config.vocab_size, PREFIX_TOKENS).tolist()
    prompts = [prefix + rng.integers(4, lm.config.vocab_size, SUFFIX_TOKENS).tolist() for _ in range(repeats + 1)]
    cached, plain = StateRows(lm, 1, PrefixCache()), StateRows(lm, 1)
    for rows in (cached, plain):
        rows.warm_up(prompts[0][:2])
        first_token_seconds(rows, prompts[0])  # the cache's first prompt (and any first-call cost)
    times = {"without": [], "with": []}
    for prompt in prompts[1:]:  # in turns: the machine's load moves both alike
        times["without"].append(first_token_seconds(plain, prompt)[0])
        seconds, reused = first_token_seconds(cached, prompt)
        times["with"].append(seconds)
    without_s, with_s = statistics.median(times["without"]), statistics.median(times["with"])
    return {
        "model": name,
        "layers": lm.config.n_layer,
        "width": lm.config.n_embd,
        "reused_tokens": reused,
        "without_ms": 1000 * without_s,
        "with_ms": 1000 * with_s,
        "ratio": with_s / without_s,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny random model instead of KoGPT2-base size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="where to write the results")
    args = parser.parse_args()
    command, info = command_line(), machine_info()
    from transformers import GPT2Config

    from tfgen import GPT2LM

    rows = [measure("ko-mini", GPT2LM.from_pretrained("ko-mini"), args.repeats)]
    config = gpt2_config(args.small).to_dict()
    random_lm = GPT2LM(GPT2Config.from_dict(config))
    random_lm(np.zeros([1, 2], np.int32))
    rows.append(measure("random, tiny" if args.small else "random, KoGPT2-base size", random_lm, args.repeats))
    print_machine(info, command)
    print(
        f"prompts: a {PREFIX_TOKENS}-token prefix + {SUFFIX_TOKENS} tokens; XLA rows, one slot, greedy; "
        f"median of {args.repeats}"
    )
    print(
        format_table(
            rows,
            [
                ("model", "model", "{}"),
                ("reused", "reused_tokens", "{}"),
                ("TTFT without (ms)", "without_ms", "{:.1f}"),
                ("with cache (ms)", "with_ms", "{:.1f}"),
                ("ratio", "ratio", "{:.2f}"),
            ],
        )
    )
    write_results(
        results_path("prefix_cache", args.small, args.json),
        {
            "machine": info,
            "command": command,
            "prefix_tokens": PREFIX_TOKENS,
            "suffix_tokens": SUFFIX_TOKENS,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
