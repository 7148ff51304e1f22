"""Scale-out on Ray Serve: the same load through `tfgen serve` (one uvicorn process) and through Ray Serve's proxy
in front of 1 and 2 replicas (tfgen.serving.ray) on a local Ray cluster.

The load: --clients concurrent greedy requests of --max-tokens tokens each (min_tokens = max_tokens, so each makes
exactly that many), one untimed round first (warm-up), then --rounds timed rounds; tokens/s is all tokens over the
wall time of a round (the best round is reported). Ray gets --ray-cpus CPUs, one reserved per replica.
On a machine with fewer cores than replicas times a replica's threads, more replicas cannot be faster.

    python benchmarks/ray_serve.py                          # ko-mini (XLA), 16 clients
    python benchmarks/ray_serve.py --model exports/ko-mini-int8 --small
"""

import argparse
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _harness import (
    command_line,
    format_table,
    machine_info,
    print_machine,
    results_path,
    write_results,
)
from serve_speed import PROMPTS  # the same prompts as the single server's benchmark

STARTUP_SECONDS = 900


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url, process=None):
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, "the server exited during startup"
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready")


def run_load(url, model_name, clients, max_tokens):
    """(wall seconds, completion tokens) of `clients` concurrent greedy requests."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(i):
        response = client.completions.create(
            model=model_name,
            prompt=PROMPTS[i % len(PROMPTS)],
            temperature=0,
            max_tokens=max_tokens,
            extra_body={"min_tokens": max_tokens},
        )
        return response.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(clients)))
    return time.perf_counter() - start, tokens


def measure(name, url, model_name, args):
    run_load(url, model_name, args.clients, args.max_tokens)  # warm-up: the first requests' programs, caches
    rounds = [run_load(url, model_name, args.clients, args.max_tokens) for _ in range(args.rounds)]
    wall, tokens = min(rounds)
    row = {
        "server": name,
        "clients": args.clients,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "rounds_wall_s": [w for w, _ in rounds],
    }
    print(f"{name}: {tokens} tokens in {wall:.2f} s, {tokens / wall:.1f} tokens/s", flush=True)
    return row


def single_server(args, model_name):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tfgen",
            "serve",
            "--model",
            args.model,
            "--port",
            str(port),
            "--max-batch",
            str(args.max_batch),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(url, process)
        return measure("tfgen serve", url, model_name, args)
    finally:
        process.terminate()
        process.wait(timeout=300)


def ray_servers(args, settings):
    import ray
    from ray import serve

    from tfgen.serving.ray import APP_NAME, application

    ray.init(
        "local", num_cpus=args.ray_cpus, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False
    )
    rows = []
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for replicas in args.replicas:
            serve.run(application(args.model, settings, replicas=replicas), name=APP_NAME, route_prefix="/")
            rows.append(measure(f"ray, {replicas} replica(s)", f"http://127.0.0.1:{port}", settings.model_name, args))
            serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ko-mini", help="checkpoint, embedded model or LiteRT export")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="smoke run: 4 clients, 8 tokens, 1 round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.small:
        args.clients, args.max_tokens, args.rounds = 4, 8, 1

    from tfgen.serving.app import ServerSettings
    from tfgen.serving.run import served_model_name

    info, command = machine_info(), command_line()
    print_machine(info, command)
    settings = ServerSettings(model_name=served_model_name(args.model), max_batch=args.max_batch)
    rows = [single_server(args, settings.model_name), *ray_servers(args, settings)]
    print()
    print(
        format_table(
            rows,
            [
                ("server", "server", "{}"),
                ("clients", "clients", "{}"),
                ("wall s", "wall_s", "{:.2f}"),
                ("tokens", "tokens", "{}"),
                ("tokens/s", "tokens_per_s", "{:.1f}"),
            ],
        )
    )
    write_results(
        results_path("ray_serve", args.small, args.json),
        {
            "machine": info,
            "command": command,
            "model": args.model,
            "max_tokens": args.max_tokens,
            "max_batch": args.max_batch,
            "ray_cpus": args.ray_cpus,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
