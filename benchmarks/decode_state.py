"""The decode-state engine: streaming cost, first-token latency, compiles after warm-up, tier cost, fresh processes.

On a random-weight GPT-2 (KoGPT2-base size unless --small), batch-1 greedy, EOS off:
- streamed: generate with a streamer against the same call without; the first new token's arrival time
  against the whole non-streamed call;
- no compile: after one warm-up call, prompts of many lengths (across the old 32-token buckets) and new
  max_new_tokens in the same capacity tier: tf.function traces during them, and each call's time against a
  second identical call;
- tiers: seconds per decode step at each capacity tier (what attention over unused capacity costs), batch 1 and 8;
- fresh processes: wall time of a process that imports tfgen and loads the model, against one that also
  generates (--new-tokens tokens), with an empty and then a warm compile cache (TFGEN_COMPILE_CACHE).

The speed comparison with transformers (batch-1 greedy, batch-8 sampling) is benchmarks/generate_speed.py.

    python benchmarks/decode_state.py            # KoGPT2-base size
    python benchmarks/decode_state.py --small    # smoke run
    python benchmarks/decode_state.py --parts fresh_processes
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TFGEN_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="decode_state-parent-cache-")  # not the user's cache

import numpy as np  # noqa: E402

from _harness import command_line, format_table, gpt2_config, machine_info, print_machine, results_path, write_results  # noqa: E402
from generate_speed import build_checkpoint, make_prompts  # noqa: E402

PROMPT_LENGTH = 16
# (prompt length, max_new_tokens) after warm-up, all within the 128-column tier.
UNSEEN_CALLS = [(5, 10), (31, 40), (33, 20), (50, 27), (64, 64), (70, 5), (100, 3)]
TIER_STEPS = 32
# Runs in a fresh process: imports tfgen, loads the model, optionally generates; prints its own timings.
FRESH = """
import json, sys, time
start = time.perf_counter()
import numpy as np
from tfgen import GPT2LM
imported = time.perf_counter()
lm = GPT2LM.from_pretrained(sys.argv[1])
loaded = time.perf_counter()
new_tokens = int(sys.argv[2])
if new_tokens:
    prompt = np.random.default_rng(0).integers(4, lm.config.vocab_size, size=(1, int(sys.argv[3])), dtype=np.int32)
    lm.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None)
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported,
                  "generate_s": time.perf_counter() - loaded}))
"""


class _FirstTokenClock:
    """A streamer that notes when the first new tokens arrive (the first put is the prompt)."""

    def __init__(self, start):
        self.start, self.puts, self.first_token_s = start, 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first_token_s = time.perf_counter() - self.start

    def end(self):
        pass


def measure_streaming(lm, prompts, new_tokens, repeats):
    settings = dict(max_new_tokens=new_tokens, eos_token_id=None)
    plain = lm.generate(prompts, **settings).numpy()  # warm-up (compiles)
    plain_times, stream_times, first_token = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        lm.generate(prompts, **settings)
        plain_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        clock = _FirstTokenClock(start)
        streamed = lm.generate(prompts, streamer=clock, **settings).numpy()
        stream_times.append(time.perf_counter() - start)
        first_token.append(clock.first_token_s)
    plain_s, stream_s = statistics.median(plain_times), statistics.median(stream_times)
    return {
        "new_tokens": new_tokens,
        "plain_s": plain_s,
        "streamed_s": stream_s,
        "streamed_over_plain": stream_s / plain_s,
        "first_token_s": statistics.median(first_token),
        "first_token_share": statistics.median(first_token) / plain_s,
        "same_tokens": bool(np.array_equal(plain, streamed)),
    }


def measure_no_compile(lm, vocab_size):
    lm.generate(make_prompts(1, PROMPT_LENGTH, vocab_size), max_new_tokens=8, eos_token_id=None)  # warm-up
    rows = []
    for length, new in UNSEEN_CALLS:
        prompts = make_prompts(1, length, vocab_size)
        traces = lm.decoder.trace_count
        start = time.perf_counter()
        lm.generate(prompts, max_new_tokens=new, eos_token_id=None)
        first_s = time.perf_counter() - start
        added = lm.decoder.trace_count - traces
        start = time.perf_counter()
        lm.generate(prompts, max_new_tokens=new, eos_token_id=None)
        rows.append(
            {
                "prompt": length,
                "new_tokens": new,
                "traces": added,
                "first_s": first_s,
                "second_s": time.perf_counter() - start,
            }
        )
    return rows


def measure_tiers(lm, vocab_size, batches):
    """Seconds per step of the greedy advance program at each tier, from a PROMPT_LENGTH prompt."""
    import tensorflow as tf

    from tfgen.generation.decode import TIERS, settings_tensors
    from tfgen.generation.options import resolve_options

    options = resolve_options(PROMPT_LENGTH, max_new_tokens=TIER_STEPS, eos_token_id=None, pad_token_id=0)
    rows = []
    for batch in batches:
        prompts = make_prompts(batch, PROMPT_LENGTH, vocab_size)
        lengths = np.full(batch, PROMPT_LENGTH, np.int32)
        for tier in [t for t in TIERS if t <= lm.config.n_positions]:
            programs = lm.decoder.programs(batch, tier, 0)
            advance = programs.advance("greedy")
            times = []
            for _ in range(3):  # the first compiles
                programs.state.start(prompts, lengths, lengths + TIER_STEPS)
                programs.prefill_columns(PROMPT_LENGTH, np.ones(batch, bool))
                start = time.perf_counter()
                advance(tf.constant(TIER_STEPS), settings_tensors(options))
                programs.state.value("lengths")
                times.append((time.perf_counter() - start) / TIER_STEPS)
            rows.append({"batch": batch, "capacity": tier, "step_ms": 1000 * min(times[1:])})
    return rows


def fresh_process(model_dir, cache, new_tokens):
    """One fresh process's timings, with the number of compile-cache entries it found and left (a warm
    process that adds entries compiled something: a miss)."""
    env = {**os.environ, "TFGEN_COMPILE_CACHE": str(cache)}
    env.pop("TF_XLA_FLAGS", None)  # this process's tfgen import set it to its own cache, which would win
    before = cache_entries(cache)
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", FRESH, str(model_dir), str(new_tokens), str(PROMPT_LENGTH)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall_s = time.perf_counter() - start
    return {
        "wall_s": wall_s,
        **json.loads(run.stdout.strip().splitlines()[-1]),
        "entries_before": before,
        "entries_after": cache_entries(cache),
    }


def cache_entries(cache):
    return sum(1 for path in Path(cache).rglob("*") if path.is_file())


def measure_fresh_processes(model_dir, new_tokens, scratch, repeats):
    """An empty-cache process first, then import + load and warm-cache processes taken in turns (the machine's
    load moves both alike)."""
    cache = Path(scratch) / "fresh-cache"
    rows = [{"process": "+ generate, empty cache", **fresh_process(model_dir, cache, new_tokens)}]
    for _ in range(repeats):
        rows.append({"process": "import + load", **fresh_process(model_dir, cache, 0)})
        rows.append({"process": "+ generate, warm cache", **fresh_process(model_dir, cache, new_tokens)})
    return rows


def fresh_ratio(rows):
    """The fastest warm-cache process's wall time over the fastest import + load process's."""

    def fastest(process):
        return min(row["wall_s"] for row in rows if row["process"] == process)

    return fastest("+ generate, warm cache") / fastest("import + load")


PARTS = ("streaming", "no_compile", "tiers", "fresh_processes")


def run(args):
    command, info = command_line(), machine_info()
    results = {}
    with tempfile.TemporaryDirectory(prefix="decode_state-") as scratch:
        model_dir = Path(scratch) / "model"
        config = gpt2_config(args.small)
        model = build_checkpoint("gpt2", args.small, model_dir)
        if "fresh_processes" in args.parts:
            results["fresh_processes"] = measure_fresh_processes(model_dir, args.new_tokens, scratch, args.repeats)
        if set(args.parts) - {"fresh_processes"}:
            from tfgen import GPT2LM

            lm = GPT2LM.from_pretrained(model_dir)
            if "streaming" in args.parts:
                prompts = make_prompts(1, PROMPT_LENGTH, config.vocab_size)
                results["streaming"] = measure_streaming(lm, prompts, args.new_tokens, args.repeats)
            if "no_compile" in args.parts:
                results["no_compile"] = measure_no_compile(lm, config.vocab_size)
            if "tiers" in args.parts:
                results["tiers"] = measure_tiers(lm, config.vocab_size, [1, 8])
    print_machine(info, command)
    print(
        f"model: GPT-2 random weights, fp32, {model['n_layer']} layers x {model['n_embd']} wide, vocab "
        f"{model['vocab_size']}; batch 1 greedy, prompt {PROMPT_LENGTH} tokens, EOS off"
    )
    if "streaming" in results:
        print(
            "\n"
            + format_table(
                [results["streaming"]],
                [
                    ("new tokens", "new_tokens", "{}"),
                    ("not streamed s", "plain_s", "{:.3f}"),
                    ("streamed s", "streamed_s", "{:.3f}"),
                    ("streamed/not", "streamed_over_plain", "{:.3f}"),
                    ("first token s", "first_token_s", "{:.3f}"),
                    ("first token / not streamed", "first_token_share", "{:.3f}"),
                    ("same tokens", "same_tokens", "{}"),
                ],
            )
        )
    if "no_compile" in results:
        print("\nafter one warm-up call (prompt 16, 8 new), unseen prompt lengths and max_new_tokens:")
        print(
            format_table(
                results["no_compile"],
                [
                    ("prompt", "prompt", "{}"),
                    ("new tokens", "new_tokens", "{}"),
                    ("traces", "traces", "{}"),
                    ("first call s", "first_s", "{:.3f}"),
                    ("second call s", "second_s", "{:.3f}"),
                ],
            )
        )
    if "tiers" in results:
        print(f"\ngreedy decode step by capacity tier ({TIER_STEPS} steps, best of 2 after the compiling call):")
        print(
            format_table(
                results["tiers"],
                [("batch", "batch", "{}"), ("capacity", "capacity", "{}"), ("ms/step", "step_ms", "{:.2f}")],
            )
        )
    if "fresh_processes" in results:
        fresh = results["fresh_processes"]
        print(f"\nfresh processes (wall time of the whole process; generate: {args.new_tokens} new tokens):")
        print(
            format_table(
                fresh,
                [
                    ("process", "process", "{}"),
                    ("wall s", "wall_s", "{:.2f}"),
                    ("import s", "import_s", "{:.2f}"),
                    ("load s", "load_s", "{:.2f}"),
                    ("generate s", "generate_s", "{:.2f}"),
                    ("cache entries before", "entries_before", "{}"),
                    ("after", "entries_after", "{}"),
                ],
            )
        )
        results["fresh_ratio"] = fresh_ratio(fresh)
        print(f"fastest warm-cache process / fastest import + load process: {results['fresh_ratio']:.2f}")
    name = "decode_state" if set(args.parts) == set(PARTS) else "decode_state-" + "-".join(args.parts)
    write_results(
        results_path(name, args.small, args.json), {"machine": info, "command": command, "model": model, **results}
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="tiny model (2 layers, 64 wide, vocab 1000): a smoke run")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="what to measure (default: all; a subset writes decode_state-PARTS.json)",
    )
    parser.add_argument("--json", type=Path, help="results file (default: benchmarks/results/decode_state.json)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
