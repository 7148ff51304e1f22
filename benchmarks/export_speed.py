"""Export speed: generation through the exported SavedModel against GPT2LM.generate in process.

One model (random KoGPT2-base-size weights by default, or --model DIR) is
exported with `tfgen.export_saved_model` and loaded back with
`tf.saved_model.load`; the same prompts and settings then run through
`GPT2LM.generate` ("in-process") and through the loaded SavedModel's functions
(`generate_ids`, `generate_beam`, `generate_text`). The random model has no EOS,
so every call makes exactly the requested tokens; it has no SentencePiece
tokenizer either, so the text cases (`generate_text` on both sides,
tokenization included) need --model with one.

Both sides run in this one process, their calls interleaved (in-process then
SavedModel, then the other way round, round after round), so a background
load that comes and goes weighs on both alike; the ratio is the median of
the rounds' ratios. Before the rounds: each side's first (compiling) call
and --warmup calls. (That the SavedModel needs neither tfgen nor transformers
is tested in tests/test_export.py.)

    python benchmarks/export_speed.py                    # KoGPT2-base size, ids cases
    python benchmarks/export_speed.py --small            # smoke run with a tiny model
    python benchmarks/export_speed.py --model runs/quickstart/model --cases text-greedy-b8 text-sample-b8
"""

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # transformers' TF models need Keras 2 (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np  # noqa: E402

from _harness import (  # noqa: E402
    command_line,
    format_table,
    gpt2_config,
    machine_info,
    peak_rss_mib,
    print_machine,
    results_path,
    seconds,
    write_results,
)

NUM_BEAMS = 4
SAMPLING = {"do_sample": True, "top_k": 50, "top_p": 0.95, "seed": 0}
# case -> (batch, settings, input): "ids" cases call generate / generate_ids (generate_beam with beams),
# "text" cases generate_text on both sides.
CASES = {
    "greedy-b1": (1, {}, "ids"),
    "sample-b8": (8, SAMPLING, "ids"),
    "beam4-b1": (1, {"num_beams": NUM_BEAMS}, "ids"),
    "text-greedy-b8": (8, {}, "text"),
    "text-sample-b8": (8, SAMPLING, "text"),
}
TEXT_PROMPTS = [
    "안녕하세요",
    "근육이 커지기 위해서는",
    "이때",
    "대한민국의 수도는",
    "오늘 날씨가",
    "옛날 옛적에",
    "인공지능은",
    "서울에서 부산까지",
]
PROMPT_SEED = 0
SETTINGS = ["cases", "new_tokens", "prompt_length", "warmup", "repeats", "small", "model"]


def make_prompts(batch, length, vocab_size):
    """Random ids past the special tokens (0-3)."""
    return np.random.default_rng(PROMPT_SEED).integers(4, vocab_size, size=(batch, length), dtype=np.int32)


def load_model(args):
    """--model, or a seeded random-weight GPT-2 without EOS (every call makes exactly the tokens asked for)."""
    import tensorflow as tf

    from tfgen import GPT2LM

    if args.model:
        return GPT2LM.from_pretrained(args.model)
    tf.keras.utils.set_random_seed(0)
    config = gpt2_config(args.small)
    config.eos_token_id = None
    return GPT2LM(config)


def generators(lm, saved):
    """generate(case, inputs, new_tokens) -> ids or strings, for each side."""
    import tensorflow as tf

    def in_process(case, inputs, new_tokens):
        _, settings, kind = CASES[case]
        if kind == "text":
            return lm.generate_text(inputs, return_full_text=False, max_new_tokens=new_tokens, **settings)
        return lm.generate(*inputs, max_new_tokens=new_tokens, **settings).numpy()

    def savedmodel(case, inputs, new_tokens):
        _, settings, kind = CASES[case]
        request = {key: value for key, value in settings.items() if key != "num_beams"}
        if kind == "text":
            out = saved.generate_text(tf.constant(inputs), max_new_tokens=new_tokens, **request)
            return [text.decode("utf-8") for text in out["completions"].numpy()]
        function = saved.generate_beam if "num_beams" in settings else saved.generate_ids
        return function(*inputs, max_new_tokens=new_tokens, **request)["sequences"].numpy()

    return {"in_process": in_process, "savedmodel": savedmodel}


def runnable(case, text):
    """Whether the export of a model with (text) or without a SentencePiece tokenizer has the case's signature."""
    _, settings, kind = CASES[case]
    if kind == "text":
        return text
    return not (text and "num_beams" in settings)


def case_inputs(case, args, vocab_size):
    batch, _, kind = CASES[case]
    if kind == "text":
        return TEXT_PROMPTS[:batch]
    ids = make_prompts(batch, args.prompt_length, vocab_size)
    return ids, np.ones_like(ids)


def measure(sides, case, inputs, new_tokens, args):
    """First calls, warm-up calls, then --repeats rounds of one call per side, the order alternating."""
    row = {}
    outputs = {}
    for side, generate in sides.items():
        start = time.perf_counter()
        outputs[side] = generate(case, inputs, new_tokens)
        row[f"{side}_first_call_s"] = time.perf_counter() - start
        for _ in range(args.warmup):
            generate(case, inputs, new_tokens)
    times = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side in list(sides)[:: 1 if repeat % 2 == 0 else -1]:
            times[side].append(seconds(functools.partial(sides[side], case, inputs, new_tokens)))
    for side in sides:
        row[f"{side}_s"] = statistics.median(times[side])
        row[f"{side}_runs_s"] = times[side]
    row["speed_ratio"] = statistics.median(a / b for a, b in zip(times["in_process"], times["savedmodel"]))
    row["same_output"] = bool(np.array_equal(outputs["in_process"], outputs["savedmodel"]))
    if CASES[case][2] == "ids":
        made = outputs["in_process"].shape[0] * (outputs["in_process"].shape[1] - args.prompt_length)
        row.update({f"{side}_tokens_per_s": made / row[f"{side}_s"] for side in sides})
    return row


COLUMNS = [  # (heading, row key, format)
    ("case", "case", "{}"),
    ("batch", "batch", "{}"),
    ("new tokens", "new_tokens", "{}"),
    ("in-process s", "in_process_s", "{:.3f}"),
    ("SavedModel s", "savedmodel_s", "{:.3f}"),
    ("in-process tok/s", "in_process_tokens_per_s", "{:.1f}"),
    ("SavedModel tok/s", "savedmodel_tokens_per_s", "{:.1f}"),
    ("SavedModel speed", "speed_ratio", "{:.3f}x"),
    ("same output", "same_output", "{}"),
    ("first call s (in / SM)", "first_calls", "{}"),
]


def run_benchmark(args):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the SentencePiece ops of the text signatures)

    from tfgen import export_saved_model

    command = command_line()
    info = machine_info()
    lm = load_model(args)
    text = lm.tokenizer is not None and lm.tokenizer.sentencepiece_model() is not None
    cases = [case for case in args.cases if runnable(case, text)]
    with tempfile.TemporaryDirectory(prefix="export_speed-") as scratch:
        start = time.perf_counter()
        export_saved_model(lm, Path(scratch) / "export", num_beams=NUM_BEAMS)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        saved = tf.saved_model.load(str(Path(scratch) / "export"))
        load_s = time.perf_counter() - start
        sides = generators(lm, saved)
        rows = []
        for case in cases:
            for new_tokens in args.new_tokens:
                row = measure(sides, case, case_inputs(case, args, lm.config.vocab_size), new_tokens, args)
                row["first_calls"] = f"{row['in_process_first_call_s']:.1f} / {row['savedmodel_first_call_s']:.1f}"
                rows.append({"case": case, "batch": CASES[case][0], "new_tokens": new_tokens, **row})
                print(f"[{case}, {new_tokens} new tokens: {row['speed_ratio']:.3f}x]", flush=True)
    model = {key: getattr(lm.config, key) for key in ["n_layer", "n_embd", "n_head", "vocab_size", "n_positions"]}
    model["parameters"] = sum(v.shape.num_elements() for v in lm.gpt2.weights)
    print_machine(info, command)
    print(
        f"model: {args.model or 'random weights, no EOS'}, {model['n_layer']} layers x {model['n_embd']} wide, "
        f"vocab {model['vocab_size']}, {model['parameters'] / 1e6:.1f} M parameters, fp32; export {export_s:.1f} s, "
        f"load {load_s:.1f} s, generate_beam with {NUM_BEAMS} beams; peak RSS {peak_rss_mib():.0f} MiB"
    )
    print(
        f"seconds: medians of {args.repeats} interleaved rounds; SavedModel speed: median over the rounds of "
        "in-process time / SavedModel time (1.0x: as fast)\n"
    )
    print(format_table(rows, COLUMNS))
    skipped = sorted(set(args.cases) - set(cases))
    if skipped:
        print(
            f"\nskipped: {' '.join(skipped)} (text cases need a SentencePiece model, e.g. --model ko-mini; with one, "
            "generate_beam takes prompts, so the ids beam case needs a model without one)"
        )
    settings = {key: getattr(args, key) for key in SETTINGS}
    write_results(
        results_path("export_speed", args.small, args.json),
        {
            "machine": info,
            "command": command,
            "settings": settings,
            "model": model,
            "export_s": export_s,
            "load_s": load_s,
            "results": rows,
        },
    )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=list(CASES),
        help="greedy-b1, sample-b8 (top-k 50, top-p 0.95), beam4-b1: token ids in and out; "
        "text-greedy-b8, text-sample-b8: Korean prompts in, text out (need --model)",
    )
    parser.add_argument("--model", help="a checkpoint to export instead of the random-weight model")
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[32], help="tokens generated per call")
    parser.add_argument("--prompt-length", type=int, default=16, help="prompt tokens of the ids cases")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side after the first (compiling) one")
    parser.add_argument("--repeats", type=int, default=8, help="interleaved timed rounds; medians are reported")
    parser.add_argument("--small", action="store_true", help="tiny random model (2 layers, 64 wide): a smoke run")
    parser.add_argument(
        "--json",
        type=Path,
        help="results file (default: benchmarks/results/export_speed.json, export_speed-small.json with --small)",
    )
    args = parser.parse_args()
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1")
    return args


if __name__ == "__main__":
    run_benchmark(parse_args())
