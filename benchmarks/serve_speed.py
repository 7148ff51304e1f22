"""Serving speed: `tfgen serve` (continuous batching) on a checkpoint (XLA) and on its LiteRT int8 export, against a
plain server that calls generate once per request.

For each model (ko-mini; a random-weight model of KoGPT2-base size) the servers run as
subprocesses on 127.0.0.1, one after the other, and the same load hits each: C concurrent
clients (C in --clients), each sending --requests completions one after another with greedy
decoding and min_tokens = max_tokens (so every request makes exactly --max-tokens tokens).
tfgen's requests stream and their time to first token (TTFT) is the arrival of the first text;
the plain server cannot stream, so its TTFT is the whole request. Throughput is all tokens over
the wall time of the load; each server's peak RSS (VmHWM) is read after its loads. Before timing, each server gets one untimed round at every client
count (compiles). The KoGPT2-base-size model has a word-level tokenizer of 51,200 made-up words
(text is irrelevant to speed; the shapes are KoGPT2-base's).

    python benchmarks/serve_speed.py                        # ko-mini and KoGPT2-base size
    python benchmarks/serve_speed.py --small                # smoke run: tiny random model, few clients
    python benchmarks/serve_speed.py --plain-server --model DIR --port P   # (the baseline server itself)
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from _harness import (  # noqa: E402
    SMALL_SHAPE,
    SPECIAL_TOKENS,
    command_line,
    format_table,
    gpt2_shape,
    machine_info,
    print_machine,
    results_path,
    write_results,
)

PROMPTS = [
    "안녕하세요",
    "근육이 커지기 위해서는",
    "이때",
    "대한민국의 수도는",
    "오늘 날씨가",
    "옛날 옛적에",
    "인공지능은",
    "서울에서 부산까지",
]
STARTUP_SECONDS = 1800


def word_level_checkpoint(directory, shape):
    """A random-weight GPT-2 of `shape` with a word-level tokenizer.json of vocab_size words ("w4", "w5", ...)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import GPT2Config

    from tfgen import GPT2LM, Tokenizer

    names = ["<s>", "</s>", "<unk>", "<pad>"] + [f"w{i}" for i in range(4, shape["vocab_size"])]
    hf = HFTokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    )
    tokenizer = Tokenizer.from_pretrained(directory)
    GPT2LM(GPT2Config(**shape, **SPECIAL_TOKENS), tokenizer).save_pretrained(directory / "model")
    return directory / "model"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=600):
    request = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=timeout)


class Server:
    def __init__(self, command):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert self.process.poll() is None, f"{command} exited during startup"
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if json.loads(response.read())["status"] == "ok":
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{command} did not become ready"
            time.sleep(0.5)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=120)


def one_request(url, model, prompt, max_tokens, stream):
    """(seconds to first text, seconds to the end) of one greedy completion."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    started = time.perf_counter()
    first = None
    with _post(url, body) as response:
        if not stream:
            json.loads(response.read())
            end = time.perf_counter() - started
            return end, end
        for line in response:
            if line.startswith(b"data:") and first is None and b'"text": ""' not in line:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started


def load(url, model, clients, requests, max_tokens, stream):
    """Runs the load; returns throughput (tokens/s) and TTFT p50/p99 (ms)."""

    def client(i):
        return [one_request(url, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens, stream) for j in range(requests)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        timings = [t for per_client in pool.map(client, range(clients)) for t in per_client]
    wall = time.perf_counter() - started
    ttft = sorted(first for first, _ in timings)
    return {
        "tokens_per_s": clients * requests * max_tokens / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
    }


def peak_rss_mib(pid):
    """The process's peak resident memory so far (VmHWM), MiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def run_server_side(name, command, model, args):
    server = Server(command)
    try:
        stream = name != "plain"
        for clients in args.clients:  # untimed: compiles the programs each load needs
            load(server.url, model, clients, 1, args.max_tokens, stream)
        rows = []
        for clients in args.clients:
            figures = load(server.url, model, clients, args.requests, args.max_tokens, stream)
            rows.append({"server": name, "clients": clients, **figures})
            print(
                f"  {name:12s} {clients:3d} clients: {figures['tokens_per_s']:8.1f} tokens/s, TTFT p50 "
                f"{figures['ttft_p50_ms']:.0f} ms, p99 {figures['ttft_p99_ms']:.0f} ms",
                flush=True,
            )
        peak = peak_rss_mib(server.process.pid)
        for row in rows:
            row["server_peak_rss_mib"] = peak
        return rows
    finally:
        server.stop()


def litert_export(model_dir, scratch, args):
    """`tfgen export --format litert` of the checkpoint (int8, the default capacity, --max-batch rows), in a process
    of its own."""
    output = Path(scratch) / f"{Path(str(model_dir)).name}-litert"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tfgen",
            "export",
            str(model_dir),
            str(output),
            "--format",
            "litert",
            "--quantize",
            "int8",
            "--rows",
            str(args.max_batch),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return output


def benchmark_model(label, model_dir, scratch, args):
    print(f"\n{label}", flush=True)
    served = {"tfgen": model_dir, "plain": model_dir}
    if "tfgen-litert" in args.servers:
        served["tfgen-litert"] = litert_export(model_dir, scratch, args)
    rows = []
    for name in args.servers:
        directory = served[name]
        model = Path(directory).resolve().name if Path(directory).is_dir() else str(directory)
        if name == "plain":
            command = [sys.executable, __file__, "--plain-server", "--model", str(directory)]
        else:
            command = [
                sys.executable,
                "-m",
                "tfgen",
                "serve",
                "--model",
                str(directory),
                "--max-batch",
                str(args.max_batch),
                "--max-queue",
                str(max(args.clients)),
            ]
        rows += run_server_side(name, command, model, args)
    for row in rows:
        row["model"] = label
    return rows


def plain_server(model, port):
    """The baseline: one GPT2LM.generate_text call per request, one request at a time, no streaming."""
    import anyio
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tfgen import GPT2LM

    lm = GPT2LM.from_pretrained(model)
    lm.generate_text(PROMPTS[0], max_new_tokens=8)
    lock = threading.Lock()

    def generate(body):
        with lock:
            return lm.generate_text(
                body["prompt"],
                return_full_text=False,
                max_new_tokens=body["max_tokens"],
                min_new_tokens=body.get("min_tokens", 0),
            )

    async def completions(request):
        body = await request.json()
        text = await anyio.to_thread.run_sync(generate, body)
        return JSONResponse(
            {
                "object": "text_completion",
                "model": body["model"],
                "choices": [{"text": text, "index": 0, "finish_reason": "length"}],
            }
        )

    async def health(request):
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", nargs="+", type=int, help="concurrent clients (default: 1 4 16 64; --small: 1 4)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16, help="tfgen serve's decode slots")
    parser.add_argument("--models", nargs="+", choices=["ko-mini", "base"], default=["ko-mini", "base"])
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=["tfgen", "tfgen-litert", "plain"],
        default=["tfgen", "tfgen-litert", "plain"],
        help="tfgen serve on the checkpoint (XLA), on its LiteRT int8 export, and the plain server",
    )
    parser.add_argument("--small", action="store_true", help="tiny random model, 1 and 4 clients: a smoke run")
    parser.add_argument("--json", type=Path, help="results file (default: benchmarks/results/serve_speed.json)")
    parser.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.requests, args.max_tokens = 2, 16
    args.clients = args.clients or ([1, 4] if args.small else [1, 4, 16, 64])
    return args


def main():
    args = parse_args()
    if args.plain_server:
        return plain_server(args.model, args.port)
    info, command = machine_info(), command_line()
    print_machine(info, command)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        if args.small:
            rows += benchmark_model(
                "tiny (small run)", word_level_checkpoint(scratch, dict(SMALL_SHAPE)), scratch, args
            )
        else:
            if "ko-mini" in args.models:
                rows += benchmark_model("ko-mini", "ko-mini", scratch, args)
            if "base" in args.models:
                rows += benchmark_model(
                    "KoGPT2-base size", word_level_checkpoint(scratch, gpt2_shape(False)), scratch, args
                )
    print()
    print(
        format_table(
            rows,
            [
                ("model", "model", "{}"),
                ("server", "server", "{}"),
                ("clients", "clients", "{}"),
                ("tokens/s", "tokens_per_s", "{:.1f}"),
                ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"),
                ("TTFT p99 ms", "ttft_p99_ms", "{:.0f}"),
                ("server peak RSS MiB", "server_peak_rss_mib", "{:.0f}"),
            ],
        )
    )
    settings = {k: getattr(args, k) for k in ("clients", "requests", "max_tokens", "max_batch", "small", "servers")}
    write_results(
        results_path("serve_speed", args.small, args.json),
        {"machine": info, "command": command, "settings": settings, "rows": rows},
    )


if __name__ == "__main__":
    main()
