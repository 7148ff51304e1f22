"""Big GPT-J models through LiteRT against PyTorch bf16 and CTranslate2 int8, on one random fp16 checkpoint.

    python benchmarks/litert_big.py --shape 1b                     # GPT-J 16 x 2048, vocab 64512: 1.07 B parameters
    python benchmarks/litert_big.py --shape kogpt-6b --engines litert-int8 litert-int4 torch-bf16
    python benchmarks/litert_big.py --shape small                  # smoke run

Writes a sharded fp16 safetensors checkpoint of random weights (benchmarks/big_checkpoint.py's), then for each
engine, each step in a fresh process: the conversion (tfgen's LiteRT export, read from the checkpoint part by
part; CTranslate2's converter), with its time and its peak RSS minus the RSS before it (imports done) over the
checkpoint's bytes (the issue's bound: 1.5x); for LiteRT a first load (XNNPACK packs the weights into its weight
cache, which starts empty); then the load time (LiteRT: from the weight cache), the first token's latency (a 16-token prompt, one
new token), greedy tokens/s at batch 1 and batch 8 and the peak RSS while decoding. Also the machine's memory read
bandwidth (numpy, all cores) and, per engine, the fraction of it a batch-1 token reaches: bytes of the artifact
(its weights) per token over the bandwidth. Results: benchmarks/results/litert_big-SHAPE.json.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _harness import command_line, format_table, machine_info, peak_rss_mib, print_machine, results_path, write_results
from big_checkpoint import SHAPES, rss_mib, write_checkpoint
from generate_speed import load_torch
from peers import convert_ct2, load_ct2, load_litert

PROMPT_LENGTH = 16
ENGINES = ["litert-int8", "litert-int4", "torch-bf16", "ct2-int8"]


def convert_litert(quantize):
    def convert(model_dir, path, args):
        from tfgen import export_litert

        export_litert(model_dir, path, quantize=quantize, capacity=args.capacity, rows=args.rows)

    return convert


CONVERTERS = {
    "litert-int8": convert_litert("int8"),
    "litert-int4": convert_litert("int4"),
    # The checkpoint is float16: loaded as such, without a random initialisation first, it takes the least memory.
    "ct2-int8": functools.partial(convert_ct2, load_as_float16=True, low_cpu_mem_usage=True),
}


def load_torch_bf16(model_dir):
    generate, _ = load_torch(model_dir, "bfloat16")
    return lambda ids, settings: generate(ids, np.ones_like(ids), settings)[:, ids.shape[1] :]


LOADERS = {
    "litert-int8": lambda path: load_litert(path)[0],
    "litert-int4": lambda path: load_litert(path)[0],
    "ct2-int8": lambda path: load_ct2(path)[0],
    "torch-bf16": load_torch_bf16,
}


def artifact_bytes(path):
    path = Path(path)
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.is_dir() else 0


def read_bandwidth_gb_s(size=1 << 30, repeats=5):
    """GB/s of summing a float32 array, split over the usable cores (numpy releases the GIL), the best of `repeats`."""
    cores = len(os.sched_getaffinity(0))
    pieces = np.array_split(np.ones(size // 4, np.float32), cores)
    best = float("inf")
    for _ in range(repeats):
        threads = [threading.Thread(target=np.sum, args=(piece,)) for piece in pieces]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        best = min(best, time.perf_counter() - start)
    return size / best / 1e9


def convert_child(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.engine.startswith("litert"):
        from tfgen import _env

        _env.return_freed_memory()  # as `tfgen export` does
        import tfgen.export.litert  # noqa: F401  (TensorFlow and the converter imported: not the conversion)
    else:
        import ctranslate2  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    before = rss_mib()
    start = time.perf_counter()
    CONVERTERS[args.engine](args.child, Path(args.artifact), args)
    print(
        json.dumps({"convert_s": time.perf_counter() - start, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib()})
    )


def load_child(args):
    """A first load of a LiteRT export, which packs its weights into the XNNPACK weight cache."""
    start = time.perf_counter()
    LOADERS[args.engine](Path(args.artifact))
    print(json.dumps({"cold_load_s": time.perf_counter() - start}))


def measure_child(args):
    config = json.loads((Path(args.child) / "config.json").read_text())
    rng = np.random.default_rng(0)
    prompts = rng.integers(5, config["vocab_size"], size=(8, PROMPT_LENGTH)).astype(np.int32)
    start = time.perf_counter()
    generate = LOADERS[args.engine](Path(args.artifact) if args.artifact else Path(args.child))
    load_s = time.perf_counter() - start
    settings = {"do_sample": False, "pad_token_id": config["pad_token_id"]}

    def timed(batch, new_tokens):
        start = time.perf_counter()
        out = generate(prompts[:batch], {**settings, "max_new_tokens": new_tokens})
        assert out.shape == (batch, new_tokens), out.shape
        return time.perf_counter() - start, out

    timed(1, 2)  # warm-up: the first call prepares kernels
    first_token_s = statistics.median(timed(1, 1)[0] for _ in range(3))
    b1_s, b1 = timed(1, args.new_tokens)
    b8_s, _ = timed(8, args.new_tokens_b8)
    print(
        json.dumps(
            {
                "load_s": load_s,
                "first_token_s": first_token_s,
                "b1_tokens_per_s": args.new_tokens / b1_s,
                "b8_tokens_per_s": 8 * args.new_tokens_b8 / b8_s,
                "peak_rss_decode_mib": peak_rss_mib(),
                "b1_ids": b1[0].tolist(),
            }
        )
    )


def run_child(args, *flags):
    command = [
        sys.executable,
        __file__,
        "--capacity",
        str(args.capacity),
        "--rows",
        *map(str, args.rows),
        "--new-tokens",
        str(args.new_tokens),
        "--new-tokens-b8",
        str(args.new_tokens_b8),
        *flags,
    ]
    return json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1])


COLUMNS = [
    ("engine", "engine", "{}"),
    ("convert s", "convert_s", "{:.0f}"),
    ("convert peak / ckpt", "convert_peak_over_checkpoint", "{:.2f}"),
    ("size GB", "size_gb", "{:.2f}"),
    ("first load s", "cold_load_s", "{:.1f}"),
    ("load s", "load_s", "{:.1f}"),
    ("first token s", "first_token_s", "{:.2f}"),
    ("b1 tok/s", "b1_tokens_per_s", "{:.2f}"),
    ("b8 tok/s", "b8_tokens_per_s", "{:.2f}"),
    ("decode peak RSS MiB", "peak_rss_decode_mib", "{:.0f}"),
    ("b1 bandwidth use", "bandwidth_fraction", "{:.2f}"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=ENGINES)
    parser.add_argument("--capacity", type=int, default=128, help="the LiteRT export's capacity")
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8],
        help="the LiteRT export's row tiers (one tier, 8, converts a big model faster)",
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens of the batch-1 run")
    parser.add_argument("--new-tokens-b8", type=int, default=16, help="new tokens of the batch-8 run")
    parser.add_argument("--checkpoint", type=Path, help="reuse this checkpoint directory (one this script wrote)")
    parser.add_argument("--keep", type=Path, help="keep the converted models in this directory, and reuse those there")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    parser.add_argument("--convert", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return (convert_child if args.convert else load_child if args.load_only else measure_child)(args)
    info, command = machine_info(), command_line()
    bandwidth = read_bandwidth_gb_s()
    small = args.shape == "small"
    path = results_path("litert_big" if small else f"litert_big-{args.shape}", small, args.json)  # after each engine
    rows = []
    with tempfile.TemporaryDirectory(prefix="tfgen-litert-big-") as scratch:
        os.environ["TFGEN_COMPILE_CACHE"] = str(Path(scratch) / "cache")  # XNNPACK's weight cache starts empty
        checkpoint_dir = args.checkpoint or Path(scratch) / "checkpoint"
        if args.checkpoint:
            checkpoint_bytes = sum(file.stat().st_size for file in checkpoint_dir.iterdir())
        else:
            checkpoint_dir.mkdir()
            checkpoint_bytes = write_checkpoint(checkpoint_dir, "gptj", SHAPES[args.shape]["gptj"])
        print(f"checkpoint: {checkpoint_bytes / 2**30:.2f} GiB of fp16 shards", file=sys.stderr, flush=True)
        for engine in args.engines:
            row = {"engine": engine}
            artifact = (args.keep or Path(scratch)) / engine
            on_artifact = ["--engine", engine, "--child", str(checkpoint_dir), "--artifact", str(artifact)]
            if engine in CONVERTERS and not artifact.exists():
                converted = run_child(args, *on_artifact, "--convert")
                row.update(
                    convert_s=converted["convert_s"],
                    convert_peak_rss_mib=converted["peak_rss_mib"],
                    convert_peak_over_checkpoint=(converted["peak_rss_mib"] - converted["rss_before_mib"])
                    * 2**20
                    / checkpoint_bytes,
                )
            if engine.startswith("litert"):
                row.update(run_child(args, *on_artifact, "--load-only"))
            size = artifact_bytes(artifact) if engine in CONVERTERS else checkpoint_bytes
            row.update(size_gb=size / 1e9)
            row.update(run_child(args, *(on_artifact if engine in CONVERTERS else on_artifact[:4])))
            row["bandwidth_fraction"] = size * row["b1_tokens_per_s"] / 1e9 / bandwidth
            rows.append(row)
            print(format_table([row], COLUMNS), file=sys.stderr, flush=True)
            if not args.keep:
                subprocess.run(["rm", "-rf", str(artifact)], check=True)
            write_results(
                path,
                {
                    "machine": info,
                    "command": command,
                    "shape": SHAPES[args.shape]["gptj"],
                    "checkpoint_bytes": checkpoint_bytes,
                    "bandwidth_gb_s": bandwidth,
                    "capacity": args.capacity,
                    "row_tiers": args.rows,
                    "prompt_length": PROMPT_LENGTH,
                    "new_tokens": args.new_tokens,
                    "new_tokens_b8": args.new_tokens_b8,
                    "rows": rows,
                },
            )
    print_machine(info, command)
    print(
        f"GPT-J shape {args.shape}: random fp16 checkpoint of {checkpoint_bytes / 2**30:.2f} GiB; prompts of "
        f"{PROMPT_LENGTH} tokens, greedy; memory read bandwidth {bandwidth:.1f} GB/s (numpy, all cores)"
    )
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
