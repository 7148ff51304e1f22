"""What bfloat16 inference costs in quality: ko-mini's held-out perplexity in float32 and in bfloat16.

Scores the validation split of each source that recipes/ko_mini.py held out
(run its prepare stage first) with the embedded model, once with float32
weights and once with `GPT2LM.from_pretrained("ko-mini", dtype="bfloat16")`.

    python benchmarks/precision_quality.py [--work runs/ko-mini]
"""

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from _harness import command_line, machine_info, print_machine, results_path, write_results  # noqa: E402
from ko_mini import SOURCES, model_figures  # noqa: E402  (imports tfgen first)
from tfgen import GPT2LM  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "runs" / "ko-mini",
        help="the recipe's work directory (its corpus/*.valid.txt are scored)",
    )
    args = parser.parse_args()
    if not (args.work / "corpus" / "wikipedia.valid.txt").is_file():
        sys.exit(f"no validation text in {args.work / 'corpus'}; run: python recipes/ko_mini.py prepare")
    info, command = machine_info(), command_line()
    figures = {
        dtype: model_figures(GPT2LM.from_pretrained("ko-mini", dtype=dtype), args.work)
        for dtype in ("float32", "bfloat16")
    }
    print_machine(info, command)
    print(f"{'source':<10} {'tokens':>8} {'ppl fp32':>9} {'ppl bf16':>9} {'change':>8}")
    for name in SOURCES:
        fp32, bf16 = figures["float32"][name], figures["bfloat16"][name]
        ppl32, ppl16 = math.exp(fp32["loss"]), math.exp(bf16["loss"])
        print(f"{name:<10} {fp32['tokens']:>8,} {ppl32:>9.3f} {ppl16:>9.3f} {100 * (ppl16 / ppl32 - 1):>+7.2f}%")
    write_results(
        results_path("precision_quality", False, None), {"machine": info, "command": command, "figures": figures}
    )


if __name__ == "__main__":
    main()
