"""Loading a big checkpoint within memory: writes a sharded fp16 safetensors checkpoint of random weights (GPT-J or
GPT-2), then, in a fresh process per dtype, loads it with `CausalLM.from_pretrained(dtype=...)` and generates.

    python benchmarks/big_checkpoint.py --shape kogpt-6b      # GPT-J 28 x 4096, vocab 64512: 6.17 B parameters, 12.3 GB bf16
    python benchmarks/big_checkpoint.py --shape 1b --family gptj gpt2 --dtype bfloat16 float32   # 1.07 / 1.04 B
    python benchmarks/big_checkpoint.py --shape small --family gptj gpt2 --dtype bfloat16 float32   # smoke run

The bound checked: the peak RSS while loading (the kernel's VmHWM) minus the RSS before it (TensorFlow,
transformers' TF model classes and tfgen imported) is within 1.5x the weights' bytes in the target dtype. "kept" is
the RSS after loading minus the RSS before it (the weights and what loading leaves behind), "transient" the peak
minus the RSS after loading. After loading: a first generate call of 8 tokens (compiling included), then a timed
call of --new-tokens tokens (tokens/s); "decode extra" is the peak RSS over both calls minus the RSS after loading.
The checkpoint goes to a temporary directory (12.3 GB for kogpt-6b), deleted at the end. Results:
benchmarks/results/big_checkpoint-SHAPE.json.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _harness import (
    GPT2_1B_SHAPE,
    GPTJ_1B_SHAPE,
    GPTJ_SMALL_SHAPE,
    KOGPT_6B_SHAPE,
    SMALL_SHAPE,
    command_line,
    format_table,
    machine_info,
    model_config,
    peak_rss_mib,
    print_machine,
    results_path,
    write_results,
)

SHAPES = {  # shape -> family -> config fields
    "kogpt-6b": {"gptj": KOGPT_6B_SHAPE},
    "1b": {"gptj": GPTJ_1B_SHAPE, "gpt2": GPT2_1B_SHAPE},
    "small": {"gptj": GPTJ_SMALL_SHAPE, "gpt2": SMALL_SHAPE},
}
SHARD_BYTES = 1 << 30
BOUND = 1.5
FIRST_CALL_TOKENS = 8
PROMPT = [[5, 6, 7, 8]]


def tensor_shapes(family, shape):
    """transformers' PyTorch names and shapes of a family's weights (GPT-2's tied lm_head left out)."""
    d, inner, vocab = shape["n_embd"], 4 * shape["n_embd"], shape["vocab_size"]
    yield "transformer.wte.weight", (vocab, d)
    if family == "gpt2":
        yield "transformer.wpe.weight", (shape["n_positions"], d)
    for i in range(shape["n_layer"]):
        block = f"transformer.h.{i}."
        if family == "gptj":  # Linear weights are [out, in]
            layer = [
                ("ln_1", (d,), d),
                *((f"attn.{name}", (d, d), None) for name in ("q_proj", "k_proj", "v_proj", "out_proj")),
                ("mlp.fc_in", (inner, d), inner),
                ("mlp.fc_out", (d, inner), d),
            ]
        else:  # Conv1D weights are [in, out]
            layer = [
                ("ln_1", (d,), d),
                ("attn.c_attn", (d, 3 * d), 3 * d),
                ("attn.c_proj", (d, d), d),
                ("ln_2", (d,), d),
                ("mlp.c_fc", (d, inner), inner),
                ("mlp.c_proj", (inner, d), d),
            ]
        for name, weight_shape, bias_size in layer:
            yield block + name + ".weight", weight_shape
            if bias_size is not None:
                yield block + name + ".bias", (bias_size,)
    yield "transformer.ln_f.weight", (d,)
    yield "transformer.ln_f.bias", (d,)
    if family == "gptj":
        yield "lm_head.weight", (vocab, d)
        yield "lm_head.bias", (vocab,)


def write_checkpoint(directory, family, shape):
    """config.json and fp16 safetensors shards of about SHARD_BYTES with their index; random weights, a shard in
    memory at a time."""
    from safetensors.numpy import save_file

    model_config(family, shape).save_pretrained(directory)
    rng = np.random.default_rng(0)
    groups, current, size = [], [], 0
    for name, tensor_shape in tensor_shapes(family, shape):
        current.append((name, tensor_shape))
        size += 2 * int(np.prod(tensor_shape))
        if size >= SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
    groups += [current] if current else []
    weight_map = {}
    for number, group in enumerate(groups, 1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16) for name, s in group}
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: shard for name, _ in group})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(path.stat().st_size for path in directory.iterdir())


def rss_mib():
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024  # kB


def load_and_generate(directory, dtype, new_tokens):
    """(In the child process) loads, generates, prints the figures as JSON."""
    import tfgen.model

    # isort: split
    from transformers import TFGPT2LMHeadModel, TFGPTJForCausalLM  # noqa: F401  (their import is not loading)

    before = rss_mib()
    start = time.perf_counter()
    lm = tfgen.model.CausalLM.from_pretrained(directory, dtype=dtype)
    load_s = time.perf_counter() - start
    peak, after = peak_rss_mib(), rss_mib()
    weights_mib = sum(v.shape.num_elements() * v.dtype.size for v in lm.net.weights) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the RSS now
    start = time.perf_counter()
    lm.generate(PROMPT, max_new_tokens=FIRST_CALL_TOKENS, eos_token_id=None)
    first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    out = lm.generate(PROMPT, max_new_tokens=new_tokens, eos_token_id=None).numpy()
    generate_s = time.perf_counter() - start
    decode_peak = peak_rss_mib()
    print(
        json.dumps(
            {
                "parameters": sum(v.shape.num_elements() for v in lm.net.weights),
                "dtype": dtype,
                "weights_mib": weights_mib,
                "rss_before_load_mib": before,
                "rss_after_load_mib": after,
                "peak_rss_load_mib": peak,
                "load_peak_over_weights": (peak - before) / weights_mib,
                "kept_over_weights": (after - before) / weights_mib,
                "transient_over_weights": (peak - after) / weights_mib,
                "load_s": load_s,
                "first_call_s": first_call_s,
                "new_tokens": new_tokens,
                "tokens_per_s": new_tokens / generate_s,
                "peak_rss_generate_mib": decode_peak,
                "decode_extra_over_weights": (decode_peak - after) / weights_mib,
                "new_ids": out[0, len(PROMPT[0]) :].tolist(),
            }
        )
    )


COLUMNS = [
    ("family", "family", "{}"),
    ("dtype", "dtype", "{}"),
    ("parameters", "parameters", "{:,}"),
    ("weights MiB", "weights_mib", "{:.0f}"),
    ("load s", "load_s", "{:.1f}"),
    ("peak-before / weights", "load_peak_over_weights", "{:.3f}"),
    ("kept", "kept_over_weights", "{:.3f}"),
    ("transient", "transient_over_weights", "{:.3f}"),
    ("within 1.5x", "within_bound", "{}"),
    ("first call s", "first_call_s", "{:.1f}"),
    ("tokens/s", "tokens_per_s", "{:.2f}"),
    ("peak RSS generating MiB", "peak_rss_generate_mib", "{:.0f}"),
    ("decode extra / weights", "decode_extra_over_weights", "{:.3f}"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="kogpt-6b")
    parser.add_argument("--family", nargs="+", choices=["gptj", "gpt2"], default=["gptj"])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens of the timed generate call")
    parser.add_argument("--json", type=Path, help="results file (default benchmarks/results/big_checkpoint-SHAPE.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return load_and_generate(args.child, args.dtype[0], args.new_tokens)
    unknown = [family for family in args.family if family not in SHAPES[args.shape]]
    if unknown:
        parser.error(f"--shape {args.shape} is a {'/'.join(SHAPES[args.shape])} shape, not {', '.join(unknown)}")
    info, command = machine_info(), command_line()
    rows = []
    for family in args.family:
        with tempfile.TemporaryDirectory(prefix="tfgen-big-checkpoint-") as directory:
            start = time.perf_counter()
            file_bytes = write_checkpoint(Path(directory), family, SHAPES[args.shape][family])
            print(
                f"wrote the {args.shape} {family} fp16 checkpoint ({file_bytes / 2**30:.2f} GiB) in "
                f"{time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            for dtype in args.dtype:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--dtype",
                        dtype,
                        "--new-tokens",
                        str(args.new_tokens),
                        "--child",
                        directory,
                    ],
                    check=True,
                    stdout=subprocess.PIPE,
                    text=True,
                ).stdout
                row = {"family": family, "shape": args.shape, **json.loads(out.splitlines()[-1])}
                rows.append({**row, "within_bound": row["load_peak_over_weights"] <= BOUND})
                print(
                    f"[{family} {dtype}: peak-before {row['load_peak_over_weights']:.3f}x the weights]",
                    file=sys.stderr,
                    flush=True,
                )
    print_machine(info, command)
    print(
        f"shape {args.shape}: fp16 safetensors shards of {SHARD_BYTES / 2**30:.0f} GiB, random weights; "
        f"bound: peak RSS while loading - RSS before <= {BOUND}x the weights' bytes in the target dtype"
    )
    print(format_table(rows, COLUMNS))
    small = args.shape == "small"
    write_results(
        results_path("big_checkpoint" if small else f"big_checkpoint-{args.shape}", small, args.json),
        {"machine": info, "command": command, "bound": BOUND, "shard_bytes": SHARD_BYTES, "rows": rows},
    )


if __name__ == "__main__":
    main()
