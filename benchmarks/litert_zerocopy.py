"""One `decode_R` step of a LiteRT export: the Interpreter's signature runner against a CompiledModel over zero-copy buffers.

The Interpreter's runner copies every input into its own tensors on each
call: the cache views, 2 x layers x R x heads x capacity x head_dim float32
(151 MB per step at KoGPT2-base size, 16 rows, capacity 256). tfgen's
runtime (`tfgen.litert.BoundSignatures`) runs decode_R on a CompiledModel
(XNNPACK, the usable cores as threads) whose inputs and outputs are
`tfgen.litert_host` buffers over the numpy arrays themselves. Per R: the
median (and min) ms per step each way over --repeats warm calls, the time
numpy takes to copy the cache inputs once, and the largest difference
between the two ways' outputs (random cache and tokens).

    python benchmarks/litert_zerocopy.py EXPORT_DIR [--rows 8 16] [--repeats 20]
"""

import argparse
import functools
import os
import statistics
import time
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from tfgen.litert import MODEL_FILE, LiteRTLM
from tfgen.litert_host import aligned_zeros


def median_ms(call, repeats):
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), 1000 * min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    runtime = LiteRTLM(args.export, num_threads=threads)
    interpreter = Interpreter(model_path=str(Path(args.export) / MODEL_FILE), num_threads=threads)
    rng = np.random.default_rng(0)
    for rows in args.rows:
        name = f"decode_{rows}"
        inputs = runtime._chain.parts[0].input_details(name)
        layers = sum(key.startswith("key_cache_") for key in inputs)
        shape = inputs["key_cache_0"]["shape"]  # [rows, heads, capacity, head_dim]
        keys, values = (aligned_zeros([layers, *shape]) for _ in range(2))
        keys[:], values[:] = rng.standard_normal(keys.shape, np.float32), rng.standard_normal(keys.shape, np.float32)
        cache = {
            f"{kind}_cache_{layer}": array[layer]
            for layer in range(layers)
            for kind, array in (("key", keys), ("value", values))
        }
        token, positions = aligned_zeros([rows, 1], np.int32), aligned_zeros([rows], np.int32)
        token[:], positions[:] = rng.integers(0, 1000, [rows, 1]), rng.integers(0, shape[2], [rows])
        bound = runtime._chain.parts[0].bind(
            name,
            {"token": token, "positions": positions, **cache},
            {
                key: aligned_zeros(details["shape"], details["dtype"])
                for key, details in runtime._chain.parts[0].output_details(name).items()
            },
        )
        runner = interpreter.get_signature_runner(name)
        reference = runner(token=token, positions=positions, **cache)
        difference = max(float(np.abs(reference[key] - out).max()) for key, out in bound().items())
        copy = np.empty_like(keys)
        interpreted = median_ms(functools.partial(runner, token=token, positions=positions, **cache), args.repeats)
        compiled = median_ms(bound, args.repeats)
        copied = median_ms(functools.partial(copy_both, copy, keys, values), args.repeats)
        print(
            f"capacity {shape[2]}, {rows} rows ({2 * keys.nbytes / 1e6:.0f} MB of cache inputs): Interpreter "
            f"{interpreted[0]:.1f} ms (min {interpreted[1]:.1f}), CompiledModel zero-copy {compiled[0]:.1f} ms "
            f"(min {compiled[1]:.1f}), x{interpreted[0] / compiled[0]:.2f}; numpy copy of the cache inputs "
            f"{copied[0]:.1f} ms; largest output difference {difference:.2g}",
            flush=True,
        )


def copy_both(out, first, second):
    """What a copying runtime does each step: the key and the value cache into its input buffer."""
    np.copyto(out, first)
    np.copyto(out, second)


if __name__ == "__main__":
    main()
