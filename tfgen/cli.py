"""The `tfgen` command line.

Bad input ends with exit code 2 and a one-line message naming the problem; no traceback.
"""

import argparse
import json
import sys

EXIT_USAGE = 2
_BATCH = 16  # prompts decoded together


class UsageError(Exception):
    """Input the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _read_prompts(args_prompts):
    if args_prompts:
        prompts = args_prompts
        for i, prompt in enumerate(prompts, 1):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"prompt {i} is not valid UTF-8; pass UTF-8 text") from None
    else:
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UsageError(f"standard input is not UTF-8 (bad byte at offset {error.start}); convert it to UTF-8") from None
        prompts = text.splitlines()
        if not prompts:
            raise UsageError("no prompt: give prompts as arguments or one per line on standard input")
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise UsageError(f"prompt {i} is empty; give some text to continue")
    return prompts


def _generation_kwargs(args):
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_return_sequences=args.num_return_sequences,
        seed=args.seed,
    )


def _load_model(name_or_path):
    from tfgen.model import GPT2LM

    lm = GPT2LM.from_pretrained(name_or_path)
    if lm.tokenizer is None:
        raise UsageError(f"{name_or_path} has no tokenizer files; save the model with its tokenizer")
    return lm


def _generate(args):
    from tfgen.generation.options import resolve_options

    prompts = _read_prompts(args.prompts)
    kwargs = _generation_kwargs(args)
    resolve_options(1, **kwargs)  # fail on bad settings before loading the model
    lm = _load_model(args.model)
    for start in range(0, len(prompts), _BATCH):
        batch = prompts[start:start + _BATCH]
        for prompt, completions in zip(batch, lm.complete(batch, **kwargs)):
            if args.json:
                record = {
                    "prompt": prompt,
                    "completions": [c.new_text for c in completions],
                    "token_ids": [c.new_token_ids for c in completions],
                }
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif len(completions) == 1:
                print(completions[0].text, flush=True)
            else:
                for i, completion in enumerate(completions, 1):
                    print(f"[{i}] {completion.text}", flush=True)


def _add_generate(subparsers):
    p = subparsers.add_parser("generate", help="continue prompts with a GPT-2 model")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text to continue; none: one prompt per line from stdin")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (e.g. skt/kogpt2-base-v2)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens when sampling (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this probability (1: off)")
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.set_defaults(run=_generate)


def build_parser():
    parser = _Parser(prog="tfgen", description="GPT-2 text generation for TensorFlow/Keras")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(subparsers)
    return parser


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except (UsageError, ValueError, OSError, ImportError) as error:
        print(f"tfgen: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
