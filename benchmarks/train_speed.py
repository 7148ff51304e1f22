"""Fine-tuning speed: tfgen's Keras fit (XLA or not, fp32 or mixed bfloat16) against a plain PyTorch loop.

Every case trains the same GPT-2 shape (random weights, fp32 master weights)
on the same random token ids, one full step at a time: forward, masked
cross-entropy, backward, gradient clipping to global norm 1 and an AdamW
update (lr 5e-5, weight decay 0.01, none on LayerNorm weights and biases).

- tfgen-xla, tfgen-plain: `GPT2LM.from_config(config)`, `lm.compile()` with its
  defaults but jit_compile=True (False for -plain), `fit` on a tf.data dataset
  of `(features, labels, weights)` batches shaped as `tfgen.data.lm_batches`
  makes them;
- tfgen-xla-bf16, tfgen-plain-bf16: the same under
  `tfgen.training.use_mixed_precision("mixed_bfloat16")`;
- torch: transformers' `GPT2LMHeadModel(config)` in train mode, a plain PyTorch
  loop with `clip_grad_norm_` and `torch.optim.AdamW`, all cores.

Each case runs in its own process (this script with the internal --only flag),
so its peak RSS and first (compiling) step are its own. Timings: the first
step, --warmup more untimed steps, then the median of --steps timed steps.

    python benchmarks/train_speed.py                      # every case, KoGPT2-base size, batch 8 x 128
    python benchmarks/train_speed.py --small              # smoke run with a tiny model
    python benchmarks/train_speed.py --cases tfgen-xla torch --batch-size 4 --block-size 256 --steps 3
"""

import argparse
import json
import math
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
    SHAPE_KEYS,
    command_line,
    format_table,
    gpt2_config,
    gpt2_shape,
    machine_info,
    peak_rss_mib,
    print_machine,
    results_path,
    usable_cores,
    write_results,
)

# case -> how it trains: framework, XLA (tfgen's compile(jit_compile=...)), Keras dtype policy.
CASES = {
    "tfgen-xla": {"framework": "tensorflow", "jit_compile": True, "precision": "float32"},
    "tfgen-plain": {"framework": "tensorflow", "jit_compile": False, "precision": "float32"},
    "tfgen-xla-bf16": {"framework": "tensorflow", "jit_compile": True, "precision": "mixed_bfloat16"},
    "tfgen-plain-bf16": {"framework": "tensorflow", "jit_compile": False, "precision": "mixed_bfloat16"},
    "torch": {"framework": "torch", "jit_compile": False, "precision": "float32"},
}
FRAMEWORK_ENV = {"tensorflow": {"USE_TF": "1", "USE_TORCH": "0"}, "torch": {"USE_TF": "0", "USE_TORCH": "1"}}
DATA_SEED = 0
MODEL_SEED = 0
LEARNING_RATE = 5e-5  # tfgen.training.adamw's defaults, which the torch loop copies
WEIGHT_DECAY = 0.01
CLIP_NORM = 1.0
NO_DECAY = ["ln_", "bias"]  # as tfgen.training.NO_DECAY
DEFAULT_BATCH = {"full": 8, "small": 2}
DEFAULT_BLOCK = {"full": 128, "small": 16}
SETTINGS = ["cases", "batch_size", "block_size", "warmup", "steps", "small"]


def random_batches(count, batch_size, block_size, vocab_size):
    """`count` batches of block_size + 1 uniform random ids past the special tokens (0-3), the same in every process.

    Like tfgen.data.lm_batches, a row of block_size + 1 ids gives block_size inputs and the next-token labels.
    """
    rng = np.random.default_rng(DATA_SEED)
    return rng.integers(4, vocab_size, size=(count, batch_size, block_size + 1), dtype=np.int32)


def step_summary(times, tokens_per_step):
    median = statistics.median(times)
    return {"median_s": median, "tokens_per_s": tokens_per_step / median, "steps_s": times}


# ---- the implementations: each returns the row's figures; every step's time is taken once its result is in


def train_tfgen(case, config, args, batches):
    """Keras fit on the tfgen model; a callback times each batch (its loss is read, so the step has finished)."""
    import tfgen  # noqa: F401  (before TensorFlow: tfgen sets the Keras 2 environment)

    # isort: split
    import tensorflow as tf

    from tfgen import GPT2LM, training

    settings = CASES[case]
    if settings["precision"] != "float32":
        training.use_mixed_precision(settings["precision"])
    start = time.perf_counter()
    tf.keras.utils.set_random_seed(MODEL_SEED)
    lm = GPT2LM.from_config(config)
    lm.compile(jit_compile=settings["jit_compile"])
    build_s = time.perf_counter() - start

    def to_example(ids):  # tfgen.data's (features, labels, weights); random ids have no padding
        mask = tf.ones_like(ids)
        features = {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]}
        return features, ids[:, 1:], tf.cast(mask[:, 1:], tf.float32)

    dataset = tf.data.Dataset.from_tensor_slices(batches).map(to_example).repeat().prefetch(tf.data.AUTOTUNE)
    expected = (
        {
            "input_ids": (tf.int32, [args.batch_size, args.block_size]),
            "attention_mask": (tf.int32, [args.batch_size, args.block_size]),
        },
        (tf.int32, [args.batch_size, args.block_size]),
        (tf.float32, [args.batch_size, args.block_size]),
    )
    actual = tf.nest.map_structure(lambda spec: (spec.dtype, spec.shape.as_list()), dataset.element_spec)
    if actual != expected:
        raise RuntimeError(f"batches are {actual}, expected {expected}")

    class StepTimer(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.losses = [], []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(float(logs["loss"]))  # waits for the step (Keras' running mean of the loss)
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    total_steps = 1 + args.warmup + args.steps
    start = time.perf_counter()
    lm.fit(dataset, steps_per_epoch=total_steps, epochs=1, verbose=0, callbacks=[timer])
    fit_s = time.perf_counter() - start
    if int(lm.optimizer.iterations.numpy()) != total_steps:
        raise RuntimeError(f"fit took {int(lm.optimizer.iterations.numpy())} steps, expected {total_steps}")
    return {
        "build_s": build_s,
        "fit_s": fit_s,
        "times": timer.times,
        "first_loss": timer.losses[0],
        "parameters": sum(v.shape.num_elements() for v in lm.trainable_variables),
        "compute_dtype": lm.gpt2.transformer.h[0].attn.c_attn.compute_dtype,
        "variable_dtype": lm.gpt2.transformer.h[0].attn.c_attn.variable_dtype,
        "threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
    }


def train_torch(case, config, args, batches):
    """transformers' PyTorch GPT-2 in train mode, a plain loop: the masked loss of the Keras cases, clipping, AdamW."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(usable_cores())
    start = time.perf_counter()
    torch.manual_seed(MODEL_SEED)
    model = GPT2LMHeadModel(config).train()
    named = list(model.named_parameters())  # the tied LM head appears once
    groups = [
        {"params": [p for n, p in named if not any(key in n for key in NO_DECAY)], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if any(key in n for key in NO_DECAY)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    build_s = time.perf_counter() - start

    ids = torch.from_numpy(batches).long()
    examples = [(row[:, :-1], torch.ones_like(row[:, :-1]), row[:, 1:], torch.ones(row[:, 1:].shape)) for row in ids]

    def step(input_ids, attention_mask, labels, weights):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        loss = (losses * weights.flatten()).sum() / weights.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = [], []
    start_all = time.perf_counter()
    for i in range(1 + args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(step(*examples[i % len(examples)]))
        times.append(time.perf_counter() - start)
    fit_s = time.perf_counter() - start_all
    return {
        "build_s": build_s,
        "fit_s": fit_s,
        "times": times,
        "first_loss": losses[0],
        "parameters": sum(p.numel() for p in model.parameters()),
        "compute_dtype": "float32",
        "variable_dtype": "float32",
        "threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
    }


TRAINERS = {"tensorflow": train_tfgen, "torch": train_torch}


def run_case(args):
    """The --only process: trains one case, writes its row to --result-file."""
    settings = CASES[args.only]
    os.environ.update(FRAMEWORK_ENV[settings["framework"]])
    config = gpt2_config(args.small)
    batches = random_batches(1 + args.warmup + args.steps, args.batch_size, args.block_size, config.vocab_size)
    figures = TRAINERS[settings["framework"]](args.only, config, args, batches)
    times = figures.pop("times")
    tokens_per_step = args.batch_size * args.block_size
    row = {
        "case": args.only,
        **settings,
        "batch": args.batch_size,
        "block": args.block_size,
        "first_step_s": times[0],
        "warmup_s": times[1 : 1 + args.warmup],
        **step_summary(times[1 + args.warmup :], tokens_per_step),
        **figures,
        "peak_rss_mib": peak_rss_mib(),
    }
    Path(args.result_file).write_text(json.dumps(row))


# ---- the parent process: one process per case, report


def parameter_count(shape):
    """GPT-2's parameters, the tied LM head counted once."""
    layers, width, vocab, positions = shape["n_layer"], shape["n_embd"], shape["vocab_size"], shape["n_positions"]
    return (vocab + positions) * width + layers * (12 * width**2 + 13 * width) + 2 * width


def train_flops_per_token(shape, block_size):
    """Matmul FLOPs of one training step per token: 6 x (layer weights + LM head) + attention scores and mix.

    Forward is 2 FLOPs per weight per token, backward twice that; attention adds 2 x 2 x block x width per layer
    forward (causal half not skipped). Embedding lookups, LayerNorm, GELU, softmax and the optimizer are left out.
    """
    layers, width, vocab = shape["n_layer"], shape["n_embd"], shape["vocab_size"]
    return 6 * (layers * 12 * width**2 + vocab * width) + 3 * layers * 4 * block_size * width


def run_child(args, case, result_file):
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--only",
        case,
        "--result-file",
        str(result_file),
        "--batch-size",
        str(args.batch_size),
        "--block-size",
        str(args.block_size),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ] + (["--small"] if args.small else [])
    print(f"[{case}]", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return {**json.loads(Path(result_file).read_text()), "process_s": time.perf_counter() - start}


COLUMNS = [  # (heading, row key, format)
    ("case", "case", "{}"),
    ("precision", "precision", "{}"),
    ("XLA", "jit_compile", "{}"),
    ("batch", "batch", "{}"),
    ("block", "block", "{}"),
    ("median s/step", "median_s", "{:.3f}"),
    ("tokens/s", "tokens_per_s", "{:.1f}"),
    ("GFLOP/s", "gflop_s", "{:.1f}"),
    ("first-step s", "first_step_s", "{:.2f}"),
    ("build s", "build_s", "{:.1f}"),
    ("first loss", "first_loss", "{:.3f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("process s", "process_s", "{:.0f}"),
]


def report(info, command, model, args, rows):
    print_machine(info, command)
    print(
        f"model: GPT-2 random weights, fp32 master weights, {model['n_layer']} layers x {model['n_embd']} wide, "
        f"vocab {model['vocab_size']}: {model['parameters'] / 1e6:.1f} M parameters (tied embedding counted once)"
    )
    print(
        f"data: uniform random ids, batch {args.batch_size} x {args.block_size} tokens; one step = forward, masked "
        "loss, backward, clip to global norm 1, AdamW"
    )
    print(
        f"each case runs in its own process: first step (tracing/compiling included), {args.warmup} untimed, then "
        f"the median of {args.steps} timed steps; GFLOP/s: {model['train_flops_per_token'] / 1e9:.3g} GFLOP per "
        "token (matmuls only) x tokens/s; first loss: the first batch's loss (random ids: about ln(vocab) = "
        f"{math.log(model['vocab_size']):.3f}); process s: the case's whole process\n"
    )
    print(format_table(rows, COLUMNS))
    for row in rows:
        if row["parameters"] != model["parameters"]:
            print(f"note: {row['case']} trains {row['parameters']} parameters, expected {model['parameters']}")


def run_benchmark(args):
    command = command_line()
    info = machine_info()
    shape = gpt2_shape(args.small)
    model = {key: shape[key] for key in SHAPE_KEYS}
    model.update(parameters=parameter_count(shape), train_flops_per_token=train_flops_per_token(shape, args.block_size))
    rows = []
    with tempfile.TemporaryDirectory(prefix="train_speed-") as scratch:
        for case in args.cases:
            row = run_child(args, case, Path(scratch) / "row.json")
            row["gflop_s"] = row["tokens_per_s"] * model["train_flops_per_token"] / 1e9
            rows.append(row)
    report(info, command, model, args, rows)
    settings = {key: getattr(args, key) for key in SETTINGS}
    write_results(
        results_path("train_speed", args.small, args.json),
        {"machine": info, "command": command, "settings": settings, "model": model, "results": rows},
    )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=list(CASES),
        help="tfgen-xla / tfgen-plain: tfgen's Keras fit with / without XLA; -bf16: the same under "
        "mixed_bfloat16; torch: a PyTorch loop on transformers' GPT2LMHeadModel (default: all)",
    )
    parser.add_argument("--batch-size", type=int, help="rows per step (default 8; 2 with --small)")
    parser.add_argument("--block-size", type=int, help="tokens per row (default 128; 16 with --small)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument(
        "--small", action="store_true", help="tiny model (2 layers, 64 wide, vocab 1000) and batch 2 x 16: a smoke run"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="results file (default: benchmarks/results/train_speed.json, train_speed-small.json with --small)",
    )
    # Internal: set by the parent for the process that measures one case.
    parser.add_argument("--only", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "small" if args.small else "full"
    args.batch_size = DEFAULT_BATCH[size] if args.batch_size is None else args.batch_size
    args.block_size = DEFAULT_BLOCK[size] if args.block_size is None else args.block_size
    if args.warmup < 0 or args.steps < 1 or args.batch_size < 1 or args.block_size < 1:
        parser.error("--warmup must be at least 0; --steps, --batch-size and --block-size at least 1")
    if args.block_size > gpt2_shape(args.small)["n_positions"]:
        parser.error(f"--block-size is over the model's {gpt2_shape(args.small)['n_positions']} positions")
    return args


def main():
    args = parse_args()
    if args.only:
        run_case(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
