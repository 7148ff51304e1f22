"""What the benchmark scripts share: the model shapes, machine info, peak RSS, timing, the table, the results file.

Nothing here imports a framework (transformers only inside gpt2_config), so a
benchmark's parent process stays light and each child imports only its own.
The scripts run as `python benchmarks/NAME.py`, which puts this folder on sys.path.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VERSIONED_PACKAGES = ["tensorflow", "tf-keras", "transformers", "torch", "numpy"]
SPECIAL_TOKENS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3}
SMALL_SHAPE = {"vocab_size": 1000, "n_positions": 1024, "n_embd": 64, "n_layer": 2, "n_head": 4}
BASE_SHAPE = {"vocab_size": 51200, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}  # KoGPT2-base
SHAPE_KEYS = ["n_layer", "n_embd", "n_head", "vocab_size", "n_positions"]
# Models of about 1 B parameters (KoGPT's vocabulary and context; GPT-2's head is tied to its embedding).
GPT2_1B_SHAPE = {"vocab_size": 64512, "n_positions": 2048, "n_embd": 2048, "n_layer": 18, "n_head": 16}
GPTJ_SMALL_SHAPE = {"vocab_size": 1000, "n_positions": 1024, "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8}
GPTJ_1B_SHAPE = {
    "vocab_size": 64512,
    "n_positions": 2048,
    "n_embd": 2048,
    "n_layer": 16,
    "n_head": 16,
    "rotary_dim": 64,
}
KOGPT_6B_SHAPE = {
    "vocab_size": 64512,
    "n_positions": 2048,
    "n_embd": 4096,
    "n_layer": 28,
    "n_head": 16,
    "rotary_dim": 64,
}


def gpt2_shape(small):
    """The GPT-2 sizes (a dict of GPT2Config fields): a tiny smoke-run model, or KoGPT2-base."""
    return dict(SMALL_SHAPE if small else BASE_SHAPE)


def gpt2_config(small):
    return model_config("gpt2", gpt2_shape(small))


def model_config(family, shape):
    """transformers' config of a family ("gpt2", "gptj") with the given sizes and the benchmarks' special ids."""
    from transformers import GPT2Config, GPTJConfig

    return {"gpt2": GPT2Config, "gptj": GPTJConfig}[family](**shape, **SPECIAL_TOKENS)


def seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def peak_rss_mib():
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that over from the parent through exec."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024  # kB


def usable_cores():
    return len(os.sched_getaffinity(0))


def machine_info():
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "load_average": os.getloadavg(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": versions,
    }


def command_line():
    """How this script was run, as a shell line: `python benchmarks/NAME.py ...`."""
    return " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv])


def print_machine(info, command):
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items() if version)
    print(
        f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), load average at start "
        f"{' '.join(f'{load:.2f}' for load in info['load_average'])}; {info['date']}"
    )
    print(f"versions: python {info['python']}, {versions}")
    print(f"command: {command}")


def format_table(rows, columns):
    """columns: (heading, row key, format); the first two columns left-aligned, "-" for a missing value."""
    cells = [[heading for heading, _, _ in columns]]
    cells += [["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths))
        )
        for line in cells
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def results_path(name, small, override=None):
    """--json, else benchmarks/results/NAME.json (NAME-small.json for a smoke run, which git ignores)."""
    return override or RESULTS_DIR / (f"{name}-small.json" if small else f"{name}.json")


def write_results(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {path}")
