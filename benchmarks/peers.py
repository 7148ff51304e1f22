"""tfgen against its CPU peers: CTranslate2 int8, OpenVINO int8 weights and PyTorch, on the same GPT-2 and prompts.

One random-weight GPT-2 (KoGPT2-base size; --small: a tiny one) is built with
tfgen and saved once (`GPT2LM.save_pretrained`: a PyTorch-layout
model.safetensors); every engine starts from that checkpoint:

- tfgen-xla: `GPT2LM.generate` in float32 (XLA);
- tfgen-litert-int8 (and tfgen-litert-int4 where `export_litert` accepts quantize="int4"):
  `tfgen.export_litert`, then `tfgen.litert.LiteRTLM(dir).generate` with the batch as one [batch, length] array;
- ct2-int8: `ctranslate2.converters.TransformersConverter`, quantization int8 (int8_float32 on a CPU),
  `Generator.generate_batch` (sampling_topk / sampling_topp; greedy is top-k 1);
- openvino-int8, openvino-int8-f32: optimum-intel's OpenVINO export with NNCF int8 weights
  (`OVModelForCausalLM`, HF generate over OpenVINO's stateful model), at the CPU plugin's default inference
  precision (bf16 where the CPU has it) and at f32 (INFERENCE_PRECISION_HINT);
- torch-fp32, torch-bf16: transformers' PyTorch `GPT2LMHeadModel.generate`, the references.

Cases: greedy-b1 (batch 1, greedy) and sample-b8 (batch 8, top-k 50, top-p
0.95), --prompt-length-token prompts, --new-tokens new tokens, EOS off. Each
conversion runs once, in its own process; then, each round, every engine and
case runs in a fresh process of its own (this script with the internal --only
flag): load, a first call, --warmup calls, then the median of --repeats timed
calls; load time and the process's peak RSS (VmHWM). --rounds rounds (engines
in turn within a round); the table gives medians over rounds, the greedy
tokens' agreement with torch-fp32 and, per case, tfgen LiteRT's tokens/s over
the fastest of CTranslate2 int8 and OpenVINO int8 (issue 32's target: >= 1.2).

    python benchmarks/peers.py --small                  # smoke run, tiny model
    python benchmarks/peers.py                          # KoGPT2-base size, 3 rounds
    python benchmarks/peers.py --rounds 1 --engines tfgen-litert-int8 ct2-int8 openvino-int8 torch-fp32

The peers are a benchmark-only extra: pip install -e ".[bench]" (see setup.cfg for optimum-intel, which must be
installed with --no-deps so that pip leaves torch alone).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _harness import (
    command_line,
    format_table,
    machine_info,
    peak_rss_mib,
    print_machine,
    results_path,
    seconds,
    usable_cores,
    write_results,
)
from generate_speed import FRAMEWORK_ENV, GREEDY, SAMPLING, build_checkpoint, load_tfgen, load_torch, make_prompts

CASES = {"greedy-b1": (1, GREEDY), "sample-b8": (8, SAMPLING)}
REFERENCE = "torch-fp32"
PEERS = ("ct2-int8", "openvino-int8", "openvino-int8-f32")
TARGET = 1.2
PEER_PACKAGES = {"ct2": ["ctranslate2"], "openvino": ["openvino", "optimum.intel", "nncf"]}
SETTINGS = [
    "engines",
    "cases",
    "rounds",
    "new_tokens",
    "prompt_length",
    "warmup",
    "repeats",
    "litert_capacity",
    "small",
]


# ---- the engines. An artifact is what an engine loads (made once from the checkpoint by its `convert`, in a process
# of its own); `load(path)` returns generate(input_ids [batch, length] int32, settings) -> new ids [batch, new], and a
# dict of facts worth reporting (the precision actually used). settings: max_new_tokens, pad_token_id, do_sample and,
# when sampling, top_k and top_p.


def convert_litert(quantize):
    def convert(model_dir, path, args):
        from tfgen import GPT2LM, export_litert

        export_litert(GPT2LM.from_pretrained(model_dir), path, quantize=quantize, capacity=args.litert_capacity)

    return convert


def convert_ct2(model_dir, path, args, **options):
    """CTranslate2's int8 conversion; `options` go to its TransformersConverter."""
    from types import SimpleNamespace

    import ctranslate2

    class IdsConverter(ctranslate2.converters.TransformersConverter):
        """The checkpoint has no tokenizer: each token's string is its id."""

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            vocab_size = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
            return SimpleNamespace(
                get_vocab=lambda: {str(i): i for i in range(vocab_size)}, bos_token="0", eos_token="1", unk_token="2"
            )

    IdsConverter(str(model_dir), **options).convert(str(path), quantization="int8")


def convert_openvino(model_dir, path, args):
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

    model = OVModelForCausalLM.from_pretrained(
        model_dir, export=True, compile=False, quantization_config=OVWeightQuantizationConfig(bits=8)
    )
    model.save_pretrained(path)


CONVERTERS = {
    "litert-int8": convert_litert("int8"),
    "litert-int4": convert_litert("int4"),
    "ct2-int8": convert_ct2,
    "openvino-int8": convert_openvino,
}


def new_tokens_of(generate):
    """A generate_speed loader's generate (ids, mask, settings) -> whole rows, as this script's interface."""
    return lambda ids, settings: generate(ids, np.ones_like(ids), settings)[:, ids.shape[1] :]


def load_reused(loader, **kwargs):
    def load(path):
        generate, _ = loader(path, **kwargs)
        return new_tokens_of(generate), {}

    return load


def load_litert(path):
    from tfgen.litert import LiteRTLM

    runtime = LiteRTLM(path)

    def generate(input_ids, settings):
        sequences = runtime.generate(input_ids, eos_token_id=None, seed=0, **settings)
        return sequences[:, input_ids.shape[1] :]

    return generate, {"quantize": runtime.config["quantize"], "capacity": runtime.capacity}


def load_ct2(path):
    import ctranslate2

    ctranslate2.set_random_seed(0)
    generator = ctranslate2.Generator(str(path), device="cpu", compute_type="int8", intra_threads=usable_cores())

    def generate(input_ids, settings):
        n = settings["max_new_tokens"]
        sampling = (
            {"sampling_topk": settings["top_k"], "sampling_topp": settings["top_p"]} if settings["do_sample"] else {}
        )  # greedy: the default top-k 1
        results = generator.generate_batch(
            [[str(i) for i in row] for row in input_ids.tolist()],
            max_length=n,
            min_length=n,
            include_prompt_in_result=False,
            end_token=[],
            **sampling,
        )
        return np.array([result.sequences_ids[0] for result in results])

    return generate, {"compute_type": generator.compute_type}


def load_openvino(precision=None):
    def load(path):
        import torch
        from optimum.intel import OVModelForCausalLM

        hints = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        model = OVModelForCausalLM.from_pretrained(path, ov_config=hints)
        model.generation_config.eos_token_id = None

        def generate(input_ids, settings):
            torch.manual_seed(0)
            ids = torch.from_numpy(input_ids).long()
            return model.generate(ids, attention_mask=torch.ones_like(ids), **settings)[:, ids.shape[1] :].numpy()

        used = model.request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT")
        return generate, {"inference_precision": str(used.to_string())}

    return load


# engine -> (artifact: a CONVERTERS key, or None for the checkpoint itself; load; framework the process needs)
ENGINES = {
    "tfgen-xla": (None, load_reused(load_tfgen), "tfgen"),
    "tfgen-litert-int8": ("litert-int8", load_litert, "tfgen"),
    "tfgen-litert-int4": ("litert-int4", load_litert, "tfgen"),
    "ct2-int8": ("ct2-int8", load_ct2, "torch"),
    "openvino-int8": ("openvino-int8", load_openvino(), "torch"),
    "openvino-int8-f32": ("openvino-int8", load_openvino("f32"), "torch"),
    "torch-fp32": (None, load_reused(load_torch), "torch"),
    "torch-bf16": (None, load_reused(load_torch, dtype="bfloat16"), "torch"),
}


# ---- inside an engine's process


def measure(args):
    """The --only process: loads one engine, measures one case, writes its row to --result-file."""
    artifact, load, framework = ENGINES[args.only]
    os.environ.update(FRAMEWORK_ENV[framework])
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    batch, sampling = CASES[args.case]
    settings = {"max_new_tokens": args.new_tokens, "pad_token_id": config["pad_token_id"], **sampling}
    prompts = make_prompts(batch, args.prompt_length, config["vocab_size"])
    start = time.perf_counter()
    generate, facts = load(Path(args.artifact_dir))
    load_s = time.perf_counter() - start

    def call():
        output = generate(prompts, settings)
        if output.shape != (batch, args.new_tokens):
            raise RuntimeError(
                f"{args.only} made new tokens of shape {output.shape}, expected {(batch, args.new_tokens)}"
            )
        return output

    first_s = seconds(call)
    for _ in range(args.warmup):
        call()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        output = call()
        times.append(time.perf_counter() - start)
    row = {
        "engine": args.only,
        "case": args.case,
        "batch": batch,
        "load_s": load_s,
        "first_call_s": first_s,
        "runs_s": times,
        "tokens_per_s": batch * args.new_tokens / statistics.median(times),
        "new_ids": output[0].tolist(),
        "peak_rss_mib": peak_rss_mib(),
        **facts,
    }
    Path(args.result_file).write_text(json.dumps(row))


def convert(args):
    """The --convert process: makes one artifact from the checkpoint."""
    os.environ.update(FRAMEWORK_ENV["tfgen" if args.convert.startswith("litert") else "torch"])
    convert_s = seconds(lambda: CONVERTERS[args.convert](args.model_dir, Path(args.artifact_dir), args))
    Path(args.result_file).write_text(json.dumps({"convert_s": convert_s, "peak_rss_mib": peak_rss_mib()}))


def build(args):
    """The --build process: the checkpoint, and the quantizations this tfgen's export_litert takes."""
    os.environ.update(FRAMEWORK_ENV["tfgen"])
    from tfgen.export.litert import QUANTIZATIONS

    model = build_checkpoint("gpt2", args.small, args.model_dir)
    Path(args.result_file).write_text(json.dumps({**model, "litert_quantizations": list(QUANTIZATIONS)}))


# ---- the parent process


def child(args, flags, scratch):
    """Runs this script with the internal `flags` in a fresh process; returns the JSON it writes."""
    result_file = Path(scratch) / "result.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *flags,
        "--result-file",
        str(result_file),
        "--new-tokens",
        str(args.new_tokens),
        "--prompt-length",
        str(args.prompt_length),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--litert-capacity",
        str(args.litert_capacity),
        *(["--small"] if args.small else []),
    ]
    subprocess.run(command, check=True)
    return json.loads(result_file.read_text())


def unavailable(engine, model):
    """Why an engine cannot run here (a missing package or export option), or None."""
    artifact = ENGINES[engine][0] or ""
    if artifact.startswith("litert-") and artifact.split("-")[1] not in model["litert_quantizations"]:
        return f"export_litert has no quantize={artifact.split('-')[1]!r} (it takes {model['litert_quantizations']})"
    for prefix, modules in PEER_PACKAGES.items():
        missing = [name for name in modules if engine.startswith(prefix) and importlib.util.find_spec(name) is None]
        if missing:
            return f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
    return None


def median_rows(rows, engines, cases):
    """Per engine and case, the median over rounds of each figure; greedy-b1's tokens compared with REFERENCE's."""
    summary = []
    for engine in engines:
        for case in cases:
            mine = [row for row in rows if row["engine"] == engine and row["case"] == case]
            if not mine:
                continue
            row = {key: value for key, value in mine[0].items() if key not in ("runs_s", "new_ids", "round")}
            for key in ("tokens_per_s", "load_s", "first_call_s", "peak_rss_mib"):
                row[key] = statistics.median(r[key] for r in mine)
            row["rounds"] = len(mine)
            row["tokens_per_s_range"] = [min(r["tokens_per_s"] for r in mine), max(r["tokens_per_s"] for r in mine)]
            summary.append(row)
    reference = next(
        (row["new_ids"] for row in rows if row["engine"] == REFERENCE and row["case"] == "greedy-b1"), None
    )
    for row in summary:
        if row["case"] == "greedy-b1" and reference is not None:
            ids = next(r["new_ids"] for r in rows if r["engine"] == row["engine"] and r["case"] == "greedy-b1")
            row["agree_with_reference"] = f"{sum(a == b for a, b in zip(ids, reference))}/{len(reference)}"
            row["first_difference"] = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), None)
    return summary


def ratios(summary, cases):
    """Per case: tfgen LiteRT's median tokens/s over the fastest peer's (CTranslate2 int8, OpenVINO int8)."""
    speed = {(row["engine"], row["case"]): row["tokens_per_s"] for row in summary}
    result = {}
    for case in cases:
        peers = {engine: speed[engine, case] for engine in PEERS if (engine, case) in speed}
        if not peers:
            continue
        fastest = max(peers, key=peers.get)
        result[case] = {
            "fastest_peer": fastest,
            "peer_tokens_per_s": peers[fastest],
            "target": TARGET,
            **{
                engine: speed[engine, case] / peers[fastest]
                for engine in ENGINES
                if engine.startswith("tfgen-litert") and (engine, case) in speed
            },
        }
    return result


COLUMNS = [
    ("engine", "engine", "{}"),
    ("case", "case", "{}"),
    ("tokens/s", "tokens_per_s", "{:.1f}"),
    ("load s", "load_s", "{:.2f}"),
    ("first call s", "first_call_s", "{:.2f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("greedy = torch-fp32", "agree_with_reference", "{}"),
    ("precision", "precision", "{}"),
]


def precision_note(row):
    return row.get("inference_precision") or row.get("compute_type") or row.get("quantize")


def report(info, command, model, args, summary, conversions, skipped, speedups):
    print_machine(info, command)
    print(
        f"model: GPT-2 random weights, {model['n_layer']} layers x {model['n_embd']}, vocab {model['vocab_size']}: "
        f"{model['parameters'] / 1e6:.1f} M parameters; prompts {args.prompt_length} tokens, {args.new_tokens} new, "
        f"EOS off; medians over {args.rounds} round(s) of the median of {args.repeats} warm calls\n"
    )
    table = format_table([{**row, "precision": precision_note(row)} for row in summary], COLUMNS)
    print(table)
    for artifact, figures in conversions.items():
        print(f"conversion {artifact}: {figures['convert_s']:.1f} s, peak RSS {figures['peak_rss_mib']:.0f} MiB")
    for engine, why in skipped.items():
        print(f"skipped {engine}: {why}")
    for case, result in speedups.items():
        parts = [f"{engine} {ratio:.2f}x" for engine, ratio in result.items() if engine.startswith("tfgen-litert")]
        print(
            f"{case}: fastest peer {result['fastest_peer']} ({result['peer_tokens_per_s']:.1f} tokens/s); "
            f"tfgen LiteRT against it: {', '.join(parts) or '-'} (target >= {TARGET}x)"
        )
    return table


def run_benchmark(args):
    info, command = machine_info(), command_line()
    rows, conversions, skipped = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="peers-") as scratch:
        model_dir = Path(scratch) / "model"
        model = child(args, ["--build", "--model-dir", str(model_dir)], scratch)
        engines = []
        for engine in args.engines:
            why = unavailable(engine, model)
            if why:
                skipped[engine] = why
                print(f"[skipping {engine}: {why}]", file=sys.stderr, flush=True)
            else:
                engines.append(engine)
        for artifact in dict.fromkeys(ENGINES[engine][0] for engine in engines if ENGINES[engine][0]):
            print(f"[converting {artifact}]", file=sys.stderr, flush=True)
            conversions[artifact] = child(
                args,
                ["--convert", artifact, "--model-dir", str(model_dir), "--artifact-dir", str(Path(scratch) / artifact)],
                scratch,
            )
        for round_ in range(args.rounds):
            for engine in engines:
                artifact_dir = Path(scratch) / ENGINES[engine][0] if ENGINES[engine][0] else model_dir
                for case in args.cases:
                    print(f"[round {round_ + 1}/{args.rounds}: {engine} {case}]", file=sys.stderr, flush=True)
                    row = child(
                        args,
                        [
                            "--only",
                            engine,
                            "--case",
                            case,
                            "--model-dir",
                            str(model_dir),
                            "--artifact-dir",
                            str(artifact_dir),
                        ],
                        scratch,
                    )
                    rows.append({"round": round_ + 1, **row})
    summary = median_rows(rows, engines, args.cases)
    speedups = ratios(summary, args.cases)
    table = report(info, command, model, args, summary, conversions, skipped, speedups)
    write_results(
        results_path("peers", args.small, args.json),
        {
            "machine": info,
            "command": command,
            "settings": {key: getattr(args, key) for key in SETTINGS},
            "model": model,
            "table": table,
            "summary": summary,
            "ratios": speedups,
            "conversions": conversions,
            "skipped": skipped,
            "rows": rows,
        },
    )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=list(CASES),
        help="greedy-b1: batch 1 greedy; sample-b8: batch 8, top-k 50, top-p 0.95",
    )
    parser.add_argument("--rounds", type=int, default=3, help="times the whole comparison runs; medians are reported")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    parser.add_argument("--repeats", type=int, default=3, help="timed warm calls; the median is taken")
    parser.add_argument(
        "--litert-capacity",
        type=int,
        help="the LiteRT exports' capacity (default: prompt + new tokens, the least the request needs)",
    )
    parser.add_argument("--small", action="store_true", help="tiny model (2 layers, 64 wide, vocab 1000): a smoke run")
    parser.add_argument(
        "--json", type=Path, help="results file (default: benchmarks/results/peers.json, peers-small.json with --small)"
    )
    # Internal: set by the parent for its child processes.
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--convert", choices=CONVERTERS, help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--artifact-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.rounds, args.warmup + 1, args.repeats) < 1:
        parser.error("--rounds and --repeats must be at least 1, --warmup at least 0")
    if args.litert_capacity is None:
        args.litert_capacity = args.prompt_length + args.new_tokens
    return args


def main():
    args = parse_args()
    if args.build:
        build(args)
    elif args.convert:
        convert(args)
    elif args.only:
        measure(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
