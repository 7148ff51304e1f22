"""The recipe for tfgen's embedded Korean model, ko-mini: corpus, tokenizers, a size sweep, training in rounds.

    python recipes/ko_mini.py [--data ../shared/data/ko] [--work runs/ko-mini] [--smoke] [stage ...]

Run the same command again after any interruption: each stage skips what an
earlier run finished and training resumes from its last checkpoint (saved every
`save_steps` steps). The full run takes hours; start it in the background with a log:

    nohup python recipes/ko_mini.py >> runs/ko-mini.log 2>&1 &

Training goes in rounds, and a finished round outlives the work folder: the
recipe carries the sweep, every finished round's record and the last round's
float16 weights to recipes/ko-mini-run/ (committed), and a new work folder
resumes from there. So a run spread over machines that keep nothing (a new one
each session) goes on where it stopped; `python recipes/ko_mini.py package`
ships the rounds finished so far.

Stages (all, in order, by default):

- prepare:   documents from every corpus in the data folder except the
             novels (kept for the fine-tuning demo), cleaned (the Wikipedia
             extractor's empty brackets and separators, table markup) and
             deduplicated (repeated lines of reviews, chatbot pairs and
             sentences); every 50th document of each source is held out for
             validation; train.txt is the training documents of all sources,
             shuffled with a fixed seed. corpus/counts.json counts each step.
- tokenizer: a SentencePiece unigram tokenizer (<unk> <s> </s> <pad>) for
             each vocabulary size the candidate shapes use.
- baseline:  bits per character of `xz -9e` on each source's validation
             text, given the source's training text first.
- sweep:     each candidate shape (depth, width, vocabulary) trained from
             scratch for the same training FLOPs, then its validation bits
             per character (all sources) and batch-1 greedy tokens/s;
             sweep.json and sweep.md; the lowest bits per character among
             the shapes that decode at least MIN_TOKENS_PER_SECOND is chosen.
- train:     the chosen shape's sweep run (round 0) continued in `rounds`
             rounds of `round_flops` each (several epochs in all, so with
             dropout), with `tfgen.finetune` (Keras fit, packed 256-token rows,
             bf16 mixed precision where the CPU has it). Each round starts from
             the float16 weights the one before ended with, with a fresh AdamW,
             its own warmup and linear decay from a peak learning rate lower by
             `round_decay` each round, and its own data order (warm restarts); it
             ends with its validation loss and bits per character for each
             source, and rounds/N/record.json. training_runs.json records every
             run of every training (machine, load, steps, tokens, wall time to
             its last checkpoint, finished or interrupted).
- package:   the last finished round's float16 weights, the tokenizer,
             training.json and the model card in tfgen/models/ko-mini/ (with
             --smoke: WORK/package).

--smoke runs every stage at a tiny size (a few hundred documents per source,
two tiny shapes, a few hundred steps) to check the recipe end to end.
"""

import argparse
import json
import lzma
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from tfgen import GPT2LM, checkpoint, finetune, training  # first: tfgen sets TensorFlow's environment before it loads

# isort: split

import numpy as np
import tensorflow as tf
from transformers import GPT2Config

import ko_mini_corpus as corpus
from tfgen.data import read_documents
from tfgen.tokenizer import Tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ko"
PACKAGE_DIR = ROOT / "tfgen" / "models" / "ko-mini"
CARRY_DIR = ROOT / "recipes" / "ko-mini-run"  # the finished rounds, committed: a new machine resumes from them
STAGES = ("prepare", "tokenizer", "baseline", "sweep", "train", "package")
SOURCES = corpus.SOURCES

MAX_PACKAGE_BYTES = 50 * 2**20
MIN_TOKENS_PER_SECOND = 100  # batch-1 greedy
HEAD_SIZE = 64
PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때"]
SAMPLE_SETTINGS = [
    dict(max_new_tokens=40, no_repeat_ngram_size=3),
    dict(max_new_tokens=40, do_sample=True, top_k=50, top_p=0.95, seed=0),
]


@dataclass(frozen=True)
class Shape:
    """A GPT-2 shape: depth, width (heads of 64) and vocabulary; KoGPT2-v1's 4x MLP and tied head."""

    n_layer: int
    n_embd: int
    vocab_size: int

    @property
    def name(self):
        return f"{self.n_layer}x{self.n_embd}-{self.vocab_size / 1000:g}k"

    def parameters(self, context):
        """Token and position embeddings, per block 2 LayerNorms, attention and MLP (12 d² + 13 d), final LayerNorm."""
        d = self.n_embd
        return (self.vocab_size + context) * d + self.n_layer * (12 * d * d + 13 * d) + 2 * d

    def package_bytes(self, context):
        return 2 * self.parameters(context)  # float16

    def training_flops_per_token(self, context):
        """Kaplan et al.'s estimate, 3 x (2 N + 2 n_layer n_ctx d): N the block weights and the LM head's matmul."""
        d = self.n_embd
        return 6 * (self.n_layer * 12 * d * d + self.vocab_size * d) + 6 * self.n_layer * context * d

    def config(self, context, dropout):
        return GPT2Config(
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_embd // HEAD_SIZE,
            n_positions=context,
            vocab_size=self.vocab_size,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )


@dataclass(frozen=True)
class Profile:
    """How big a recipe run is: the candidate shapes, the corpus and the compute of each training."""

    shapes: tuple
    documents_per_source: int = None  # None: all
    context: int = 256
    batch_size: int = 16
    learning_rate: float = 1e-3
    sweep_flops: float = 1.5e14  # each candidate's short run
    round_flops: float = 1e14  # each round after the sweep: about 13 min on the AVX-512 host, 45 on the AVX2 one
    rounds: int = 30
    round_decay: float = 0.95  # round r's peak learning rate is learning_rate x round_decay ** r
    dropout: float = 0.1  # in the rounds only: their data repeats, a candidate's short run sees it once
    save_steps: int = 200
    speed_tokens: int = 128  # new tokens of the batch-1 greedy speed check

    def steps(self, shape, flops):
        return max(1, round(flops / (shape.training_flops_per_token(self.context) * self.batch_size * self.context)))

    def round_learning_rate(self, number):
        return self.learning_rate * self.round_decay**number


FULL = Profile(
    shapes=(
        Shape(6, 384, 16_000),  # v1's shape
        Shape(10, 384, 16_000),  # deeper
        Shape(6, 512, 8_000),  # wider, a smaller vocabulary
        Shape(8, 448, 12_000),
    )
)  # between
SMOKE = Profile(
    shapes=(Shape(2, 64, 3_000), Shape(1, 128, 4_000)),
    documents_per_source=300,
    batch_size=4,
    sweep_flops=8e10,
    round_flops=1e11,
    rounds=2,
    save_steps=50,
    speed_tokens=32,
)


def write_json(path, record):
    checkpoint.write_text_atomically(path, json.dumps(record, ensure_ascii=False, indent=2) + "\n")


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _write_documents(path, documents):
    checkpoint.write_text_atomically(path, "".join(document + "\n\n" for document in documents))


def prepare(data, work, profile):
    directory = work / "corpus"
    directory.mkdir(parents=True, exist_ok=True)
    everything, counts = [], {}
    for name, source in SOURCES.items():
        documents, counts[name] = corpus.source_documents(source, data, profile.documents_per_source)
        train, valid = corpus.split_validation(documents)
        _write_documents(directory / f"{name}.train.txt", train)
        _write_documents(directory / f"{name}.valid.txt", valid)
        everything += train
        counts[name].update(
            train_documents=len(train),
            valid_documents=len(valid),
            train_characters=sum(map(len, train)),
            valid_characters=sum(map(len, valid)),
        )
        print(f"{name}: {json.dumps(counts[name])}", flush=True)
    random.Random(0).shuffle(everything)
    _write_documents(directory / "train.txt", everything)
    write_json(directory / "counts.json", counts)


def tokenizer_dir(work, vocab_size):
    return work / f"tokenizer-{vocab_size}"


def train_tokenizer(work, vocab_size):
    lines = (line.rstrip("\n") for line in open(work / "corpus" / "train.txt", encoding="utf-8"))
    with checkpoint.atomic_directory(tokenizer_dir(work, vocab_size)) as staging:
        tokenizer = train_sentencepiece((line for line in lines if line.strip()), staging, vocab_size)
    print(f"tokenizer: {tokenizer.vocab_size:,} pieces", flush=True)


# --- training, resumable, and its record ---


def machine():
    """The machine a run is on, and how busy it is when the run starts."""
    cpuinfo = Path("/proc/cpuinfo")
    models = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    return dict(
        cpu=models[0] if models else "unknown",
        cores=os.cpu_count(),
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        tensorflow=tf.__version__,
        load_average_1min=round(os.getloadavg()[0], 2),
    )


def _now():
    return datetime.now(timezone.utc)


def _checkpoint_step(run):
    state = run / finetune.CHECKPOINT_DIR / "training_state" / "trainer_state.json"
    return read_json(state)["step"] if state.exists() else 0


def _checkpoint_time(run):
    state = run / finetune.CHECKPOINT_DIR / "training_state" / "trainer_state.json"
    return datetime.fromtimestamp(state.stat().st_mtime, timezone.utc) if state.exists() else None


def close_run(entry, to_step, ended_at, ended, tokens_per_step):
    """A training run's record completed: steps, tokens and wall time up to `to_step`'s checkpoint."""
    seconds = max(0, round((ended_at - datetime.fromisoformat(entry["started"])).total_seconds()))
    return {
        **entry,
        "to_step": to_step,
        "tokens": (to_step - entry["from_step"]) * tokens_per_step,
        "seconds": seconds,
        "ended": ended,
    }


def _close_interrupted_runs(runs, stage, run, tokens_per_step):
    """Completes the record of a run of `stage` that stopped without finishing: up to its last checkpoint."""
    ended_at = _checkpoint_time(run)
    return [
        close_run(
            entry,
            _checkpoint_step(run),
            ended_at or datetime.fromisoformat(entry["started"]),
            "interrupted",
            tokens_per_step,
        )
        if entry["stage"] == stage and "ended" not in entry
        else entry
        for entry in runs
    ]


def bf16_available():
    """Whether this machine trains in bf16 mixed precision (a GPU, or a CPU with bfloat16 instructions)."""
    try:
        training.mixed_precision_policy()
    except ValueError:
        return False
    return True


def train_shape(work, directory, stage, profile, steps, start, learning_rate, seed, validate):
    """Trains `start`'s model (written to `directory`/initial) for `steps` steps in `directory`/run, resuming
    what an earlier run left."""
    run = directory / "run"
    if run.exists() and _checkpoint_step(run) == 0:
        shutil.rmtree(run)  # stopped before its first checkpoint: nothing to resume
    tokens_per_step = profile.batch_size * profile.context
    runs_file = work / "training_runs.json"
    runs = _close_interrupted_runs(read_json(runs_file) if runs_file.exists() else [], stage, run, tokens_per_step)
    write_json(runs_file, runs)
    from_step = _checkpoint_step(run)
    if from_step >= steps:
        return
    if not (run / finetune.RUN_FILE).exists():
        with checkpoint.atomic_directory(directory / "initial") as staging:
            start(staging)
    corpus_dir = work / "corpus"
    settings = finetune.FinetuneSettings(
        model=str(directory / "initial"),
        train=[str(corpus_dir / "train.txt")],
        output=str(run),
        valid=[str(corpus_dir / f"{name}.valid.txt") for name in SOURCES] if validate else None,
        resume=(run / finetune.RUN_FILE).exists(),
        epochs=10_000,
        max_steps=steps,
        batch_size=profile.batch_size,
        block_size=profile.context,
        learning_rate=learning_rate,
        warmup_steps=round(0.05 * steps),
        save_steps=profile.save_steps,
        layout="packed",
        document="paragraph",
        mixed_precision=bf16_available(),
        seed=seed,
        verbose=2,
    )
    entry = dict(
        stage=stage,
        started=_now().isoformat(timespec="seconds"),
        machine=machine(),
        mixed_precision=settings.mixed_precision,
        from_step=from_step,
    )
    write_json(runs_file, runs + [entry])
    print(f"{stage}: steps {from_step} to {steps}", flush=True)
    finetune.finetune(settings)
    done = close_run(entry, _checkpoint_step(run), _now(), "finished", tokens_per_step)
    write_json(runs_file, runs + [done])
    print(f"{stage}: {done['seconds']:,} s, steps {done['from_step']} to {done['to_step']}", flush=True)
    tf.keras.backend.clear_session()


def random_model(work, shape, profile):
    """A start for `train_shape`: `shape` with random weights (seed 0), no dropout, the shape's tokenizer."""

    def start(directory):
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir(work, shape.vocab_size))
        tf.keras.utils.set_random_seed(0)
        GPT2LM.from_config(shape.config(profile.context, 0.0), tokenizer).save_pretrained(directory)

    return start


def continued_model(previous, dropout):
    """A start for `train_shape`: the weights and tokenizer of the checkpoint `previous`, trained with `dropout`."""

    def start(directory):
        shutil.copytree(
            previous, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns(training.TRAINING_STATE_DIR)
        )
        config = GPT2Config.from_pretrained(directory)
        config.update(dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
        config.save_pretrained(directory)

    return start


def runs_of(work, stage):
    path = work / "training_runs.json"
    return [entry for entry in read_json(path) if entry["stage"] == stage] if path.exists() else []


# --- evaluation ---


def token_stream(tokenizer, documents):
    """BOS + text + EOS for each document, concatenated, as in the packed training rows."""
    ids = []
    for document in documents:
        ids += [tokenizer.bos_token_id, *tokenizer.encode(document, add_special_tokens=False), tokenizer.eos_token_id]
    return np.array(ids, np.int32)


def stream_nats(lm, ids, context, batch_size=16):
    """Total negative log-likelihood (nats) of every token after the first, in windows of `context` tokens.

    Consecutive windows share one token, so each token is predicted once, from up to context - 1 tokens before it.
    """
    step = context - 1
    starts = range(0, len(ids) - 1, step)
    windows = np.zeros((len(starts), context), np.int32)
    masks = np.zeros_like(windows)
    for row, start in enumerate(starts):
        piece = ids[start : start + context]
        windows[row, : len(piece)] = piece
        masks[row, : len(piece)] = 1
    total = 0.0
    for first in range(0, len(windows), batch_size):
        x, m = windows[first : first + batch_size], masks[first : first + batch_size]
        logits = lm(tf.constant(x), attention_mask=tf.constant(m))
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=x[:, 1:], logits=logits[:, :-1])
        total += float(tf.reduce_sum(nll * tf.cast(m[:, 1:], tf.float32)))
    return total


def xz_bits(train_text, valid_text):
    """Bits xz -9e spends on the validation text after it has seen the training text."""

    def size(text):
        return len(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))

    return 8 * (size(train_text + valid_text) - size(train_text))


def model_figures(lm, work):
    """Per source: validation loss (nats per token) and bits per character."""
    figures = {}
    for name in SOURCES:
        documents = _validation_documents(work, name)
        ids = token_stream(lm.tokenizer, documents)
        nats = stream_nats(lm, ids, lm.config.n_positions)
        characters = _characters(documents)
        figures[name] = dict(
            tokens=len(ids) - 1,
            characters=characters,
            loss=nats / (len(ids) - 1),
            bits_per_character=nats / math.log(2) / characters,
        )
        print(f"{name}: {figures[name]}", flush=True)
    return figures


def _validation_documents(work, name):
    return list(read_documents([work / "corpus" / f"{name}.valid.txt"], "paragraph"))


def _characters(documents):
    return sum(len(d) + 1 for d in documents)  # + 1: the newline an EOS stands for


def xz_figures(work):
    """Per source: bits per character of xz -9e on the validation text, given the source's training text first."""
    corpus = work / "corpus"
    figures = {}
    for name in SOURCES:
        valid = (corpus / f"{name}.valid.txt").read_text(encoding="utf-8")
        train_text = (corpus / f"{name}.train.txt").read_text(encoding="utf-8")
        bits = xz_bits(train_text, valid)
        figures[name] = dict(xz_bits_per_character=bits / _characters(_validation_documents(work, name)))
        print(f"{name}: {figures[name]}", flush=True)
    return figures


def overall_figures(figures):
    """The per-source figures of `model_figures` pooled: all validation text as one."""
    nats = sum(figure["loss"] * figure["tokens"] for figure in figures.values())
    tokens = sum(figure["tokens"] for figure in figures.values())
    characters = sum(figure["characters"] for figure in figures.values())
    return dict(
        tokens=tokens, characters=characters, loss=nats / tokens, bits_per_character=nats / math.log(2) / characters
    )


def greedy_tokens_per_second(lm, new_tokens, calls=3):
    """Batch-1 greedy decoding speed: the median of `calls` warm calls of `new_tokens` new tokens."""
    ids = np.array([lm.tokenizer.encode(PROMPTS[1])], np.int32)

    def seconds():
        start = time.perf_counter()
        lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return time.perf_counter() - start

    seconds()  # traces and compiles
    return new_tokens / statistics.median(seconds() for _ in range(calls))


# --- the size sweep ---


def sweep(work, profile):
    """Trains each candidate shape for `profile.sweep_flops` and writes sweep.json and sweep.md."""
    results = []
    for shape in profile.shapes:
        directory = work / "sweep" / shape.name
        if not (directory / "result.json").exists():
            stage = f"sweep {shape.name}"
            steps = profile.steps(shape, profile.sweep_flops)
            train_shape(
                work,
                directory,
                stage,
                profile,
                steps,
                random_model(work, shape, profile),
                profile.learning_rate,
                seed=0,
                validate=False,
            )
            lm = GPT2LM.from_pretrained(directory / "run" / finetune.CHECKPOINT_DIR)
            tokens = steps * profile.batch_size * profile.context
            seconds = sum(entry["seconds"] for entry in runs_of(work, stage))
            write_json(
                directory / "result.json",
                dict(
                    shape=shape.name,
                    **asdict(shape),
                    parameters=lm.gpt2.count_params(),
                    package_bytes=shape.package_bytes(profile.context),
                    steps=steps,
                    tokens=tokens,
                    training_flops=tokens * shape.training_flops_per_token(profile.context),
                    training_seconds=seconds,
                    greedy_tokens_per_second=greedy_tokens_per_second(lm, profile.speed_tokens),
                    validation=overall_figures(model_figures(lm, work)),
                ),
            )
            tf.keras.backend.clear_session()
        results.append(read_json(directory / "result.json"))
    chosen = choose_shape(results)
    write_json(
        work / "sweep.json",
        dict(equal_compute="training FLOPs", flops_per_shape=profile.sweep_flops, results=results, chosen=chosen),
    )
    checkpoint.write_text_atomically(work / "sweep.md", sweep_table(results, chosen) + "\n")
    print(f"sweep: {chosen} chosen\n{sweep_table(results, chosen)}", flush=True)


def choose_shape(results):
    """The name of the shape with the lowest validation bits per character among those within the limits."""
    fitting = [
        result
        for result in results
        if result["package_bytes"] <= MAX_PACKAGE_BYTES and result["greedy_tokens_per_second"] >= MIN_TOKENS_PER_SECOND
    ]
    if not fitting:
        raise SystemExit(
            f"no candidate shape decodes at {MIN_TOKENS_PER_SECOND} tokens/s within "
            f"{MAX_PACKAGE_BYTES / 2**20:.0f} MiB; add smaller shapes to the profile"
        )
    return min(fitting, key=lambda result: result["validation"]["bits_per_character"])["shape"]


def sweep_table(results, chosen):
    """The sweep as a markdown table, the chosen shape in bold."""
    rows = [
        "| shape | layers | width | vocabulary | parameters | fp16 MB | steps | tokens | training PFLOPs | "
        "wall time | greedy tokens/s | val loss (nats/token) | val bpc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        name = f"**{r['shape']}**" if r["shape"] == chosen else r["shape"]
        rows.append(
            f"| {name} | {r['n_layer']} | {r['n_embd']} | {r['vocab_size']:,} | {r['parameters']:,} | "
            f"{r['package_bytes'] / 1e6:.1f} | {r['steps']:,} | {r['tokens'] / 1e6:.2f} M | "
            f"{r['training_flops'] / 1e15:.3f} | {r['training_seconds'] / 60:.0f} min | "
            f"{r['greedy_tokens_per_second']:.0f} | {r['validation']['loss']:.3f} | "
            f"{r['validation']['bits_per_character']:.3f} |"
        )
    return "\n".join(rows)


def chosen_shape(work, profile):
    name = read_json(work / "sweep.json")["chosen"]
    return next(shape for shape in profile.shapes if shape.name == name)


def candidate_shapes(work, profile):
    """The shapes still to be trained: all before the sweep, the chosen one after it."""
    return [chosen_shape(work, profile)] if (work / "sweep.json").exists() else profile.shapes


# --- the main training, in rounds ---


def round_dir(work, number):
    return work / "rounds" / str(number)


def finished_rounds(work):
    """The records of the finished rounds, in order (the last round's float16 weights are in its `final`)."""
    records = [read_json(path) for path in (work / "rounds").glob("*/record.json")]
    return sorted(records, key=lambda record: record["round"])


def write_float16_model(lm, directory):
    """`lm`'s config, its weights as float16 (PyTorch layout) and its tokenizer, into `directory`."""
    lm.gpt2.config.save_pretrained(directory)
    checkpoint.write_safetensors(lm.gpt2.weights, directory / checkpoint.SAFETENSORS_FILE, dtype=np.float16)
    lm.tokenizer.save_pretrained(directory)


def finish_round(work, number, run, dropout, seed, stage):
    """A finished round's float16 weights (`final`, where the next round starts) and its record."""
    directory = round_dir(work, number)
    lm = GPT2LM.from_pretrained(run / finetune.CHECKPOINT_DIR)
    validation = model_figures(lm, work)
    with checkpoint.atomic_directory(directory / "final") as staging:
        write_float16_model(lm, staging)
    settings = read_json(run / finetune.RUN_FILE)
    steps = settings["total_steps"]
    write_json(
        directory / "record.json",
        dict(
            round=number,
            steps=steps,
            tokens=steps * settings["batch_size"] * settings["block_size"],
            steps_per_epoch=settings["steps_per_epoch"],
            learning_rate=settings["learning_rate"],
            warmup_steps=settings["warmup_steps"],
            dropout=dropout,
            seed=seed,
            runs=runs_of(work, stage),
            validation=validation,
        ),
    )
    tf.keras.backend.clear_session()


def train(work, profile, carry_dir):
    """Runs the rounds not yet finished, carrying each finished one to `carry_dir`."""
    shape = chosen_shape(work, profile)
    if not (round_dir(work, 0) / "record.json").exists():
        sweep_run = work / "sweep" / shape.name / "run"
        finish_round(work, 0, sweep_run, dropout=0.0, seed=0, stage=f"sweep {shape.name}")
        carry(work, carry_dir)
    for number in range(1, profile.rounds + 1):
        directory = round_dir(work, number)
        if not (directory / "record.json").exists():
            stage = f"train round {number}"
            train_shape(
                work,
                directory,
                stage,
                profile,
                profile.steps(shape, profile.round_flops),
                continued_model(round_dir(work, number - 1) / "final", profile.dropout),
                profile.round_learning_rate(number),
                seed=number,
                validate=True,
            )
            finish_round(work, number, directory / "run", profile.dropout, seed=number, stage=stage)
            carry(work, carry_dir)


def carry(work, carry_dir):
    """Writes what a new work folder resumes from: the sweep, the corpus counts, the finished rounds' records
    and the last round's float16 weights (state.json and weights/ in `carry_dir`, replaced atomically)."""
    rounds = finished_rounds(work)
    with checkpoint.atomic_directory(carry_dir) as staging:
        shutil.copytree(round_dir(work, rounds[-1]["round"]) / "final", staging / "weights")
        write_json(
            staging / "state.json",
            dict(
                sweep=read_json(work / "sweep.json"),
                corpus=read_json(work / "corpus" / "counts.json"),
                rounds=rounds,
                sweep_runs=[
                    entry for entry in read_json(work / "training_runs.json") if not entry["stage"].startswith("train")
                ],
            ),
        )
    print(f"carried rounds 0 to {rounds[-1]['round']} to {carry_dir}", flush=True)


def resume(work, carry_dir):
    """Starts an empty work folder from what `carry` wrote: the sweep, the rounds' records, the last round's
    weights. Rounds outlive a work folder, which a new machine does not have. Returns the carried corpus
    counts: the corpus prepared here must come out the same."""
    state = read_json(carry_dir / "state.json")
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "sweep.json", state["sweep"])
    checkpoint.write_text_atomically(
        work / "sweep.md", sweep_table(state["sweep"]["results"], state["sweep"]["chosen"]) + "\n"
    )
    rounds = state["rounds"]
    write_json(
        work / "training_runs.json", state["sweep_runs"] + [entry for entry in rounds[1:] for entry in entry["runs"]]
    )
    for entry in rounds:
        round_dir(work, entry["round"]).mkdir(parents=True, exist_ok=True)
        write_json(round_dir(work, entry["round"]) / "record.json", entry)
    with checkpoint.atomic_directory(round_dir(work, rounds[-1]["round"]) / "final") as staging:
        shutil.copytree(carry_dir / "weights", staging, dirs_exist_ok=True)
    tokenizer = Tokenizer.from_pretrained(carry_dir / "weights")
    with checkpoint.atomic_directory(tokenizer_dir(work, tokenizer.vocab_size)) as staging:
        tokenizer.save_pretrained(staging)
    print(f"resumed from {carry_dir}: the sweep and rounds 0 to {rounds[-1]['round']}", flush=True)
    return state["corpus"]


def package(work, profile, package_dir):
    """The last finished round's float16 weights (evaluated again as shipped), the tokenizer, the record and the card."""
    rounds = finished_rounds(work)
    if len(rounds) < 2:
        raise SystemExit("no training round after the sweep has finished; run the train stage first")
    shape = chosen_shape(work, profile)
    tokens = sum(entry["tokens"] for entry in rounds)
    epoch_tokens = rounds[-1]["steps_per_epoch"] * profile.batch_size * profile.context
    with checkpoint.atomic_directory(package_dir) as staging:
        shutil.copytree(round_dir(work, rounds[-1]["round"]) / "final", staging, dirs_exist_ok=True)
        shipped = GPT2LM.from_pretrained(staging)
        record = dict(
            model=dict(
                name=shape.name,
                n_layer=shape.n_layer,
                n_embd=shape.n_embd,
                n_head=shipped.config.n_head,
                n_positions=shipped.config.n_positions,
                vocab_size=shipped.config.vocab_size,
                dropout=profile.dropout,
                parameters=shipped.gpt2.count_params(),
            ),
            training=dict(
                batch_size=profile.batch_size,
                block_size=profile.context,
                learning_rate=profile.learning_rate,
                round_decay=profile.round_decay,
                rounds_planned=profile.rounds,
                rounds=rounds,
                tokens=tokens,
                epochs=tokens / epoch_tokens,
                flops=tokens * shape.training_flops_per_token(profile.context),
            ),
            corpus=read_json(work / "corpus" / "counts.json"),
            sweep={
                **read_json(work / "sweep.json"),
                "runs": [
                    entry for entry in read_json(work / "training_runs.json") if not entry["stage"].startswith("train")
                ],
            },
            evaluation=dict(
                float32=rounds[-1]["validation"],
                xz=read_json(work / "baseline.json"),
                shipped=model_figures(shipped, work),
            ),
            greedy_tokens_per_second=greedy_tokens_per_second(shipped, profile.speed_tokens),
            samples=[
                dict(settings=settings, texts=shipped.generate_text(PROMPTS, **settings))
                for settings in SAMPLE_SETTINGS
            ],
        )
        write_json(staging / "training.json", record)
        checkpoint.write_text_atomically(staging / "README.md", model_card(record))


LICENCES = {
    "wikipedia": "Korean Wikipedia sample (HyundongHwang/PyTorchDeepLearningStart), CC BY-SA 3.0",
    "reviews": "NSMC movie reviews and synopses (e9t/nsmc), CC0 1.0",
    "bible": "Korean Bible 1961 (개역한글, bluesaurel/Korean-Bible-1961-KRV), public domain",
    "chatbot": "Chatbot Q/A pairs (songys/Chatbot_data), MIT",
    "sentences": "KLUE dev sentences (CC BY-SA 4.0), KorNLI/KorSTS (kakaobrain/KorNLUDatasets, CC BY-SA 4.0), "
    "Korean news sentences (jungyeul/korean-parallel-corpora, CC BY-SA 3.0)",
}


def _run_line(entry):
    machine = entry["machine"]
    precision = {True: "bf16 mixed precision", False: "float32"}.get(entry.get("mixed_precision"), "")
    return (
        f"{entry['started']}, {entry['seconds'] / 3600:.2f} h, steps {entry['from_step']:,}-{entry['to_step']:,} "
        f"({entry['tokens'] / 1e6:.1f} M tokens), {entry['ended']}; {machine['cpu']}, {machine['cores']} cores, "
        f"load {machine['load_average_1min']} at the start; {precision}"
    )


def corpus_table(counts):
    rows = [
        "| source | documents read | lines read | extractor fragments fixed | lines cleaned / dropped | "
        "repeated lines | dropped by dedup | documents kept | lines kept | training characters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in SOURCES:
        c = counts[name]
        cleaning = (
            f"{c['lines_changed_by_cleaning']:,} / {c['lines_dropped_by_cleaning']:,}"
            if "extractor_fragments" in c
            else "-"
        )
        rows.append(
            f"| {name} | {c['documents_read']:,} | {c['lines_read']:,} | {c.get('extractor_fragments', 0):,} | "
            f"{cleaning} | {c['repeated_lines']:,} | {c['lines_dropped_by_deduplication']:,} | "
            f"{c['documents']:,} | {c['lines']:,} | {c['train_characters']:,} |"
        )
    return "\n".join(rows)


def rounds_table(rounds):
    """One row per finished round: its steps, peak learning rate, and validation bits per character after it."""
    rows = [
        "| round | steps | tokens | peak learning rate | dropout | "
        + " | ".join(f"{name} bpc" for name in SOURCES)
        + " | all bpc |",
        "|---:|---:|---:|---:|---:|" + "---:|" * (len(SOURCES) + 1),
    ]
    for entry in rounds:
        figures = entry["validation"]
        rows.append(
            f"| {entry['round']} | {entry['steps']:,} | {entry['tokens'] / 1e6:.1f} M | "
            f"{entry['learning_rate']:.2e} | {entry['dropout']} | "
            + " | ".join(f"{figures[name]['bits_per_character']:.3f}" for name in SOURCES)
            + f" | {overall_figures(figures)['bits_per_character']:.3f} |"
        )
    return "\n".join(rows)


def model_card(record):
    """The model card (README.md), from the packaging record: every figure in it comes from `record`."""
    model, training, evaluation, sweep_record = (
        record["model"],
        record["training"],
        record["evaluation"],
        record["sweep"],
    )
    round_runs = [entry for entry in training["rounds"][1:] for entry in entry["runs"]]
    seconds = sum(entry["seconds"] for entry in round_runs)
    rows = []
    for name in SOURCES:
        fp32, shipped, xz = evaluation["float32"][name], evaluation["shipped"][name], evaluation["xz"][name]
        rows.append(
            f"| {name} | {record['corpus'][name]['valid_documents']:,} | {fp32['characters']:,} | "
            f"{fp32['loss']:.3f} | {fp32['bits_per_character']:.3f} | {shipped['bits_per_character']:.3f} | "
            f"{xz['xz_bits_per_character']:.3f} |"
        )
    samples = []
    for sample in record["samples"]:
        samples.append(f"`{sample['settings']}`:\n")
        samples += [f"- {text!r}" for text in sample["texts"]]
        samples.append("")
    runs = "\n".join(f"- {entry['stage']}: {_run_line(entry)}" for entry in round_runs)
    sweep_runs = "\n".join(f"- {entry['stage']}: {_run_line(entry)}" for entry in sweep_record["runs"])
    sources = "\n".join(f"- {name}: {LICENCES[name]}" for name in SOURCES)
    return f"""# ko-mini: tfgen's embedded Korean GPT-2

A small Korean GPT-2 trained from scratch by tfgen itself, shipped inside the package so that
tfgen works offline: `GPT2LM.from_pretrained("ko-mini")`, `tfgen.default_model_path()`, and every
`tfgen` command without `--model`. It is small and saw {training["tokens"] / 1e6:.1f} M tokens
({training["epochs"]:.1f} epochs of its corpus): see the samples and the validation figures below for what it
can do. Use it to learn and test tfgen offline, or as a starting point for fine-tuning; for real text, load
skt/kogpt2-base-v2.

- GPT-2, {model["n_layer"]} layers x {model["n_embd"]} wide, {model["n_head"]} heads, a {model["n_positions"]}-token
  context, dropout {model["dropout"]} in training; {model["parameters"]:,} parameters (the LM head shares the
  token embedding).
- SentencePiece unigram tokenizer, {model["vocab_size"]:,} pieces, KoGPT2-v1 conventions: `<unk>` 0, `<s>` 1,
  `</s>` 2, `<pad>` 3; byte fallback, so any text round-trips.
- Weights stored as float16 (`model.safetensors`, PyTorch layout; PyTorch's `GPT2LMHeadModel` reads the
  directory too) and loaded as float32. Batch-1 greedy decoding ran at {record["greedy_tokens_per_second"]:.0f}
  tokens/s on the packaging machine.

## Licence

CC BY-SA 4.0: the training text includes CC BY-SA material (Wikipedia, KLUE, KorNLI/KorSTS, news), so
the weights are shared alike.

## Data

Every corpus in the shared Korean data folder except the modern novels (AKS-DHLAB/ModernKoreanNovelsTEI)
and the novel excerpt of NLP-kr/tensorflow-ml-nlp-tf2, which are kept for the fine-tuning demo:

{sources}

Cleaning: Wikipedia's extractor stripped foreign-script words and links but left their brackets and
separators ("(, 1924년 10월 1일 ~ )", "()", "(, , )"): separators at the edges of a parenthesis and repeated
ones inside it are removed, and brackets left empty are removed with the space before them; wiki table
markup lines are dropped. Deduplication: a line of reviews, chatbot pairs or sentences that an earlier
document of its source already had is dropped (chatbot answers repeat verbatim; KorNLI repeats its
premises); Wikipedia's repeated lines (section headings) and the Bible's (its formulae) are kept.
Every {corpus.VALID_EVERY}th document of each source, after deduplication, is held out for validation, so no
line of a deduplicated source is in both.

{corpus_table(record["corpus"])}

## Size sweep

Each candidate shape was trained from scratch for the same training FLOPs
({sweep_record["flops_per_shape"]:.2e}, by 6 x (block weights + LM head) + 6 x layers x context x width per
token), without dropout (less than one epoch), then scored on the whole validation split; bits per character
compare across vocabularies, loss per token does not. The chosen shape (bold) has the lowest bits per
character among those within 50 MiB and {MIN_TOKENS_PER_SECOND} tokens/s batch-1 greedy:

{sweep_table(sweep_record["results"], sweep_record["chosen"])}

Sweep runs:

{sweep_runs}

## Recipe

`python recipes/ko_mini.py` (stages: prepare, tokenizer, baseline, sweep, train, package; run
again, it resumes where it stopped, on a new machine from this package's last round). Training: tfgen's
`finetune` (Keras `fit`), packed rows of {training["block_size"]} tokens, batch {training["batch_size"]},
AdamW, linear warmup over 5% of each round then linear decay. Round 0 is the chosen shape's sweep run
({training["rounds"][0]["steps"]:,} steps from random weights, peak learning rate {training["learning_rate"]}); each
later round starts from the float16 weights of the one before, with a fresh optimizer, a new data order and
a peak learning rate {training["round_decay"]} times the round before's (warm restarts). In all
{training["tokens"] / 1e6:.1f} M tokens, {training["epochs"]:.2f} epochs, {training["flops"] / 1e15:.2f}
PFLOPs; {len(training["rounds"]) - 1} of {training["rounds_planned"]} planned rounds after it are done.

{rounds_table(training["rounds"])}

The rounds ran in {len(round_runs)} run(s), {seconds / 3600:.2f} h of wall time up to the last checkpoint
of each (an interrupted run's steps after its last checkpoint were done again by the next):

{runs}

## Validation

Loss in nats per token; bits per character (bpc) over the validation text of each source, each document
framed by `<s>`/`</s>` (the `</s>` counted as one newline character), scored in 256-token windows that
overlap by one token. The baseline is `xz -9e` given the source's training text first:
8 x (size(train + validation) - size(train)) / characters.

| source | documents | characters | loss (fp32) | bpc (fp32) | bpc (shipped fp16) | bpc xz -9e |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

## Samples

From the shipped weights, for the seeds' prompts:

{chr(10).join(samples)}
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stages", nargs="*", help=f"of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared Korean data folder")
    parser.add_argument(
        "--work", type=Path, help="corpus, tokenizers, runs (default: runs/ko-mini, with --smoke runs/ko-mini-smoke)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="every stage at a tiny size, packaged into WORK/package: checks the recipe"
    )
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data folder at {args.data}; pass --data with the Korean corpora")
    if unknown := [stage for stage in args.stages if stage not in STAGES]:
        parser.error(f"no stage {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    stages = args.stages or STAGES
    profile = SMOKE if args.smoke else FULL
    work = args.work or ROOT / "runs" / ("ko-mini-smoke" if args.smoke else "ko-mini")
    package_dir, carry_dir = (work / "package", work / "carry") if args.smoke else (PACKAGE_DIR, CARRY_DIR)
    carried_corpus = None
    if not (work / "sweep.json").exists() and (carry_dir / "state.json").exists():
        carried_corpus = resume(work, carry_dir)
    if "prepare" in stages and not (work / "corpus" / "train.txt").exists():
        prepare(args.data, work, profile)
    if carried_corpus is not None and read_json(work / "corpus" / "counts.json") != carried_corpus:
        sys.exit(
            f"the corpus prepared from {args.data} differs from the one the carried rounds were trained on "
            f"(corpus in {carry_dir / 'state.json'}); use the same data folder and recipe"
        )
    if "tokenizer" in stages:
        for vocab_size in sorted({shape.vocab_size for shape in candidate_shapes(work, profile)}):
            if not tokenizer_dir(work, vocab_size).exists():
                train_tokenizer(work, vocab_size)
    if "baseline" in stages and not (work / "baseline.json").exists():
        write_json(work / "baseline.json", xz_figures(work))
    if "sweep" in stages and not (work / "sweep.json").exists():
        sweep(work, profile)
    if "train" in stages:
        train(work, profile, carry_dir)
    if "package" in stages:
        package(work, profile, package_dir)


if __name__ == "__main__":
    main()
