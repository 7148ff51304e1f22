"""The `tfgen` command line.

Bad input ends with exit code 2 and a one-line message naming the problem; no traceback.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from tfgen import __version__, _env

EXIT_USAGE = 2
_BATCH = 16  # prompts decoded together
_EARLY_STOPPING = {"true": True, "false": False, "never": "never"}
_XLA = {"auto": "auto", "on": True, "off": False}


class UsageError(Exception):
    """Input the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _read_texts(args_texts, noun="prompt"):
    """The texts given as arguments, else one per line from stdin; `noun` names them in errors."""
    if args_texts:
        texts = args_texts
        for i, text in enumerate(texts, 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"{noun} {i} is not valid UTF-8; pass UTF-8 text") from None
    else:
        data = sys.stdin.buffer.read()
        try:
            texts = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise UsageError(
                f"standard input is not UTF-8 (bad byte at offset {error.start}); convert it to UTF-8"
            ) from None
        if not texts:
            raise UsageError(f"no {noun}: give {noun}s as arguments or one per line on standard input")
    for i, text in enumerate(texts, 1):
        if not text.strip():
            raise UsageError(f"{noun} {i} is empty; give some text")
    return texts


def _generation_kwargs(args):
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_return_sequences=args.num_return_sequences,
        seed=args.seed,
        num_beams=args.num_beams,
        early_stopping=_EARLY_STOPPING[args.early_stopping],
        length_penalty=args.length_penalty,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        min_new_tokens=args.min_new_tokens,
    )


def _load_model(name_or_path):
    from tfgen.litert import LiteRTLM, is_litert_dir

    if is_litert_dir(name_or_path):  # runs without TensorFlow
        lm = LiteRTLM(name_or_path)
    else:
        from tfgen.model import CausalLM

        lm = CausalLM.from_pretrained(name_or_path)
    if lm.tokenizer is None:
        raise UsageError(f"{name_or_path} has no tokenizer files; save the model with its tokenizer")
    return lm


def _generate(args):
    from tfgen.generation.options import resolve_options

    prompts = _read_texts(args.prompts)
    kwargs = _generation_kwargs(args)
    resolve_options(1, **kwargs)  # fail on bad settings before loading the model
    if args.stream and (args.json or args.num_beams > 1 or args.num_return_sequences > 1):
        raise UsageError(
            "--stream prints one sequence per prompt as it is decoded; drop --json, --num-beams "
            "and --num-return-sequences, or drop --stream"
        )
    lm = _load_model(args.model)
    if args.stream:
        for prompt in prompts:
            for piece in lm.stream_text(prompt, return_full_text=True, **kwargs):
                print(piece, end="", flush=True)
            print(flush=True)
        return
    for start in range(0, len(prompts), _BATCH):
        batch = prompts[start : start + _BATCH]
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


def _print_score(text, result):
    print(f"{text}\tperplexity {result['perplexity']:.4f}")
    print(f"  {result['tokens'][0]}")  # context only: the first token has no probability
    for token, logprob in zip(result["tokens"][1:], result["token_logprobs"]):
        print(f"  {token.replace(' ', '▁')}  {math.exp(logprob):.4f}")  # '▁' keeps a leading space visible


def _score(args):
    texts = _read_texts(args.texts, noun="text")
    lm = _load_model(args.model)
    for text, result in zip(texts, lm.score(texts, stride=args.stride)):
        if args.json:
            print(json.dumps({"text": text, **result}, ensure_ascii=False))
        else:
            _print_score(text, result)


def _finetune(args):
    from tfgen.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(
        model=args.model,
        train=args.train,
        valid=args.valid,
        output=args.output,
        valid_fraction=args.valid_fraction,
        epochs=args.epochs,
        batch_size=args.batch_size,
        block_size=args.block_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        layout=args.layout,
        document=args.document,
        mixed_precision=args.mixed_precision,
        jit_compile=_XLA[args.xla],
        resume=args.resume,
        seed=args.seed,
        lora_rank=args.lora_rank,
    )
    finetune(settings)
    print(f"checkpoint: {Path(args.output) / 'checkpoint'}")


def _train_tokenizer(args):
    from tfgen.checkpoint import atomic_directory
    from tfgen.data import check_text_files, read_documents
    from tfgen.tokenizer import train_sentencepiece

    check_text_files(args.files, args.document)
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"{output} already exists and is not an empty directory; choose a new --output")
    with atomic_directory(output) as staging:
        tokenizer = train_sentencepiece(
            read_documents(args.files, args.document), staging, args.vocab_size, model_type=args.model_type
        )
    print(f"{output}: SentencePiece {args.model_type} tokenizer, {tokenizer.vocab_size} pieces")


def _export(args):
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise UsageError(
            f"{output} already exists and is not an empty directory; choose a new OUTPUT_DIR "
            "or pass --overwrite to replace it"
        )
    if args.format == "saved_model" and (args.rows, args.chunk) != (None, None):
        raise UsageError("--rows and --chunk are for --format litert; a SavedModel decodes any number of rows")
    if args.format == "litert" and args.num_beams is not None:
        raise UsageError("--num-beams is for --format saved_model; the LiteRT export has no beam search")
    if args.format == "saved_model" and args.quantize is not None:
        raise UsageError("--quantize is for --format litert; a SavedModel keeps the checkpoint's weights")
    if args.format == "saved_model" and args.part_mb is not None:
        raise UsageError("--part-mb is for --format litert; a SavedModel is one graph")
    if args.format == "litert":
        _export_litert(args.model, output, args)
    else:
        from tfgen.model import CausalLM

        _export_saved_model(CausalLM.from_pretrained(args.model), output, args)


def _export_litert(model, output, args):
    _env.return_freed_memory()
    from tfgen.export import export_litert
    from tfgen.export.litert import DEFAULT_CHUNK, DEFAULT_ROWS
    from tfgen.export.parts import PART_BYTES
    from tfgen.litert import read_config

    part_bytes = PART_BYTES if args.part_mb is None else args.part_mb * 2**20
    export_litert(
        model,
        output,
        quantize=args.quantize or "int8",
        capacity=args.capacity,
        rows=args.rows or DEFAULT_ROWS,
        chunk=args.chunk or DEFAULT_CHUNK,
        part_bytes=part_bytes,
    )
    config = read_config(output)
    parts = len(config["parts"])
    print(
        f"{output}: LiteRT model{f' in {parts} parts' if parts > 1 else ''}, {config['quantize']} weights; "
        f"capacity {config['capacity']} tokens "
        f"(prompt + new), up to {config['row_tiers'][-1]} rows at once; run it with `tfgen generate --model "
        f"{output}`, `tfgen serve --model {output}` or tfgen.litert.LiteRTLM"
    )


def _export_saved_model(lm, output, args):
    from tfgen.export.saved_model import DEFAULT_NUM_BEAMS, export_saved_model

    num_beams = args.num_beams or DEFAULT_NUM_BEAMS
    export_saved_model(lm, output, capacity=args.capacity, num_beams=num_beams)
    if lm.tokenizer is not None and lm.tokenizer.sentencepiece_model() is not None:
        serving = "prompts -> completions, sequences"
    else:
        serving = "input_ids, attention_mask -> sequences (text in and out needs a SentencePiece tokenizer)"
    print(
        f"{output}: TF SavedModel; serving_default: {serving}; generate_ids; generate_beam ({num_beams} "
        f"beams); capacity {args.capacity or lm.config.n_positions} tokens (prompt + new)"
    )


def _serve(args):
    import os

    try:
        from tfgen.serving.app import ServerSettings
        from tfgen.serving.run import serve, served_model_name
    except ImportError as error:
        raise UsageError(f"tfgen serve needs the serve extra ({error}): pip install 'tfgen[serve]'") from None
    ray_options = {name: getattr(args, name) for name in _RAY_ONLY if getattr(args, name) is not None}
    if ray_options and not args.ray:
        flag = "--" + next(iter(ray_options)).replace("_", "-")
        raise UsageError(f"{flag} is for --ray; add --ray to serve on Ray Serve")
    settings = ServerSettings(
        model_name=served_model_name(args.model),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=args.api_key or os.environ.get("TFGEN_API_KEY") or None,
        request_timeout=args.request_timeout,
        prefix_cache_tokens=args.prefix_cache_tokens,
    )
    if args.ray:
        _serve_on_ray(args, settings, ray_options)
    else:
        serve(args.model, args.host, args.port, settings, chat_template=args.chat_template)


_RAY_ONLY = ("replicas", "ray_address", "replica_cpus", "replica_gpus")


def _serve_on_ray(args, settings, ray_options):
    try:
        from tfgen.serving.ray import serve_on_ray
    except ImportError as error:
        raise UsageError(f"tfgen serve --ray needs Ray Serve ({error}): pip install 'tfgen[ray]'") from None
    serve_on_ray(
        args.model, args.host, args.port, settings, chat_template=args.chat_template, **ray_options
    )  # its defaults for the options not given


def _int_from(low, what):
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a {what} integer, got {text}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid integer value"
    return parse


_positive_int = _int_from(1, "positive")
_non_negative_int = _int_from(0, "non-negative")


def _add_model_argument(parser):
    parser.add_argument(
        "--model",
        default="ko-mini",
        help="checkpoint directory, hub id (e.g. skt/kogpt2-base-v2) or embedded model "
        "(default: ko-mini, tfgen's own small Korean GPT-2)",
    )


def _add_generate(subparsers):
    p = subparsers.add_parser("generate", help="continue prompts with a GPT-2 model")
    p.add_argument(
        "prompts", nargs="*", metavar="PROMPT", help="text to continue; none: one prompt per line from stdin"
    )
    _add_model_argument(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens when sampling (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this probability (1: off)")
    p.add_argument(
        "--num-return-sequences",
        type=int,
        default=1,
        help="sequences per prompt: sampled, or the best beams (at most --num-beams)",
    )
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: off)")
    p.add_argument(
        "--early-stopping",
        choices=list(_EARLY_STOPPING),
        default="false",
        help="when beam search stops, as transformers' early_stopping",
    )
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam scores are divided by length to this power")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise tokens already present (1: off)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size (0: off)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="no EOS before this many new tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.add_argument(
        "--stream",
        action="store_true",
        help="print each completion as it is decoded (one prompt at a time; not with beams)",
    )
    p.set_defaults(run=_generate)


def _add_score(subparsers):
    p = subparsers.add_parser("score", help="per-token probabilities and perplexity of texts")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="text to score; none: one text per line from stdin")
    _add_model_argument(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per text per line: text, tokens, token_logprobs, logprob, perplexity",
    )
    p.add_argument(
        "--stride",
        type=_positive_int,
        default=None,
        metavar="N",
        help="a text longer than the model's context is scored in windows of the context, each N "
        "tokens after the one before (less than the context; default: half the context)",
    )
    p.set_defaults(run=_score)


def _add_finetune(subparsers):
    p = subparsers.add_parser("finetune", help="fine-tune a model on text files with Keras fit")
    _add_model_argument(p)
    p.add_argument("--train", nargs="+", required=True, metavar="FILE", help="UTF-8 text files to train on")
    p.add_argument("--valid", nargs="+", metavar="FILE", help="UTF-8 text files to validate on after each epoch")
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=0.0,
        help="without --valid: hold out this fraction of the training documents for validation",
    )
    p.add_argument("--output", required=True, help="run directory: checkpoint/, training_log.csv, loss.png")
    p.add_argument("--epochs", type=_positive_int, default=1)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--block-size", type=_positive_int, default=128, help="tokens per training row")
    p.add_argument("--learning-rate", type=float, default=5e-5, help="peak learning rate of AdamW")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 5%% of the steps)")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many steps in all")
    p.add_argument(
        "--save-steps",
        type=_positive_int,
        default=None,
        help="also checkpoint every this many steps (default: after each epoch)",
    )
    p.add_argument(
        "--layout",
        choices=["packed", "documents"],
        default="packed",
        help="packed: documents joined into full blocks; documents: one padded document per row",
    )
    p.add_argument(
        "--document",
        choices=["line", "paragraph"],
        default="line",
        help="a document is a line, or a paragraph of lines ended by a blank line",
    )
    p.add_argument(
        "--mixed-precision",
        action="store_true",
        help="bfloat16 on CPUs that have it, float16 with loss scaling on GPUs",
    )
    p.add_argument(
        "--xla",
        choices=list(_XLA),
        default="auto",
        help="compile the train step with XLA (auto: on GPUs and TPUs; on CPUs it measured no faster)",
    )
    p.add_argument(
        "--lora-rank",
        type=_positive_int,
        default=None,
        metavar="R",
        help="train only rank-R LoRA adapters on the attention projections (the base stays frozen); "
        "checkpoint/ gets merged weights, checkpoint/adapter/ the adapter in PEFT's layout",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed for the data order and dropout")
    p.set_defaults(run=_finetune)


def _add_tokenizer(subparsers):
    p = subparsers.add_parser("tokenizer", help="tokenizer tools")
    tools = p.add_subparsers(dest="tool", required=True, parser_class=_Parser)
    train = tools.add_parser("train", help="train a SentencePiece tokenizer (<s> </s> <pad> <unk>) on text files")
    train.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    train.add_argument("--vocab-size", type=_positive_int, required=True)
    train.add_argument("--output", required=True, help="new directory for tokenizer.model and its config files")
    train.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    train.add_argument(
        "--document",
        choices=["line", "paragraph"],
        default="line",
        help="a training sentence is a line, or a paragraph of lines ended by a blank line",
    )
    train.set_defaults(run=_train_tokenizer)


def _add_export(subparsers):
    p = subparsers.add_parser(
        "export",
        help="write a TF SavedModel that serves generation (strings in, strings out), "
        "or a LiteRT model that runs without TensorFlow",
    )
    p.add_argument(
        "model", metavar="MODEL_DIR_OR_NAME", help="checkpoint directory, hub id or embedded model (ko-mini)"
    )
    p.add_argument("output", metavar="OUTPUT_DIR", help="new directory for the export")
    p.add_argument(
        "--format",
        choices=["saved_model", "litert"],
        default="saved_model",
        help="saved_model: a TF SavedModel; litert: model.tflite, the tokenizer and litert.json, "
        'for tfgen.litert.LiteRTLM (pip install "tfgen[litert]")',
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4", "fp16", "none"],
        default=None,
        help="LiteRT weights: int8 (default), int4 (blockwise; needs ai-edge-quantizer, "
        'pip install "tfgen[litert]"), fp16 or none (float32)',
    )
    p.add_argument(
        "--capacity",
        type=_positive_int,
        default=None,
        help="most tokens a request may use, longest prompt plus max_new_tokens (default: the model's "
        "context for a SavedModel, 256 or the context for LiteRT)",
    )
    p.add_argument(
        "--rows",
        type=_positive_int,
        default=None,
        help="LiteRT: the most rows decoded at once, `tfgen serve --max-batch` at most (default 16)",
    )
    p.add_argument(
        "--chunk", type=_positive_int, default=None, help="LiteRT: prompt tokens prefilled per call (default 32)"
    )
    p.add_argument(
        "--part-mb",
        type=_positive_int,
        default=None,
        help="LiteRT: the float32 weights of one part in MiB (default 256): the model is read from the "
        "checkpoint and converted a part at a time, so the export's memory grows with this, not "
        "with the model",
    )
    p.add_argument(
        "--num-beams",
        type=_positive_int,
        default=None,
        help="beam count of the SavedModel's generate_beam signature (default 4)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it holds something")
    p.set_defaults(run=_export)


def _float_where(accepts, what):
    def parse(text):
        value = float(text)
        if not accepts(value):  # NaN is refused too
            raise argparse.ArgumentTypeError(f"must be a {what} number, got {text}")
        return value

    parse.__name__ = "float"  # argparse names the type in "invalid float value"
    return parse


_positive_float = _float_where(lambda value: value > 0, "positive")
_non_negative_float = _float_where(lambda value: value >= 0, "non-negative")


def _add_serve(subparsers):
    from tfgen.serving.prefix_cache import BLOCK_TOKENS, DEFAULT_TOKENS

    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible completions and chat server with a playground page at /"
    )
    _add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=_positive_int, default=16, help="decode slots: rows decoded together")
    p.add_argument(
        "--max-queue",
        type=_non_negative_int,
        default=64,
        help="rows that may wait for a slot; beyond it requests get 429 with Retry-After",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1/ (default: $TFGEN_API_KEY; unset: no key)",
    )
    p.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds a request may take from arrival; past it its text ends (finish_reason length)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja2 chat template for /v1/chat/completions (default: the model's `chat_template` in "
        "tokenizer_config.json; an example: tfgen/serving/templates/interview.jinja)",
    )
    p.add_argument(
        "--prefix-cache-tokens",
        type=_non_negative_int,
        default=DEFAULT_TOKENS,
        help="prompt prefixes whose keys and values are kept for requests that start alike, in tokens "
        f"(blocks of {BLOCK_TOKENS}, least recently used dropped; 0: off; default {DEFAULT_TOKENS})",
    )
    ray = p.add_argument_group("scale-out on Ray Serve (pip install 'tfgen[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="serve N replicas of the server, each with its own model, behind Ray Serve's HTTP proxy",
    )
    ray.add_argument("--replicas", type=_positive_int, default=None, metavar="N", help="replicas (default 1)")
    ray.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="the Ray cluster to join, as ray.init takes it (auto: the one `ray start` runs on this "
        "machine; local: always a new one; default: $RAY_ADDRESS, else the one `ray start` runs "
        "here, else a new one)",
    )
    ray.add_argument(
        "--replica-cpus",
        type=_non_negative_float,
        default=None,
        metavar="CPUS",
        help="CPUs Ray reserves per replica (default 1)",
    )
    ray.add_argument(
        "--replica-gpus",
        type=_non_negative_float,
        default=None,
        metavar="GPUS",
        help="GPUs Ray reserves per replica (default 0)",
    )
    p.set_defaults(run=_serve)


def build_parser():
    parser = _Parser(prog="tfgen", description="GPT-2 and GPT-J text generation for TensorFlow/Keras")
    parser.add_argument("--version", action="version", version=f"tfgen {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(subparsers)
    _add_score(subparsers)
    _add_finetune(subparsers)
    _add_tokenizer(subparsers)
    _add_export(subparsers)
    _add_serve(subparsers)
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
