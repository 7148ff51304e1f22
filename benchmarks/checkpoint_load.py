"""Reading a pytorch_model.bin: tfgen's torch-free reader against torch.load, load time and peak memory.

The script writes a random-weight GPT-2 state dict (KoGPT2-base size by default, fp32, with the uint8 attn.bias
buffers of KoGPT2-v2's file) with torch.save, then reads it in fresh processes, each case `--repeats` times:

- `tfgen`: `TorchCheckpoint(path)` and every tensor materialized as a numpy array (all held at once, as torch.load);
- `tfgen-stream`: the same, one tensor at a time, each dropped before the next (how `checkpoint.read_weights` assigns);
- `torch`: `torch.load(path, weights_only=True)`;
- `torch-mmap`: `torch.load(path, weights_only=True, mmap=True)` and every tensor touched (`.sum()`).

"MiB read" counts each name's tensor, so the tied lm_head.weight counts twice (torch shares its storage with
transformer.wte.weight; tfgen's mapping gives each name its own array, and `read_weights` never reads lm_head).
Peak RSS is the child's VmHWM; "peak - after imports" subtracts what the imports alone took (tfgen's import pulls
in TensorFlow).

    python benchmarks/checkpoint_load.py --small      # smoke run, tiny model
    python benchmarks/checkpoint_load.py              # KoGPT2-base size (about 0.5 GB written to a temporary dir)
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import (
    command_line,
    format_table,
    gpt2_shape,
    machine_info,
    peak_rss_mib,
    print_machine,
    results_path,
    seconds,
    write_results,
)

CASES = ["tfgen", "tfgen-stream", "torch", "torch-mmap"]


def write_checkpoint(path, shape):
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    n, d = shape["n_positions"], shape["n_embd"]

    def weight(*dims):
        return torch.from_numpy(rng.standard_normal(dims, dtype=np.float32) * 0.02)

    state_dict = {"transformer.wte.weight": weight(shape["vocab_size"], d), "transformer.wpe.weight": weight(n, d)}
    for i in range(shape["n_layer"]):
        prefix = f"transformer.h.{i}."
        for name, dims in [("ln_1", (d,)), ("ln_2", (d,))]:
            state_dict[prefix + name + ".weight"], state_dict[prefix + name + ".bias"] = weight(*dims), weight(*dims)
        for name, (rows, cols) in [
            ("attn.c_attn", (d, 3 * d)),
            ("attn.c_proj", (d, d)),
            ("mlp.c_fc", (d, 4 * d)),
            ("mlp.c_proj", (4 * d, d)),
        ]:
            state_dict[prefix + name + ".weight"], state_dict[prefix + name + ".bias"] = (
                weight(rows, cols),
                weight(cols),
            )
        state_dict[prefix + "attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state_dict[prefix + "attn.masked_bias"] = torch.tensor(-1e4)
    state_dict["transformer.ln_f.weight"], state_dict["transformer.ln_f.bias"] = weight(d), weight(d)
    state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]  # tied: one storage, as transformers saves
    torch.save(state_dict, path)


def child(case, path):
    """One case in this (fresh) process; prints a JSON line with the seconds, the bytes read and the peak RSS."""
    before = peak_rss_mib()
    if case.startswith("tfgen"):
        from tfgen.torch_pickle import TorchCheckpoint

        def load():
            checkpoint = TorchCheckpoint(path)
            if case == "tfgen":
                arrays = {name: checkpoint[name] for name in checkpoint}
                load.nbytes = sum(array.nbytes for array in arrays.values())
            else:
                load.nbytes = sum(checkpoint[name].nbytes for name in checkpoint)
    else:
        import torch

        def load():
            state_dict = torch.load(path, weights_only=True, mmap=case == "torch-mmap")
            if case == "torch-mmap":
                for tensor in state_dict.values():
                    tensor.sum()
            load.nbytes = sum(tensor.nbytes for tensor in state_dict.values())

    imported = peak_rss_mib()
    elapsed = seconds(load)
    print(
        json.dumps(
            {
                "case": case,
                "seconds": elapsed,
                "mib_read": load.nbytes / 2**20,
                "peak_rss_mib": peak_rss_mib(),
                "rss_after_imports_mib": max(before, imported),
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny model (smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    parser.add_argument("--json", type=Path, default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    info, command = machine_info(), command_line()
    shape = gpt2_shape(args.small)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "pytorch_model.bin"
        write_checkpoint(path, shape)
        file_mib = path.stat().st_size / 2**20
        for case in args.cases:
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", case, str(path)], check=True, capture_output=True, text=True
                ).stdout
                runs.append(json.loads(out.splitlines()[-1]))
            best = min(runs, key=lambda run: run["seconds"])
            rows.append(
                {
                    **best,
                    "median_seconds": sorted(run["seconds"] for run in runs)[len(runs) // 2],
                    "added_rss_mib": best["peak_rss_mib"] - best["rss_after_imports_mib"],
                }
            )
    print_machine(info, command)
    print(f"file: {file_mib:.1f} MiB, shape {shape}")
    print(
        format_table(
            rows,
            [
                ("case", "case", "{}"),
                ("median s", "median_seconds", "{:.3f}"),
                ("best s", "seconds", "{:.3f}"),
                ("MiB read", "mib_read", "{:.1f}"),
                ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
                ("peak - after imports", "added_rss_mib", "{:.0f}"),
            ],
        )
    )
    write_results(
        results_path("checkpoint_load", args.small, args.json),
        {"machine": info, "command": command, "file_mib": file_mib, "shape": shape, "rows": rows},
    )


if __name__ == "__main__":
    main()
