"""The LiteRT export against tfgen's XLA decoding: speed at KoGPT2-base size, and what int8 costs ko-mini in quality.

Speed (random weights, KoGPT2-base's shape; --small: a tiny one): batch-1
greedy decoding of --new-tokens after a --prompt-length prompt, tokens/s
(median of --repeats warm calls) of GPT2LM.generate (float32, XLA) and of
LiteRTLM.generate on int8, int4, fp16 and fp32 exports of the same weights, each
with its export size, conversion time, load time and first-token latency
(a first call with max_new_tokens=1); for each export, where a token's time
goes (the decode and next_token invokes, writing the new keys and values into
the runtime's cache, the rest being Python); the int8
weights' bandwidth bound (their bytes per token against numpy's one-thread
read bandwidth).

Quality (ko-mini, int8 and int4 against fp32 exports): perplexity on the first
--quality-tokens tokens of each source's validation text (recipes/ko_mini.py's
split: run its prepare stage first),
scored with the exports' `score` signature over windows of the context as
the recipe scores it; greedy agreement over 32 new tokens from prompts cut
from validation documents.

    python benchmarks/litert_speed.py [--small] [--work runs/ko-mini] [--skip-quality] [--quantize int8 int4]
"""

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from ko_mini import SOURCES, _validation_documents, token_stream  # noqa: E402  (imports tfgen first)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from generate_speed import make_prompts, measure_bandwidth  # noqa: E402

from _harness import (command_line, format_table, gpt2_config, machine_info, print_machine, results_path,  # noqa: E402
                      seconds, write_results)
from tfgen import GPT2LM, export_litert  # noqa: E402
from tfgen.export.litert import DEFAULT_CAPACITY, QUANTIZATIONS  # noqa: E402
from tfgen.litert import MODEL_FILE, LiteRTLM  # noqa: E402

QUANTIZED = ("int8", "int4")  # each against fp32 in the quality part
AGREEMENT_PROMPTS = 10  # per source
AGREEMENT_PROMPT_TOKENS = 16
AGREEMENT_NEW_TOKENS = 32


def int8_bytes_per_token(lm):
    """Bytes of weights a batch-1 step reads at int8: every matrix (the LM head is the token embedding) at one
    byte per entry, vectors (biases, LayerNorm) at four; the position table is read one row at a time, so it is left out."""
    total = 0
    for weight in lm.gpt2.weights:
        if "wpe" in weight.name:
            continue
        size = weight.shape.num_elements()
        total += size if len([d for d in weight.shape if d > 1]) == 2 else 4 * size
    return total


def timed_generate(generate, prompts, settings):
    start = time.perf_counter()
    out = generate(prompts, settings)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + settings["max_new_tokens"], out.shape
    return elapsed, out


def warm_speed(generate, prompts, settings, repeats):
    timed_generate(generate, prompts, settings)  # warm-up (compiles the XLA program)
    times, out = zip(*(timed_generate(generate, prompts, settings) for _ in range(repeats)))
    return {"tokens_per_s": settings["max_new_tokens"] / statistics.median(times), "sequences": out[0].tolist()}


def step_breakdown(runtime, prompts, steps):
    """Milliseconds per token in the decode and next_token invokes and in writing the new cache column, timed one by
    one over `steps` greedy steps."""
    runners = runtime._run
    ids = prompts[0]
    sequence = np.zeros([1, runtime.capacity], np.int32)
    sequence[0, :len(ids)] = ids
    settings = {"do_sample": np.array(False), "temperature": np.array(1.0, np.float32), "top_k": np.array(0, np.int32),
                "top_p": np.array(1.0, np.float32), "repetition_penalty": np.array(1.0, np.float32),
                "no_repeat_ngram_size": np.array(0, np.int32), "min_new_steps": np.array(0, np.int32),
                "eos_ids": np.zeros([0], np.int32), "uniform": np.zeros([1, 1], np.float32)}
    logits = runtime._cached(runners["prefill"](input_ids=ids[None]), 0)
    decode_s = choose_s = write_s = 0.0
    for step in range(steps):
        length = len(ids) + step
        start = time.perf_counter()
        token = runners["next_token"](logits=logits, sequence=sequence, length=np.array(length, np.int32),
                                      step=np.array(step, np.int32), **settings)["token"]
        choose_s += time.perf_counter() - start
        sequence[0, length] = token[0]
        start = time.perf_counter()
        out = runners["decode"](token=token[None].astype(np.int32), position=np.array(length, np.int32),
                                **runtime._cache_inputs)
        decode_s += time.perf_counter() - start
        start = time.perf_counter()
        logits = runtime._cached(out, length)
        write_s += time.perf_counter() - start
    return {"decode_invoke_ms": 1000 * decode_s / steps, "next_token_invoke_ms": 1000 * choose_s / steps,
            "cache_write_ms": 1000 * write_s / steps}


def speed(args, work):
    config = gpt2_config(args.small)
    tf.keras.utils.set_random_seed(0)
    lm = GPT2LM(config)
    prompts = make_prompts(1, args.prompt_length, config.vocab_size)
    n = args.new_tokens
    settings = {"max_new_tokens": n, "min_new_tokens": n}
    capacity = args.prompt_length + n
    rows = [{"name": "tfgen fp32 (XLA)", **warm_speed(
        lambda ids, s: lm.generate(ids, eos_token_id=None, **s).numpy(), prompts, settings, args.repeats)}]
    # Each export at the smallest capacity the request needs, and int8 at the default capacity: a decode step
    # reads the whole cache.
    exports = [(quantize, capacity) for quantize in args.quantize] + [("int8", DEFAULT_CAPACITY)] * args.default_capacity
    for quantize, export_capacity in exports:
        path = work / f"base-{quantize}-{export_capacity}"
        convert_s = seconds(lambda: export_litert(lm, path, quantize=quantize, capacity=export_capacity))
        start = time.perf_counter()
        runtime = LiteRTLM(path)
        load_s = time.perf_counter() - start
        first_s = seconds(lambda: runtime.generate(prompts, max_new_tokens=1))

        def generate(ids, s):
            return runtime.generate(ids, eos_token_id=None, **s)

        row = {"name": f"LiteRT {quantize}, capacity {export_capacity}", "size_mb": (path / MODEL_FILE).stat().st_size / 1e6,
               "conversion_s": convert_s, "load_s": load_s, "first_token_s": first_s,
               **warm_speed(generate, prompts, settings, args.repeats), **step_breakdown(runtime, prompts, n)}
        row["token_ms"] = 1000 / row["tokens_per_s"]
        row["python_ms"] = (row["token_ms"] - row["decode_invoke_ms"] - row["next_token_invoke_ms"]
                            - row["cache_write_ms"])
        rows.append(row)
        del runtime
    reference = rows[0]["sequences"]
    for row in rows:
        row["vs_tfgen"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["greedy_equal_to_tfgen"] = row.pop("sequences") == reference
    bandwidth = measure_bandwidth()
    weight_bytes = int8_bytes_per_token(lm)
    bound = {"int8_weight_bytes_per_token": weight_bytes, "numpy_read_gb_s": bandwidth["read_gb_s"],
             "all_threads_read_gb_s": bandwidth["all_threads_read_gb_s"],
             "int8_bound_tokens_per_s": max(bandwidth["read_gb_s"], bandwidth["all_threads_read_gb_s"]) * 1e9 / weight_bytes}
    return {"capacity": capacity, "rows": rows, "bound": bound}


def window_nats(runtime, ids, context):
    """As ko_mini.stream_nats: windows of `context` tokens sharing one token, each token predicted once."""
    total = 0.0
    for start in range(0, len(ids) - 1, context - 1):
        piece = ids[start:start + context]
        total -= float(runtime._run["score"](input_ids=piece[None].astype(np.int32))["token_logprobs"].sum())
    return total


def agreement(reference, runtime, tokenizer, documents):
    """Greedy agreement of `runtime` with `reference` over AGREEMENT_NEW_TOKENS from the first documents' openings:
    how many continuations are equal, and the mean length of their agreeing prefix."""
    equal, prefix = 0, []
    for document in documents[:AGREEMENT_PROMPTS]:
        prompt = tokenizer.encode(document)[:AGREEMENT_PROMPT_TOKENS]
        a, b = (r.generate([prompt], max_new_tokens=AGREEMENT_NEW_TOKENS, min_new_tokens=AGREEMENT_NEW_TOKENS)[0, len(prompt):]
                for r in (reference, runtime))
        same = a == b
        equal += bool(same.all())
        prefix.append(AGREEMENT_NEW_TOKENS if same.all() else int(np.argmin(same)))
    return f"{equal}/{min(AGREEMENT_PROMPTS, len(documents))}", statistics.mean(prefix)


def quality(args, work):
    lm = GPT2LM.from_pretrained("ko-mini")
    runtimes = {}
    for quantize in ("none", *QUANTIZED):
        export_litert(lm, work / f"ko-mini-{quantize}", quantize=quantize)
        runtimes[quantize] = LiteRTLM(work / f"ko-mini-{quantize}")
    context = lm.config.n_positions
    rows = []
    for name in SOURCES:
        documents = _validation_documents(args.work, name)
        ids = token_stream(lm.tokenizer, documents)[:args.quality_tokens + 1]
        row = {"source": name, "tokens": len(ids) - 1}
        for quantize, runtime in runtimes.items():
            row[f"ppl_{quantize}"] = math.exp(window_nats(runtime, ids, context) / (len(ids) - 1))
        for quantize in QUANTIZED:
            row[f"change_pct_{quantize}"] = 100 * (row[f"ppl_{quantize}"] / row["ppl_none"] - 1)
            row[f"greedy_agree_{quantize}"], row[f"mean_agreeing_prefix_{quantize}"] = agreement(
                runtimes["none"], runtimes[quantize], lm.tokenizer, documents)
        rows.append(row)
        print(row, flush=True)
    return rows


def report(info, command, speed_figures, quality_rows):
    print_machine(info, command)
    if speed_figures:
        print(f"\nbatch-1 greedy, {speed_figures['capacity']} tokens (prompt + new):")
        print(format_table(speed_figures["rows"], [
            ("", "name", "{}"), ("greedy = tfgen", "greedy_equal_to_tfgen", "{}"), ("tokens/s", "tokens_per_s", "{:.1f}"),
            ("x tfgen", "vs_tfgen", "{:.2f}"), ("ms/token", "token_ms", "{:.2f}"),
            ("decode ms", "decode_invoke_ms", "{:.2f}"), ("next_token ms", "next_token_invoke_ms", "{:.2f}"),
            ("cache write ms", "cache_write_ms", "{:.3f}"),
            ("python ms", "python_ms", "{:.2f}"), ("size MB", "size_mb", "{:.1f}"), ("convert s", "conversion_s", "{:.1f}"),
            ("load s", "load_s", "{:.2f}"), ("first token s", "first_token_s", "{:.3f}")]))
        bound = speed_figures["bound"]
        print(f"int8 bound: {bound['int8_weight_bytes_per_token'] / 1e6:.1f} MB of weights per token at "
              f"{max(bound['numpy_read_gb_s'], bound['all_threads_read_gb_s']):.1f} GB/s: "
              f"{bound['int8_bound_tokens_per_s']:.0f} tokens/s")
    if quality_rows:
        print("\nko-mini validation perplexity (LiteRT fp32, int8 and int4 exports), greedy agreement with fp32 over "
              f"{AGREEMENT_NEW_TOKENS} tokens:")
        print(format_table(quality_rows, [("source", "source", "{}"), ("tokens", "tokens", "{:,}"),
                                          ("ppl fp32", "ppl_none", "{:.3f}")] + [
            column for q in QUANTIZED for column in (
                (f"ppl {q}", f"ppl_{q}", "{:.3f}"), (f"change % {q}", f"change_pct_{q}", "{:+.2f}"),
                (f"greedy equal {q}", f"greedy_agree_{q}", "{}"),
                (f"agreeing prefix {q}", f"mean_agreeing_prefix_{q}", "{:.1f}"))]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny model for a smoke run")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ko-mini",
                        help="the recipe's work directory (its corpus/*.valid.txt are scored)")
    parser.add_argument("--quality-tokens", type=int, default=16384,
                        help="perplexity over the first this many tokens of each source's validation text")
    parser.add_argument("--quantize", nargs="+", choices=QUANTIZATIONS, default=list(QUANTIZATIONS),
                        help="the exports timed, in this order")
    parser.add_argument("--no-default-capacity", dest="default_capacity", action="store_false",
                        help="leave out the int8 export at the default capacity")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", type=Path, help="results file (default: benchmarks/results/litert_speed.json, "
                                                   "litert_quality.json with --skip-speed)")
    args = parser.parse_args()
    if not args.skip_quality and not (args.work / "corpus" / "wikipedia.valid.txt").is_file():
        sys.exit(f"no validation text in {args.work / 'corpus'}; run: python recipes/ko_mini.py prepare")
    info, command = machine_info(), command_line()
    with tempfile.TemporaryDirectory() as work:
        speed_figures = None if args.skip_speed else speed(args, Path(work))
        quality_rows = None if args.skip_quality else quality(args, Path(work))
    report(info, command, speed_figures, quality_rows)
    name = "litert_quality" if args.skip_speed else "litert_speed"
    write_results(results_path(name, args.small, args.json),
                  {"machine": info, "command": command, "speed": speed_figures, "quality": quality_rows})


if __name__ == "__main__":
    main()
