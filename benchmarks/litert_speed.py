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
import functools
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from ko_mini import SOURCES, _validation_documents, token_stream  # noqa: E402  (imports tfgen first)

# isort: split

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from _harness import (  # noqa: E402
    command_line,
    format_table,
    gpt2_config,
    machine_info,
    print_machine,
    results_path,
    seconds,
    write_results,
)
from generate_speed import make_prompts, measure_bandwidth  # noqa: E402
from tfgen import GPT2LM, export_litert  # noqa: E402
from tfgen.export.litert import DEFAULT_CAPACITY, QUANTIZATIONS  # noqa: E402
from tfgen.litert import LiteRTLM, read_config  # noqa: E402

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


def export_bytes(path):
    """Bytes of an export's model files (its parts)."""
    return sum((path / part["file"]).stat().st_size for part in read_config(path)["parts"])


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


class Timed:
    """A signature runner (or method) that adds its call time to `totals[name]`."""

    def __init__(self, call, name, totals):
        self.call, self.name, self.totals = call, name, totals

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.call(*args, **kwargs)
        self.totals[self.name] = self.totals.get(self.name, 0.0) + time.perf_counter() - start
        return out

    def __getattr__(self, name):
        return getattr(self.call, name)


def step_breakdown(runtime, prompts, settings):
    """Milliseconds per decode step (a token of every row) in the decode and next_token invokes, in writing the new
    cache columns, and the rest (Python), over one warm generate call."""
    totals = {}
    runtime._rows = None
    runtime.generate(prompts, eos_token_id=None, max_new_tokens=1)  # builds the rows
    rows = runtime._rows
    rows._decoders = {tier: Timed(decoder, "decode", totals) for tier, decoder in rows._decoders.items()}
    rows._choosers = {tier: Timed(chooser, "next_token", totals) for tier, chooser in rows._choosers.items()}
    rows._prefill = Timed(rows._prefill, "prefill", totals)
    rows._decode = Timed(rows._decode, "decode_method", totals)
    totals.clear()
    start = time.perf_counter()
    runtime.generate(prompts, eos_token_id=None, **settings)
    total = time.perf_counter() - start
    runtime._rows = None
    steps = settings["max_new_tokens"]
    invokes = totals["decode"] + totals["next_token"] + totals["prefill"]
    return {
        "decode_invoke_ms": 1000 * totals["decode"] / steps,
        "next_token_invoke_ms": 1000 * totals["next_token"] / steps,
        "prefill_ms": 1000 * totals["prefill"],
        "cache_write_ms": 1000 * (totals["decode_method"] - totals["decode"]) / steps,
        "python_ms": 1000 * (total - invokes - (totals["decode_method"] - totals["decode"])) / steps,
    }


def litert_row(lm, path, quantize, capacity, prompts, settings, repeats):
    """Exports `lm` to `path`, loads it and measures it: the row of one export in speed()'s table."""
    convert_s = seconds(lambda: export_litert(lm, path, quantize=quantize, capacity=capacity))
    start = time.perf_counter()
    runtime = LiteRTLM(path)
    load_s = time.perf_counter() - start
    first_s = seconds(lambda: runtime.generate(prompts, max_new_tokens=1))

    def generate(ids, s):
        return runtime.generate(ids, eos_token_id=None, **s)

    row = {
        "name": f"LiteRT {quantize}, capacity {capacity}",
        "size_mb": export_bytes(path) / 1e6,
        "conversion_s": convert_s,
        "load_s": load_s,
        "first_token_s": first_s,
        **warm_speed(generate, prompts, settings, repeats),
        **step_breakdown(runtime, prompts, settings),
    }
    row["token_ms"] = 1000 / row["tokens_per_s"]
    return row


def speed(args, work):
    config = gpt2_config(args.small)
    tf.keras.utils.set_random_seed(0)
    lm = GPT2LM(config)
    prompts = make_prompts(1, args.prompt_length, config.vocab_size)
    n = args.new_tokens
    settings = {"max_new_tokens": n, "min_new_tokens": n}
    capacity = args.prompt_length + n
    rows = [
        {
            "name": "tfgen fp32 (XLA)",
            **warm_speed(
                lambda ids, s: lm.generate(ids, eos_token_id=None, **s).numpy(), prompts, settings, args.repeats
            ),
        }
    ]
    # Each export at the smallest capacity the request needs, and int8 at the default capacity: a decode step
    # reads the whole cache.
    exports = [(quantize, capacity) for quantize in args.quantize] + [
        ("int8", DEFAULT_CAPACITY)
    ] * args.default_capacity
    for quantize, export_capacity in exports:
        path = work / f"base-{quantize}-{export_capacity}"
        rows.append(litert_row(lm, path, quantize, export_capacity, prompts, settings, args.repeats))
    reference = rows[0]["sequences"]
    for row in rows:
        row["vs_tfgen"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["greedy_equal_to_tfgen"] = row.pop("sequences") == reference
    bandwidth = measure_bandwidth()
    weight_bytes = int8_bytes_per_token(lm)
    bound = {
        "int8_weight_bytes_per_token": weight_bytes,
        "numpy_read_gb_s": bandwidth["read_gb_s"],
        "all_threads_read_gb_s": bandwidth["all_threads_read_gb_s"],
        "int8_bound_tokens_per_s": max(bandwidth["read_gb_s"], bandwidth["all_threads_read_gb_s"]) * 1e9 / weight_bytes,
    }
    return {"capacity": capacity, "rows": rows, "bound": bound}


def batch_speed(args, work):
    """The batched runtime at --batch rows: tokens/s of batch-1 greedy and of --batch sampled rows (top-k 50, top-p
    0.95) decoded together and one after another, the step breakdown, and the export's size against a 1-row export."""
    config = gpt2_config(args.small)
    tf.keras.utils.set_random_seed(0)
    lm = GPT2LM(config)
    n, capacity = args.new_tokens, args.batch_prompt_length + args.new_tokens
    prompts = make_prompts(args.batch, args.batch_prompt_length, config.vocab_size)
    sizes, convert = {}, {}
    for rows in (1, args.batch):
        path = work / f"batch-int8-{rows}"
        convert[rows] = seconds(
            functools.partial(export_litert, lm, path, quantize="int8", capacity=capacity, rows=rows)
        )
        sizes[rows] = export_bytes(path) / 1e6
    runtime = LiteRTLM(path)
    greedy = {"max_new_tokens": n, "min_new_tokens": n}
    sampled = {**greedy, "do_sample": True, "top_k": 50, "top_p": 0.95, "seed": 0}

    def together(ids, s):
        return runtime.generate(ids, eos_token_id=None, **s)

    def one_by_one(ids, s):
        return np.concatenate([runtime.generate(row[None], eos_token_id=None, **s) for row in ids])

    cases = [
        ("batch 1 greedy", together, prompts[:1], greedy),
        (f"batch {args.batch} top-k/top-p, one by one", one_by_one, prompts, sampled),
        (f"batch {args.batch} top-k/top-p, together", together, prompts, sampled),
        (f"batch {args.batch} greedy, together", together, prompts, greedy),
    ]
    out = []
    for name, generate, ids, settings in cases:
        row = {"name": name, **warm_speed(generate, ids, settings, args.repeats)}
        row["tokens_per_s"] *= len(ids)
        row.pop("sequences")
        if generate is together:
            row.update(step_breakdown(runtime, ids, settings))
        out.append(row)
        print(row, flush=True)
    return {
        "prompt_length": args.batch_prompt_length,
        "new_tokens": n,
        "capacity": capacity,
        "rows": out,
        "size_mb": sizes,
        "conversion_s": convert,
    }


def window_nats(runtime, ids, context):
    """As ko_mini.stream_nats: windows of `context` tokens sharing one token, each token predicted once."""
    total = 0.0
    for start in range(0, len(ids) - 1, context - 1):
        piece = ids[start : start + context]
        logprobs = runtime.next_token_logprobs(piece.tolist(), 0)
        total -= float(logprobs[np.arange(len(piece) - 1), piece[1:]].sum())
    return total


def agreement(reference, runtime, tokenizer, documents):
    """Greedy agreement of `runtime` with `reference` over AGREEMENT_NEW_TOKENS from the first documents' openings:
    how many continuations are equal, and the mean length of their agreeing prefix."""
    equal, prefix = 0, []
    for document in documents[:AGREEMENT_PROMPTS]:
        prompt = tokenizer.encode(document)[:AGREEMENT_PROMPT_TOKENS]
        a, b = (
            r.generate([prompt], max_new_tokens=AGREEMENT_NEW_TOKENS, min_new_tokens=AGREEMENT_NEW_TOKENS)[
                0, len(prompt) :
            ]
            for r in (reference, runtime)
        )
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
        ids = token_stream(lm.tokenizer, documents)[: args.quality_tokens + 1]
        row = {"source": name, "tokens": len(ids) - 1}
        for quantize, runtime in runtimes.items():
            row[f"ppl_{quantize}"] = math.exp(window_nats(runtime, ids, context) / (len(ids) - 1))
        for quantize in QUANTIZED:
            row[f"change_pct_{quantize}"] = 100 * (row[f"ppl_{quantize}"] / row["ppl_none"] - 1)
            row[f"greedy_agree_{quantize}"], row[f"mean_agreeing_prefix_{quantize}"] = agreement(
                runtimes["none"], runtimes[quantize], lm.tokenizer, documents
            )
        rows.append(row)
        print(row, flush=True)
    return rows


def report(info, command, speed_figures, quality_rows, batch_figures=None):
    print_machine(info, command)
    if batch_figures:
        print(
            f"\nbatched runtime, int8, {batch_figures['prompt_length']}-token prompts, {batch_figures['new_tokens']} "
            f"new tokens, EOS off; export size by rows {batch_figures['size_mb']} MB, conversion "
            f"{batch_figures['conversion_s']} s:"
        )
        print(
            format_table(
                batch_figures["rows"],
                [
                    ("", "name", "{}"),
                    ("tokens/s", "tokens_per_s", "{:.1f}"),
                    ("decode ms/step", "decode_invoke_ms", "{:.2f}"),
                    ("next_token ms/step", "next_token_invoke_ms", "{:.2f}"),
                    ("cache write ms/step", "cache_write_ms", "{:.3f}"),
                    ("python ms/step", "python_ms", "{:.2f}"),
                    ("prefill ms", "prefill_ms", "{:.1f}"),
                ],
            )
        )
    if speed_figures:
        print(f"\nbatch-1 greedy, {speed_figures['capacity']} tokens (prompt + new):")
        print(
            format_table(
                speed_figures["rows"],
                [
                    ("", "name", "{}"),
                    ("greedy = tfgen", "greedy_equal_to_tfgen", "{}"),
                    ("tokens/s", "tokens_per_s", "{:.1f}"),
                    ("x tfgen", "vs_tfgen", "{:.2f}"),
                    ("ms/token", "token_ms", "{:.2f}"),
                    ("decode ms", "decode_invoke_ms", "{:.2f}"),
                    ("next_token ms", "next_token_invoke_ms", "{:.2f}"),
                    ("cache write ms", "cache_write_ms", "{:.3f}"),
                    ("python ms", "python_ms", "{:.2f}"),
                    ("size MB", "size_mb", "{:.1f}"),
                    ("convert s", "conversion_s", "{:.1f}"),
                    ("load s", "load_s", "{:.2f}"),
                    ("first token s", "first_token_s", "{:.3f}"),
                ],
            )
        )
        bound = speed_figures["bound"]
        print(
            f"int8 bound: {bound['int8_weight_bytes_per_token'] / 1e6:.1f} MB of weights per token at "
            f"{max(bound['numpy_read_gb_s'], bound['all_threads_read_gb_s']):.1f} GB/s: "
            f"{bound['int8_bound_tokens_per_s']:.0f} tokens/s"
        )
    if quality_rows:
        print(
            "\nko-mini validation perplexity (LiteRT fp32, int8 and int4 exports), greedy agreement with fp32 over "
            f"{AGREEMENT_NEW_TOKENS} tokens:"
        )
        print(
            format_table(
                quality_rows,
                [("source", "source", "{}"), ("tokens", "tokens", "{:,}"), ("ppl fp32", "ppl_none", "{:.3f}")]
                + [
                    column
                    for q in QUANTIZED
                    for column in (
                        (f"ppl {q}", f"ppl_{q}", "{:.3f}"),
                        (f"change % {q}", f"change_pct_{q}", "{:+.2f}"),
                        (f"greedy equal {q}", f"greedy_agree_{q}", "{}"),
                        (f"agreeing prefix {q}", f"mean_agreeing_prefix_{q}", "{:.1f}"),
                    )
                ],
            )
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny model for a smoke run")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "runs" / "ko-mini",
        help="the recipe's work directory (its corpus/*.valid.txt are scored)",
    )
    parser.add_argument(
        "--quality-tokens",
        type=int,
        default=16384,
        help="perplexity over the first this many tokens of each source's validation text",
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        choices=QUANTIZATIONS,
        default=list(QUANTIZATIONS),
        help="the exports timed, in this order",
    )
    parser.add_argument(
        "--no-default-capacity",
        dest="default_capacity",
        action="store_false",
        help="leave out the int8 export at the default capacity",
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="only the batched runtime at this many rows (against one by one), batch_speed's figures",
    )
    parser.add_argument("--batch-prompt-length", type=int, default=12)
    parser.add_argument(
        "--json",
        type=Path,
        help="results file (default: benchmarks/results/litert_speed.json, litert_quality.json with --skip-speed)",
    )
    args = parser.parse_args()
    if args.batch:
        info, command = machine_info(), command_line()
        with tempfile.TemporaryDirectory() as work:
            figures = batch_speed(args, Path(work))
        report(info, command, None, None, figures)
        write_results(results_path("litert_batch", args.small), {"machine": info, "command": command, "batch": figures})
        return
    if not args.skip_quality and not (args.work / "corpus" / "wikipedia.valid.txt").is_file():
        sys.exit(f"no validation text in {args.work / 'corpus'}; run: python recipes/ko_mini.py prepare")
    info, command = machine_info(), command_line()
    with tempfile.TemporaryDirectory() as work:
        speed_figures = None if args.skip_speed else speed(args, Path(work))
        quality_rows = None if args.skip_quality else quality(args, Path(work))
    report(info, command, speed_figures, quality_rows)
    name = "litert_quality" if args.skip_speed else "litert_speed"
    write_results(
        results_path(name, args.small, args.json),
        {"machine": info, "command": command, "speed": speed_figures, "quality": quality_rows},
    )


if __name__ == "__main__":
    main()
