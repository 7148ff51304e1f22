"""Writes docs/performance.md from benchmarks/results/*.json: one current table per benchmark.

Each result file holds the machine it ran on (CPU, cores, load average at start, date, versions) and the command.
A file gives one or more tables ("parts"); parts of the same benchmark, part and subject (the model, the servers,
the quantizations compared) compete, and the page shows the newest quiet one (load average at start at most the
usable cores), else the newest. Older runs stay in their files.

    python benchmarks/report.py            # rewrite docs/performance.md
    python benchmarks/report.py --check    # exit 1 when docs/performance.md is not what the results give
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
PAGE = REPO / "docs" / "performance.md"

INTRO = """# Performance

One table per benchmark: the newest quiet run in `benchmarks/results/` (a run whose load average at start was at
most the machine's usable cores), else the newest run, flagged. Every run's file keeps its machine, date, library
versions and command; older runs stay there. This page is written by `python benchmarks/report.py` (a test checks
that it is current): do not edit it by hand.

Figures from different machines or days are not comparable with each other; compare the columns of one table.
"""


# A column: (heading, key, format); a column whose key no row has is left out.
def col(heading, key, fmt="{:,.1f}"):
    return heading, key, fmt


TOKENS_S = col("tokens/s", "tokens_per_s")
TTFT = [col("TTFT p50 ms", "ttft_p50_ms", "{:,.0f}"), col("TTFT p99 ms", "ttft_p99_ms", "{:,.0f}")]


def markdown_table(rows, columns):
    columns = [c for c in columns if any(row.get(c[1]) is not None for row in rows)]
    lines = ["| " + " | ".join(heading for heading, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot(rows, row_key, column_key, value):
    """rows -> one dict per distinct row_key, with a key per column_key holding value(row)."""
    table = {}
    for row in rows:
        line = table.setdefault(row_key(row), {"": row_key(row)})
        line[row[column_key]] = value(row)
    return list(table.values())


def pivot_columns(rows, column_key, fmt="{:,.1f}"):
    names = list(dict.fromkeys(row[column_key] for row in rows))
    return [col("", "", "{}")] + [col(name, name, fmt) for name in names]


def generate_speed(record):
    def label(row):
        if row["case"] == "first-call":
            return "first call of a fresh process, s"
        if row["case"] == "new-length":
            return f"first call at a new prompt length, s ({row['new_tokens']} new tokens)"
        return f"{row['case']}, {row['new_tokens']} new tokens, tokens/s"

    def value(row):
        return row.get("tokens_per_s") or row.get("new_prompt_s") or row.get("first_call_s")

    rows = pivot(record["results"], label, "implementation", value)
    memory = {r["implementation"]: r["peak_rss_mib"] for r in record["results"] if r.get("peak_rss_mib")}
    if memory:
        rows.append({"": "peak RSS, MiB", **memory})
    family = record["settings"].get("family", "gpt2")
    title = f"Generation speed, {family.upper().replace('GPT2', 'GPT-2').replace('GPTJ', 'GPT-J')} {shape(record)}"
    return [
        (
            "generate_speed",
            family,
            title,
            markdown_table(rows, pivot_columns(record["results"], "implementation", "{:,.4g}")),
        )
    ]


def shape(record):
    model = record.get("model") or {}
    if not model.get("n_layer"):
        return ""
    return f"({model['n_layer']} x {model['n_embd']}, vocabulary {model['vocab_size']:,})"


def serve_speed(record):
    servers = record["settings"].get("servers", ["tfgen", "plain"])
    columns = [
        col("model", "model", "{}"),
        col("server", "server", "{}"),
        col("clients", "clients", "{}"),
        TOKENS_S,
        *TTFT,
        col("peak RSS MiB", "server_peak_rss_mib", "{:,.0f}"),
    ]
    subject = " and ".join(servers)
    return [("serve_speed", subject, f"Serving: {subject} servers", markdown_table(record["rows"], columns))]


def litert_speed(record):
    parts = []
    speed = (record.get("speed") or {}).get("rows")
    if speed:
        formats = ", ".join(
            dict.fromkeys(row["name"].split()[1].rstrip(",") for row in speed if row["name"].startswith("LiteRT"))
        )
        columns = [
            col("", "name", "{}"),
            TOKENS_S,
            col("x tfgen fp32", "vs_tfgen", "{:.2f}"),
            col("ms/token", "token_ms"),
            col("`decode` ms", "decode_invoke_ms", "{:.2f}"),
            col("`next_token` ms", "next_token_invoke_ms", "{:.2f}"),
            col("size MB", "size_mb"),
            col("convert s", "conversion_s"),
            col("first token s", "first_token_s", "{:.2f}"),
        ]
        parts.append(
            (
                "litert_speed",
                "speed " + formats,
                f"LiteRT export speed, batch 1 ({formats})",
                markdown_table(speed, columns),
            )
        )
    quality = record.get("quality")
    if quality:
        formats = [key[len("ppl_") :] for key in quality[0] if key.startswith("ppl_") and key != "ppl_none"]
        columns = [col("source", "source", "{}"), col("ppl fp32", "ppl_none", "{:.3f}")]
        for name in formats:
            suffix = f"_{name}" if f"change_pct_{name}" in quality[0] else ""
            columns += [
                col(f"{name} change %", f"change_pct{suffix}", "{:+.2f}"),
                col(f"{name} greedy equal", f"greedy_agree{suffix}", "{}"),
                col(f"{name} agreeing prefix", f"mean_agreeing_prefix{suffix}", "{:.1f}"),
            ]
        subject = ", ".join(formats)
        parts.append(
            (
                "litert_quality",
                subject,
                f"LiteRT quality on ko-mini ({subject} against fp32)",
                markdown_table(quality, columns),
            )
        )
    batch = record.get("batch")
    if batch:
        columns = [
            col("", "name", "{}"),
            TOKENS_S,
            col("`decode` ms/step", "decode_invoke_ms", "{:.2f}"),
            col("`next_token` ms/step", "next_token_invoke_ms", "{:.2f}"),
            col("cache write ms/step", "cache_write_ms", "{:.2f}"),
            col("Python ms/step", "python_ms", "{:.2f}"),
        ]
        parts.append(
            (
                "litert_batch",
                "",
                f"LiteRT batched decoding (capacity {batch['capacity']})",
                markdown_table(batch["rows"], columns),
            )
        )
    return parts


def peers(record):
    columns = [
        col("engine", "engine", "{}"),
        col("case", "case", "{}"),
        TOKENS_S,
        col("load s", "load_s", "{:.2f}"),
        col("first call s", "first_call_s", "{:.2f}"),
        col("peak RSS MiB", "peak_rss_mib", "{:,.0f}"),
        col("greedy = PyTorch fp32", "agree_with_reference", "{}"),
    ]
    return [("peers", "", f"Against other CPU engines {shape(record)}", markdown_table(record["summary"], columns))]


def train_speed(record):
    columns = [
        col("case", "case", "{}"),
        col("precision", "precision", "{}"),
        col("XLA", "jit_compile", "{}"),
        TOKENS_S,
        col("s/step", "median_s", "{:.2f}"),
        col("first step s", "first_step_s"),
        col("peak RSS MiB", "peak_rss_mib", "{:,.0f}"),
    ]
    return [("train_speed", "", f"Fine-tuning speed {shape(record)}", markdown_table(record["results"], columns))]


def export_speed(record):
    model = record["settings"].get("model") or "KoGPT2-base size"
    columns = [
        col("case", "case", "{}"),
        col("in process s", "in_process_s", "{:.3f}"),
        col("SavedModel s", "savedmodel_s", "{:.3f}"),
        col("speed ratio", "speed_ratio", "{:.2f}"),
        col("same output", "same_output", "{}"),
    ]
    return [
        (
            "export_speed",
            model,
            f"SavedModel against in-process generate, {model}",
            markdown_table(record["results"], columns),
        )
    ]


def checkpoint_load(record):
    columns = [
        col("reader", "case", "{}"),
        col("median s", "median_seconds", "{:.2f}"),
        col("RSS added MiB", "added_rss_mib", "{:,.0f}"),
    ]
    title = f"Reading a {record['file_mib']:.0f} MiB `pytorch_model.bin`"
    return [("checkpoint_load", "", title, markdown_table(record["rows"], columns))]


def big_checkpoint(record):
    columns = [
        col("family", "family", "{}"),
        col("dtype", "dtype", "{}"),
        col("parameters", "parameters", "{:,}"),
        col("weights MiB", "weights_mib", "{:,.0f}"),
        col("load s", "load_s", "{:.0f}"),
        col("load peak / weights", "load_peak_over_weights", "{:.3f}"),
        col("kept / weights", "kept_over_weights", "{:.3f}"),
        col("first call s", "first_call_s"),
        col("tokens/s", "tokens_per_s", "{:.2f}"),
        col("peak RSS MiB", "peak_rss_mib", "{:,.0f}"),
    ]
    subject = record["rows"][0]["shape"]
    return [("big_checkpoint", subject, f"Big checkpoints: {subject} shape", markdown_table(record["rows"], columns))]


def decode_state(record):
    parts = []
    if record.get("streaming"):
        s = record["streaming"]
        row = {
            "streamed / plain": s["streamed_over_plain"],
            "first token share": s["first_token_share"],
            "new tokens": s["new_tokens"],
            "same tokens": s["same_tokens"],
        }
        columns = [
            col(key, key, fmt)
            for key, fmt in [
                ("new tokens", "{}"),
                ("streamed / plain", "{:.2f}"),
                ("first token share", "{:.1%}"),
                ("same tokens", "{}"),
            ]
        ]
        parts.append(("decode_state", "streaming", "Streaming against a plain call", markdown_table([row], columns)))
    if record.get("no_compile"):
        columns = [
            col("prompt", "prompt", "{}"),
            col("new tokens", "new_tokens", "{}"),
            col("traces", "traces", "{}"),
            col("first call s", "first_s", "{:.3f}"),
            col("second call s", "second_s", "{:.3f}"),
        ]
        parts.append(
            (
                "decode_state",
                "no_compile",
                "Unseen prompt lengths: no recompilation",
                markdown_table(record["no_compile"], columns),
            )
        )
    if record.get("tiers"):
        rows = pivot(record["tiers"], lambda row: f"batch {row['batch']}", "capacity", lambda row: row["step_ms"])
        columns = [col("decode step ms", "decode step ms", "{}")] + [
            col(f"capacity {c}", c) for c in dict.fromkeys(row["capacity"] for row in record["tiers"])
        ]
        for row in rows:
            row["decode step ms"] = row.pop("")
        parts.append(("decode_state", "tiers", "Decode step by capacity tier", markdown_table(rows, columns)))
    if record.get("fresh_processes"):
        columns = [
            col("process", "process", "{}"),
            col("wall s", "wall_s"),
            col("import s", "import_s"),
            col("load s", "load_s"),
            col("generate s", "generate_s", "{:.2f}"),
        ]
        parts.append(
            (
                "decode_state",
                "fresh_processes",
                "A fresh process: import, load, first generate",
                markdown_table(record["fresh_processes"], columns),
            )
        )
    return parts


def precision_quality(record):
    figures = record["figures"]
    rows = [
        {"": source, **{dtype: figures[dtype][source]["bits_per_character"] for dtype in figures}}
        for source in next(iter(figures.values()))
    ]
    columns = [col("bits per character", "", "{}")] + [col(dtype, dtype, "{:.4f}") for dtype in figures]
    return [("precision_quality", "", "ko-mini's quality by precision", markdown_table(rows, columns))]


def litert_big(record):
    columns = [
        col("engine", "engine", "{}"),
        col("convert s", "convert_s", "{:,.0f}"),
        col("convert peak / checkpoint", "convert_peak_over_checkpoint", "{:.2f}"),
        col("size GB", "size_gb", "{:.2f}"),
        col("first load s", "cold_load_s"),
        col("load s", "load_s"),
        col("first token s", "first_token_s", "{:.2f}"),
        col("batch 1 tokens/s", "b1_tokens_per_s", "{:.2f}"),
        col("batch 8 tokens/s", "b8_tokens_per_s", "{:.2f}"),
        col("decode peak RSS MiB", "peak_rss_decode_mib", "{:,.0f}"),
        col("batch 1 bandwidth use", "bandwidth_fraction", "{:.0%}"),
    ]
    shape = record["shape"]
    title = (
        f"Big GPT-J through LiteRT: {shape['n_layer']} x {shape['n_embd']}, vocabulary {shape['vocab_size']} "
        f"({record['checkpoint_bytes'] / 2**30:.1f} GiB fp16 checkpoint; memory read bandwidth "
        f"{record['bandwidth_gb_s']:.1f} GB/s)"
    )
    if not any(row.get("convert_s") is not None for row in record["rows"]):
        return [
            (
                "litert_big_decode",
                f"{shape['n_layer']}x{shape['n_embd']}",
                title + ", decoding models converted before",
                markdown_table(record["rows"], columns),
            )
        ]
    return [("litert_big", f"{shape['n_layer']}x{shape['n_embd']}", title, markdown_table(record["rows"], columns))]


def prefix_cache(record):
    columns = [
        col("model", "model", "{}"),
        col("reused tokens", "reused_tokens", "{}"),
        col("without ms", "without_ms", "{:,.0f}"),
        col("with the cache ms", "with_ms", "{:,.0f}"),
        col("ratio", "ratio", "{:.2f}"),
    ]
    title = (
        f"Prefix caching: the first token after a cached {record['prefix_tokens']}-token prefix "
        f"(+{record['suffix_tokens']} tokens)"
    )
    return [("prefix_cache", "", title, markdown_table(record["results"], columns))]


def ray_serve(record):
    columns = [
        col("server", "server", "{}"),
        col("clients", "clients", "{}"),
        col("wall s", "wall_s", "{:.2f}"),
        col("tokens/s", "tokens_per_s", "{:,.0f}"),
    ]
    title = f"Ray Serve replicas: {record['model']}, {record['max_tokens']} tokens per request"
    return [("ray_serve", "", title, markdown_table(record["results"], columns))]


PARTS = {
    "generate_speed": generate_speed,
    "serve_speed": serve_speed,
    "litert_speed": litert_speed,
    "peers": peers,
    "litert_big": litert_big,
    "train_speed": train_speed,
    "export_speed": export_speed,
    "checkpoint_load": checkpoint_load,
    "big_checkpoint": big_checkpoint,
    "decode_state": decode_state,
    "precision_quality": precision_quality,
    "prefix_cache": prefix_cache,
    "ray_serve": ray_serve,
}


def script_name(record):
    """The benchmark a record comes from: `python benchmarks/NAME.py ...` (or `python NAME.py`, run from
    benchmarks/) -> NAME."""
    return next(Path(word).stem for word in record["command"].split() if word.endswith(".py"))


def is_quiet(machine):
    return machine["load_average"][0] <= machine["usable_cores"]


def provenance(record, path):
    machine = record["machine"]
    date = datetime.datetime.fromisoformat(machine["date"]).astimezone(datetime.timezone.utc)
    load = machine["load_average"][0]
    quiet = "quiet" if is_quiet(machine) else "**not quiet**"
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
    return (
        f"{machine['cpu']}, {machine['cores']} cores; {date:%Y-%m-%d %H:%M} UTC; load average at start "
        f"{load:.2f} ({quiet}); Python {machine['python']}, {versions}.  \n"
        f"`{record['command']}` → `benchmarks/results/{path.name}`"
    )


def current_parts(results_dir=RESULTS_DIR):
    """{(benchmark, part, subject): (title, table, record, path)} for the run each table shows."""
    chosen = {}
    for path in sorted(results_dir.glob("*.json")):
        if path.name.endswith("-small.json"):
            continue
        record = json.loads(path.read_text())
        for part, subject, title, table in PARTS[script_name(record)](record):
            key = (script_name(record), part, subject)
            rank = (is_quiet(record["machine"]), record["machine"]["date"])
            if key not in chosen or rank > chosen[key][0]:
                chosen[key] = (rank, title, table, record, path)
    order = list(PARTS)
    return {key: chosen[key][1:] for key in sorted(chosen, key=lambda key: (order.index(key[0]), key[1:]))}


def page(results_dir=RESULTS_DIR):
    sections = [INTRO]
    for title, table, record, path in current_parts(results_dir).values():
        sections.append(f"## {title}\n\n{provenance(record, path)}\n\n{table}\n")
    return "\n".join(sections)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is out of date")
    args = parser.parse_args(argv)
    text = page()
    if args.check:
        if PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
