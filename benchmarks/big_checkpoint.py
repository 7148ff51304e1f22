"""Loading a big GPT-J checkpoint in bfloat16 within memory: writes a sharded fp16 checkpoint of random weights,
then, in a fresh process, loads it with `CausalLM.from_pretrained(dtype=...)` and generates, printing peak RSS.

    python benchmarks/big_checkpoint.py --shape kogpt-6b   # 28 x 4096, vocab 64512: ~6.1 B parameters, 12.2 GB bf16
    python benchmarks/big_checkpoint.py --shape 1b         # 16 x 2048, same vocabulary: ~1.07 B parameters

The bound checked: peak RSS while loading minus the RSS before it (TensorFlow and transformers imported) is within
1.5x the weights' bytes in the target dtype.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "kogpt-6b": dict(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, vocab_size=64512, n_positions=2048),
    "1b": dict(n_layer=16, n_embd=2048, n_head=16, rotary_dim=64, vocab_size=64512, n_positions=2048),
    "tiny": dict(n_layer=2, n_embd=256, n_head=4, rotary_dim=32, vocab_size=4096, n_positions=256),
}
SHARD_BYTES = 1 << 30


def tensor_shapes(shape):
    """transformers' PyTorch GPT-J names and shapes."""
    d, inner, vocab = shape["n_embd"], 4 * shape["n_embd"], shape["vocab_size"]
    yield "transformer.wte.weight", (vocab, d)
    for i in range(shape["n_layer"]):
        block = f"transformer.h.{i}."
        yield block + "ln_1.weight", (d,)
        yield block + "ln_1.bias", (d,)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield block + f"attn.{name}.weight", (d, d)
        yield block + "mlp.fc_in.weight", (inner, d)
        yield block + "mlp.fc_in.bias", (inner,)
        yield block + "mlp.fc_out.weight", (d, inner)
        yield block + "mlp.fc_out.bias", (d,)
    yield "transformer.ln_f.weight", (d,)
    yield "transformer.ln_f.bias", (d,)
    yield "lm_head.weight", (vocab, d)
    yield "lm_head.bias", (vocab,)


def write_checkpoint(directory, shape):
    """config.json and fp16 safetensors shards of about SHARD_BYTES with their index; random weights, a shard in memory at a time."""
    from safetensors.numpy import save_file
    from transformers import GPTJConfig

    GPTJConfig(**shape, bos_token_id=0, eos_token_id=1, pad_token_id=1).save_pretrained(directory)
    rng = np.random.default_rng(0)
    groups, current, size = [], [], 0
    for name, tensor_shape in tensor_shapes(shape):
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
        weight_map.update({name: shard for name, _ in group})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def load_and_generate(directory, dtype):
    """(In the child process) loads, generates 8 tokens, prints the figures as JSON."""
    import tfgen

    def rss_gib():
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30

    before = rss_gib()
    start = time.perf_counter()
    lm = tfgen.CausalLM.from_pretrained(directory, dtype=dtype)
    loaded = time.perf_counter() - start
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    weight_bytes = sum(v.shape.num_elements() * v.dtype.size for v in lm.net.weights)
    start = time.perf_counter()
    out = lm.generate([[5, 6, 7, 8]], max_new_tokens=8, eos_token_id=None).numpy()
    print(json.dumps({
        "parameters": sum(v.shape.num_elements() for v in lm.net.weights), "dtype": dtype,
        "weights_gib": round(weight_bytes / 2**30, 2), "rss_before_load_gib": round(before, 2),
        "peak_rss_after_load_gib": round(peak_load, 2),
        "load_peak_over_weights": round((peak_load - before) / (weight_bytes / 2**30), 3),
        "load_s": round(loaded, 1), "generate_8_tokens_first_call_s": round(time.perf_counter() - start, 1),
        "peak_rss_after_generate_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "new_tokens": out[0, 4:].tolist(),
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="kogpt-6b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return load_and_generate(args.child, args.dtype)
    with tempfile.TemporaryDirectory(prefix="tfgen-big-checkpoint-") as directory:
        start = time.perf_counter()
        write_checkpoint(Path(directory), SHAPES[args.shape])
        print(f"wrote the {args.shape} fp16 checkpoint in {time.perf_counter() - start:.0f} s", flush=True)
        subprocess.run([sys.executable, __file__, "--shape", args.shape, "--dtype", args.dtype, "--child", directory],
                       check=True)


if __name__ == "__main__":
    main()
