"""Generation speed: tfgen against transformers' XLA-compiled TF generate and its PyTorch generate.

All of them run on the same random-weight model (GPT-2, or GPT-J with --family gptj; built once with tfgen and saved
as an HF checkpoint in fp32), the same prompts and the same settings, with EOS stopping
off so every call makes exactly the requested number of tokens.

Each implementation runs in its own process (this script with the internal
--only flag), so peak RSS is per implementation and its first call pays every
start-up cost; the first-call case gets one more fresh process per
implementation that loads the model and makes a single call. Frameworks are
imported only in those processes, and transformers is told not to load the
other one (USE_TF / USE_TORCH).

    python benchmarks/generate_speed.py                      # everything, KoGPT2-base size
    python benchmarks/generate_speed.py --small              # smoke run with a tiny model
    python benchmarks/generate_speed.py --cases greedy-b1 --new-tokens 32 --repeats 2
    python benchmarks/generate_speed.py --family gptj --cases greedy-b1 sample-b8 first-call   # a ~1 B GPT-J
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

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # transformers' TF models need Keras 2 (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np  # noqa: E402

from _harness import (  # noqa: E402
    GPTJ_1B_SHAPE,
    GPTJ_SMALL_SHAPE,
    SHAPE_KEYS,
    command_line,
    format_table,
    gpt2_shape,
    machine_info,
    model_config,
    peak_rss_mib,
    print_machine,
    results_path,
    seconds,
    write_results,
)

IMPLEMENTATIONS = ["tfgen", "tfgen-bf16", "tf-xla", "torch", "torch-bf16"]
FRAMEWORK_ENV = {
    "tfgen": {"USE_TF": "1", "USE_TORCH": "0"},
    "tfgen-bf16": {"USE_TF": "1", "USE_TORCH": "0"},
    "tf-xla": {"USE_TF": "1", "USE_TORCH": "0"},
    "torch": {"USE_TF": "0", "USE_TORCH": "1"},
    "torch-bf16": {"USE_TF": "0", "USE_TORCH": "1"},
}
FAMILY_NAMES = {"gpt2": "GPT-2", "gptj": "GPT-J"}
GREEDY = {"do_sample": False}
SAMPLING = {"do_sample": True, "top_k": 50, "top_p": 0.95}
BLOCKING = {**SAMPLING, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}
BEAM = {"do_sample": False, "num_beams": 4}
# case -> (batch, sampling settings); "bandwidth" is measured in the parent process.
CASES = {
    "greedy-b1": (1, GREEDY),
    "sample-b8": (8, SAMPLING),
    "sample-b8-blocking": (8, BLOCKING),
    "beam4-b1": (1, BEAM),
    "first-call": (1, GREEDY),
    "new-length": (1, GREEDY),
}
# transformers' TF no-repeat-n-gram processor runs only eagerly, so XLA generate cannot take it.
UNSUPPORTED = {("tf-xla", "sample-b8-blocking")}
ALL_CASES = list(CASES) + ["bandwidth"]
PROMPT_SEED = 0
BANDWIDTH_BYTES = 2**30
BANDWIDTH_REPEATS = 5
SETTINGS = [
    "family",
    "impls",
    "cases",
    "new_tokens",
    "prompt_length",
    "new_prompt_length",
    "warmup",
    "repeats",
    "small",
]


def model_shape(family, small):
    """The benchmark's model: GPT-2 tiny or KoGPT2-base; GPT-J tiny or ~1 B parameters (16 x 2048, vocab 64512)."""
    if family == "gpt2":
        return gpt2_shape(small)
    return dict(GPTJ_SMALL_SHAPE if small else GPTJ_1B_SHAPE)


def build_checkpoint(family, small, model_dir):
    """Builds a seeded random-weight model with tfgen and saves it; returns its shape, parameter count and bytes."""
    import tensorflow as tf

    from tfgen import GPT2LM, GPTJLM

    tf.keras.utils.set_random_seed(0)
    shape = model_shape(family, small)
    lm = {"gpt2": GPT2LM, "gptj": GPTJLM}[family](model_config(family, shape))
    lm.save_pretrained(model_dir)
    # One variable per tensor: GPT-2's LM head reuses the token embedding, so it counts once.
    parameters = sum(v.shape.num_elements() for v in lm.net.weights)
    weight_bytes = sum(v.shape.num_elements() * v.dtype.size for v in lm.net.weights)
    return {
        "family": family,
        **{key: shape[key] for key in SHAPE_KEYS},
        "parameters": parameters,
        "bytes": weight_bytes,
    }


def measure_bandwidth():
    """Memory bandwidth over a 1 GiB float32 array, best of several passes: numpy on one thread, TF on all."""
    import tensorflow as tf

    source = np.ones(BANDWIDTH_BYTES // 4, np.float32)  # ones, not empty: the pages must really be mapped
    target = np.zeros_like(source)
    read_s = min(seconds(lambda: source.sum()) for _ in range(BANDWIDTH_REPEATS))
    copy_s = min(seconds(lambda: np.copyto(target, source)) for _ in range(BANDWIDTH_REPEATS))
    tensor = tf.constant(source)
    tf_read_s = min(seconds(lambda: tf.reduce_sum(tensor).numpy()) for _ in range(BANDWIDTH_REPEATS))
    return {
        "read_gb_s": source.nbytes / read_s / 1e9,
        "copy_gb_s": 2 * source.nbytes / copy_s / 1e9,
        "all_threads_read_gb_s": source.nbytes / tf_read_s / 1e9,
    }


# ---- the implementations: each loader returns generate(input_ids, attention_mask, settings) -> ids, and a trace count


def load_tfgen(model_dir, dtype="float32"):
    from tfgen import CausalLM

    lm = CausalLM.from_pretrained(model_dir, dtype=dtype)

    def generate(input_ids, attention_mask, settings):
        return lm.generate(input_ids, attention_mask, eos_token_id=None, seed=0, **settings).numpy()

    return generate, lambda: lm.decoder.trace_count


def load_tf_xla(model_dir):
    """transformers' TF generate compiled as its docs advise: tf.function(model.generate, jit_compile=True)."""
    import tensorflow as tf
    from transformers import TFAutoModelForCausalLM

    model = TFAutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=False)
    model.generation_config.eos_token_id = None
    xla_generate = tf.function(model.generate, jit_compile=True)

    def generate(input_ids, attention_mask, settings):
        # seed: transformers' stateless sampling seed (a global seed is ignored under XLA); greedy ignores it.
        ids = xla_generate(tf.constant(input_ids), attention_mask=tf.constant(attention_mask), seed=[0, 0], **settings)
        return ids.numpy()

    return generate, xla_generate.experimental_get_tracing_count


def load_torch(model_dir, dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None

    def generate(input_ids, attention_mask, settings):
        torch.manual_seed(0)
        with torch.no_grad():
            ids = model.generate(
                torch.from_numpy(input_ids).long(), attention_mask=torch.from_numpy(attention_mask).long(), **settings
            )
        return ids.numpy()

    return generate, lambda: None


LOADERS = {
    "tfgen": load_tfgen,
    "tfgen-bf16": lambda model_dir: load_tfgen(model_dir, "bfloat16"),
    "tf-xla": load_tf_xla,
    "torch": load_torch,
    "torch-bf16": lambda model_dir: load_torch(model_dir, "bfloat16"),
}


# ---- measurements, run inside an implementation's process


def make_prompts(batch, length, vocab_size):
    """Random ids past the special tokens (0-3), the same in every process."""
    return np.random.default_rng(PROMPT_SEED).integers(4, vocab_size, size=(batch, length), dtype=np.int32)


def timed_call(generate, prompts, settings):
    """One generate call: its wall time and output, checked to be prompt + exactly max_new_tokens wide."""
    start = time.perf_counter()
    output = generate(prompts, np.ones_like(prompts), settings)
    elapsed = time.perf_counter() - start
    expected = (prompts.shape[0], prompts.shape[1] + settings["max_new_tokens"])
    if output.shape != expected:
        raise RuntimeError(f"generate returned shape {output.shape}, expected {expected}")
    return elapsed, output


def row_settings(case, new_tokens, config):
    batch, sampling = CASES[case]
    return batch, {"max_new_tokens": new_tokens, "pad_token_id": config["pad_token_id"], **sampling}


def summary(batch, new_tokens, times):
    median = statistics.median(times)
    return {"median_s": median, "tokens_per_s": batch * new_tokens / median, "runs_s": times}


def measure_first_call(generate, case, new_tokens, args, config):
    """The first generate call of a fresh process: tracing and compiling included."""
    batch, settings = row_settings(case, new_tokens, config)
    first_s, _ = timed_call(generate, make_prompts(batch, args.prompt_length, config["vocab_size"]), settings)
    return {"batch": batch, "first_call_s": first_s}


def measure_warm(generate, case, new_tokens, args, config):
    """First call, warm-up calls, then the median of --repeats timed calls; new_ids: the first call's first row."""
    batch, settings = row_settings(case, new_tokens, config)
    prompts = make_prompts(batch, args.prompt_length, config["vocab_size"])
    first_s, output = timed_call(generate, prompts, settings)
    for _ in range(args.warmup):
        timed_call(generate, prompts, settings)
    times = [timed_call(generate, prompts, settings)[0] for _ in range(args.repeats)]
    return {
        "batch": batch,
        "first_call_s": first_s,
        "new_ids": output[0, args.prompt_length :].tolist(),
        **summary(batch, new_tokens, times),
    }


def measure_new_length(generate, case, new_tokens, args, config):
    """After warm-up at --prompt-length: one call at --new-prompt-length, then warm calls at that length."""
    batch, settings = row_settings(case, new_tokens, config)
    prompts = make_prompts(batch, args.prompt_length, config["vocab_size"])
    first_s, _ = timed_call(generate, prompts, settings)
    for _ in range(args.warmup):
        timed_call(generate, prompts, settings)
    unseen = make_prompts(batch, args.new_prompt_length, config["vocab_size"])
    new_prompt_s, _ = timed_call(generate, unseen, settings)
    times = [timed_call(generate, unseen, settings)[0] for _ in range(args.repeats)]
    return {"batch": batch, "first_call_s": first_s, "new_prompt_s": new_prompt_s, **summary(batch, new_tokens, times)}


MEASURES = {
    "greedy-b1": measure_warm,
    "sample-b8": measure_warm,
    "sample-b8-blocking": measure_warm,
    "beam4-b1": measure_warm,
    "first-call": measure_first_call,
    "new-length": measure_new_length,
}


def run_implementation(args):
    """The --only process: loads one implementation, measures the cases, writes rows to --result-file."""
    os.environ.update(FRAMEWORK_ENV[args.only])
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    start = time.perf_counter()
    generate, trace_count = LOADERS[args.only](args.model_dir)
    load_s = time.perf_counter() - start
    rows = []
    for case in args.cases:
        if (args.only, case) in UNSUPPORTED:
            continue
        for new_tokens in args.new_tokens[:1] if case == "first-call" else args.new_tokens:
            traces_before = trace_count()
            row = MEASURES[case](generate, case, new_tokens, args, config)
            traces = None if traces_before is None else trace_count() - traces_before
            rows.append(
                {
                    "implementation": args.only,
                    "case": case,
                    "new_tokens": new_tokens,
                    **row,
                    "traces": traces,
                    "load_s": load_s,
                    "peak_rss_mib": peak_rss_mib(),
                }
            )
    Path(args.result_file).write_text(json.dumps(rows))


# ---- the parent process: checkpoint, bandwidth, one process per implementation, report


def build_model(args, model_dir, result_file):
    """The checkpoint, built in a process of its own (so its memory is not held while the implementations run)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--build",
        "--family",
        args.family,
        "--model-dir",
        str(model_dir),
        "--result-file",
        str(result_file),
        *(["--small"] if args.small else []),
    ]
    subprocess.run(command, check=True)
    return json.loads(Path(result_file).read_text())


def run_child(args, implementation, cases, model_dir, result_file):
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--only",
        implementation,
        "--model-dir",
        str(model_dir),
        "--result-file",
        str(result_file),
        "--cases",
        *cases,
        "--new-tokens",
        *map(str, args.new_tokens),
        "--prompt-length",
        str(args.prompt_length),
        "--new-prompt-length",
        str(args.new_prompt_length),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
    ]
    print(f"[{implementation}: {' '.join(cases)}]", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)
    return json.loads(Path(result_file).read_text())


COLUMNS = [  # (heading, row key, format)
    ("implementation", "implementation", "{}"),
    ("case", "case", "{}"),
    ("batch", "batch", "{}"),
    ("new tokens", "new_tokens", "{}"),
    ("median s", "median_s", "{:.3f}"),
    ("tokens/s", "tokens_per_s", "{:.1f}"),
    ("first-call s", "first_call_s", "{:.2f}"),
    ("new-prompt s", "new_prompt_s", "{:.3f}"),
    ("traces", "traces", "{}"),
    ("load s", "load_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
]


def greedy_agreement(rows):
    """Per new-token count: the index of the first greedy-b1 token where each implementation leaves the first one."""
    agreement = {}
    for new_tokens in sorted({row["new_tokens"] for row in rows if row["case"] == "greedy-b1"}):
        outputs = {
            row["implementation"]: row["new_ids"]
            for row in rows
            if row["case"] == "greedy-b1" and row["new_tokens"] == new_tokens
        }
        reference, reference_ids = next(iter(outputs.items()))
        agreement[new_tokens] = {
            "reference": reference,
            "first_difference": {
                name: next((i for i, (a, b) in enumerate(zip(ids, reference_ids)) if a != b), None)
                for name, ids in outputs.items()
                if name != reference
            },
        }
    return agreement


def report(info, command, model, bandwidth, rows, agreement):
    print_machine(info, command)
    print(
        f"model: {FAMILY_NAMES[model['family']]} random weights, fp32, {model['n_layer']} layers x {model['n_embd']} "
        f"wide, vocab {model['vocab_size']}: {model['parameters'] / 1e6:.1f} M parameters, "
        f"{model['bytes'] / 1e6:.1f} MB{' (tied embedding counted once)' if model['family'] == 'gpt2' else ''}"
    )
    print("each implementation runs in its own process; first-call rows: a further fresh process, model load, one call")
    print(
        "first-call s: the row's first call in its process (tracing/compiling included); new-prompt s: first call "
        "at the unseen prompt length after warm-up; traces: tf.function traces during the row\n"
    )
    print(format_table(rows, COLUMNS))
    if bandwidth:
        best = max(bandwidth["read_gb_s"], bandwidth["all_threads_read_gb_s"])
        print(
            f"\nmemory bandwidth (1 GiB float32, best of {BANDWIDTH_REPEATS}): numpy on one thread: read (sum) "
            f"{bandwidth['read_gb_s']:.1f} GB/s, copy {bandwidth['copy_gb_s']:.1f} GB/s (read + write); "
            f"TF reduce_sum on all threads: {bandwidth['all_threads_read_gb_s']:.1f} GB/s"
        )
        print(
            f"batch-1 decoding bound (fp32): {best:.1f} GB/s / {model['bytes'] / 1e6:.1f} MB of weights "
            f"= {best * 1e9 / model['bytes']:.1f} tokens/s (bf16 weights: half the bytes, twice the bound)"
        )
    for new_tokens, result in agreement.items():
        parts = [
            f"{name} identical" if i is None else f"{name} differs from new token {i}"
            for name, i in result["first_difference"].items()
        ]
        print(
            f"greedy-b1 tokens, {new_tokens} new, against {result['reference']}: "
            f"{', '.join(parts) or 'nothing to compare'}"
        )


def run_benchmark(args):
    command = command_line()
    info = machine_info()
    bandwidth = measure_bandwidth() if "bandwidth" in args.cases else None
    row_cases = [case for case in args.cases if case not in ("bandwidth", "first-call")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="generate_speed-") as scratch:
        model_dir = Path(scratch) / "model"
        model = build_model(args, model_dir, Path(scratch) / "model.json")
        for implementation in args.impls:
            if "first-call" in args.cases:
                rows += run_child(args, implementation, ["first-call"], model_dir, Path(scratch) / "first.json")
            if row_cases:
                rows += run_child(args, implementation, row_cases, model_dir, Path(scratch) / "rows.json")
    agreement = greedy_agreement(rows)
    report(info, command, model, bandwidth, rows, agreement)
    settings = {key: getattr(args, key) for key in SETTINGS}
    name = "generate_speed" if args.family == "gpt2" else f"generate_speed-{args.family}"
    write_results(
        results_path(name, args.small, args.json),
        {
            "machine": info,
            "command": command,
            "settings": settings,
            "model": model,
            "bandwidth": bandwidth,
            "results": rows,
            "greedy_agreement": agreement,
        },
    )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=ALL_CASES,
        default=ALL_CASES,
        help="greedy-b1: batch 1 greedy; sample-b8: batch 8, top-k 50, top-p 0.95; sample-b8-blocking: the "
        "same with repetition_penalty 1.2 and no_repeat_ngram_size 3 (not tf-xla); beam4-b1: "
        "batch 1, 4 beams; first-call: a fresh "
        "process's first call; new-length: a call at an unseen prompt length; bandwidth: the "
        "memory-bandwidth bound for batch-1 decoding (default: all)",
    )
    parser.add_argument(
        "--family",
        choices=FAMILY_NAMES,
        default="gpt2",
        help="gpt2: KoGPT2-base size; gptj: 16 layers x 2048, vocab 64512 (~1.07 B parameters)",
    )
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=IMPLEMENTATIONS)
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[32, 256], help="tokens generated per call")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-prompt-length", type=int, default=23, help="the unseen prompt length of new-length")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
    parser.add_argument("--small", action="store_true", help="tiny model (2 layers, 64 wide, vocab 1000): a smoke run")
    parser.add_argument(
        "--json",
        type=Path,
        help="results file (default: benchmarks/results/generate_speed.json, "
        "generate_speed-gptj.json with --family gptj, -small before .json "
        "with --small)",
    )
    # Internal: set by the parent for the process that measures one implementation.
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1")
    if args.new_prompt_length == args.prompt_length:
        parser.error("--new-prompt-length must differ from --prompt-length")
    return args


def main():
    args = parse_args()
    if args.build:
        os.environ.update(FRAMEWORK_ENV["tfgen"])
        model = build_checkpoint(args.family, args.small, args.model_dir)
        Path(args.result_file).write_text(json.dumps(model))
    elif args.only:
        run_implementation(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
