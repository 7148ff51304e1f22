"""The recipe for tfgen's embedded Korean model, ko-mini: corpus, tokenizer, GPT-2 from scratch, evaluation.

    python recipes/ko_mini.py [--data ../shared/data/ko] [--work runs/ko-mini] [stage ...]

Stages (all, in order, by default; each skips what an earlier run finished,
and `train` resumes from its last checkpoint):

- prepare:   documents from every corpus in the data folder except the
             novels (kept for the fine-tuning demo); every 50th document of
             each source is held out for validation; train.txt is the
             training documents of all sources, shuffled with a fixed seed.
- tokenizer: a 16k SentencePiece unigram tokenizer (<unk> <s> </s> <pad>).
- baseline:  bits per character of `xz -9e` on each source's validation
             text, given the source's training text first.
- train:     a 6 x 384 GPT-2 with a 256-token context, trained from scratch
             with `tfgen.finetune` (Keras fit, packed 256-token rows, bf16
             mixed precision where the CPU has it).
- evaluate:  validation loss and bits per character for each source.
- package:   float16 weights, the tokenizer and a model card in
             tfgen/models/ko-mini/.
"""

import argparse
import csv
import json
import lzma
import math
import random
import sys
import time
from pathlib import Path

from tfgen import GPT2LM, checkpoint, finetune  # first: tfgen sets TensorFlow's environment before it loads

import numpy as np
import tensorflow as tf
from transformers import GPT2Config

from tfgen.data import read_documents
from tfgen.tokenizer import Tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ko"
PACKAGE_DIR = ROOT / "tfgen" / "models" / "ko-mini"
STAGES = ("prepare", "tokenizer", "baseline", "train", "evaluate", "package")

VALID_EVERY = 50  # every 50th document of each source is held out
VOCAB_SIZE = 16_000
MODEL = dict(n_layer=6, n_embd=384, n_head=6, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
TRAINING = dict(batch_size=16, block_size=256, learning_rate=1e-3, warmup_steps=200, max_steps=2000, save_steps=100,
                epochs=10, layout="packed", document="paragraph", mixed_precision=True, seed=0)
PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때"]
SAMPLE_SETTINGS = [dict(max_new_tokens=40, no_repeat_ngram_size=3),
                   dict(max_new_tokens=40, do_sample=True, top_k=50, top_p=0.95, seed=0)]


# --- the corpora: each yields documents (a document's lines are joined with newlines) ---

def _lines(path, skip_header=False):
    with open(path, encoding="utf-8") as f:
        if skip_header:
            next(f)
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def wikipedia(data):
    """Korean Wikipedia articles: a title line and paragraphs, blank lines between articles."""
    return read_documents([data / "HyundongHwang_PyTorchDeepLearningStart" / "kowiki_sample.txt"], "paragraph")


def reviews(data):
    """NSMC movie reviews (the document column), and the movie synopses."""
    for line in _lines(data / "e9t_nsmc" / "ratings_reconstructed.txt", skip_header=True):
        review = line.split("\t")[1].strip()
        if review:
            yield review
    yield from (line.strip() for line in _lines(data / "e9t_nsmc" / "synopses.txt"))


def bible(data):
    """The 1961 Korean Bible, one chapter per document."""
    chapter, verses = None, []
    for line in _lines(data / "bluesaurel_Korean-Bible-1961-KRV" / "bible_krv_1961.tsv"):
        reference, text = line.split("\t", 1)
        this_chapter = reference.split(":")[0]
        if this_chapter != chapter and verses:
            yield "\n".join(verses)
            verses = []
        chapter = this_chapter
        verses.append(text.strip())
    if verses:
        yield "\n".join(verses)


def chatbot(data):
    """Chit-chat question and answer pairs, one pair per document."""
    with open(data / "songys_Chatbot_data" / "ChatbotData.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield f"{row['Q'].strip()}\n{row['A'].strip()}"


def sentences(data):
    """Single sentences: KLUE dev sets, KorNLI/KorSTS pairs (each sentence once), news."""
    seen = set()
    files = [(data / "KLUE-benchmark_KLUE" / "klue_dev_sentences.txt", [0], False),
             (data / "jungyeul_korean-parallel-corpora" / "news_ko.txt", [0], False)]
    files += [(path, [0, 1], True) for path in sorted((data / "kakaobrain_KorNLUDatasets" / "KorNLI").glob("*.tsv"))]
    files += [(path, [5, 6], True) for path in sorted((data / "kakaobrain_KorNLUDatasets" / "KorSTS").glob("*.tsv"))]
    for path, columns, header in files:
        for line in _lines(path, skip_header=header):
            fields = line.split("\t") if len(columns) > 1 else [line]
            for column in columns:
                if column < len(fields) and (text := fields[column].strip()) and text not in seen:
                    seen.add(text)
                    yield text


SOURCES = {"wikipedia": wikipedia, "reviews": reviews, "bible": bible, "chatbot": chatbot, "sentences": sentences}


def write_json(path, record):
    checkpoint.write_text_atomically(path, json.dumps(record, ensure_ascii=False, indent=2) + "\n")


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _write_documents(path, documents):
    checkpoint.write_text_atomically(path, "".join(document + "\n\n" for document in documents))


def prepare(data, work):
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    everything, counts = [], {}
    for name, read in SOURCES.items():
        documents = list(read(data))
        train = [d for i, d in enumerate(documents) if i % VALID_EVERY != VALID_EVERY - 1]
        valid = [d for i, d in enumerate(documents) if i % VALID_EVERY == VALID_EVERY - 1]
        _write_documents(corpus / f"{name}.train.txt", train)
        _write_documents(corpus / f"{name}.valid.txt", valid)
        everything += train
        counts[name] = dict(train_documents=len(train), valid_documents=len(valid),
                            train_characters=sum(map(len, train)), valid_characters=sum(map(len, valid)))
        print(f"{name}: {len(train):,} training and {len(valid):,} validation documents, "
              f"{counts[name]['train_characters']:,} training characters", flush=True)
    random.Random(0).shuffle(everything)
    _write_documents(corpus / "train.txt", everything)
    write_json(corpus / "counts.json", counts)


def train_tokenizer(work):
    corpus = work / "corpus" / "train.txt"
    lines = (line.rstrip("\n") for line in open(corpus, encoding="utf-8"))
    tokenizer = train_sentencepiece((line for line in lines if line.strip()), work / "tokenizer", VOCAB_SIZE)
    print(f"tokenizer: {tokenizer.vocab_size:,} pieces", flush=True)


def train(work):
    run = work / "run"
    if not (run / finetune.RUN_FILE).exists():
        tokenizer = Tokenizer.from_pretrained(work / "tokenizer")
        tf.keras.utils.set_random_seed(TRAINING["seed"])
        GPT2LM.from_config(GPT2Config(**MODEL), tokenizer).save_pretrained(work / "initial")
    corpus = work / "corpus"
    settings = finetune.FinetuneSettings(
        model=str(work / "initial"), train=[str(corpus / "train.txt")], output=str(run),
        valid=[str(corpus / f"{name}.valid.txt") for name in SOURCES], resume=(run / finetune.RUN_FILE).exists(),
        verbose=2, **TRAINING)
    first_step = _checkpoint_step(run)
    start = time.time()
    finetune.finetune(settings)
    _log_training_run(work, dict(started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)),
                                 seconds=round(time.time() - start), from_step=first_step, to_step=_checkpoint_step(run)))


def _checkpoint_step(run):
    state = run / finetune.CHECKPOINT_DIR / "training_state" / "trainer_state.json"
    return read_json(state)["step"] if state.exists() else 0


def _log_training_run(work, entry):
    """Appends one training run (wall time and steps) to training_runs.json: the card's training time."""
    path = work / "training_runs.json"
    write_json(path, (read_json(path) if path.exists() else []) + [entry])
    print(f"training: {entry['seconds']} s, steps {entry['from_step']} to {entry['to_step']}", flush=True)


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
        piece = ids[start:start + context]
        windows[row, :len(piece)] = piece
        masks[row, :len(piece)] = 1
    total = 0.0
    for first in range(0, len(windows), batch_size):
        x, m = windows[first:first + batch_size], masks[first:first + batch_size]
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
        figures[name] = dict(tokens=len(ids) - 1, characters=characters, loss=nats / (len(ids) - 1),
                             bits_per_character=nats / math.log(2) / characters)
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


def package(work):
    """Float16 weights (half the bytes; evaluated again as shipped), the tokenizer, the record and the card."""
    lm = GPT2LM.from_pretrained(work / "run" / finetune.CHECKPOINT_DIR)
    with checkpoint.atomic_directory(PACKAGE_DIR) as staging:
        lm.gpt2.config.save_pretrained(staging)
        checkpoint.write_safetensors(lm.gpt2.weights, staging / checkpoint.SAFETENSORS_FILE, dtype=np.float16)
        lm.tokenizer.save_pretrained(staging)
        shipped = GPT2LM.from_pretrained(staging)
        run = read_json(work / "run" / finetune.RUN_FILE)
        record = dict(
            model={**MODEL, "vocab_size": lm.config.vocab_size, "parameters": lm.gpt2.count_params()},
            training={**TRAINING, "steps_per_epoch": run["steps_per_epoch"],
                      "runs": read_json(work / "training_runs.json")},
            corpus=read_json(work / "corpus" / "counts.json"),
            evaluation=dict(float32=read_json(work / "evaluation.json"), xz=read_json(work / "baseline.json"),
                            shipped=model_figures(shipped, work)),
            samples=[dict(settings=settings, texts=shipped.generate_text(PROMPTS, **settings))
                     for settings in SAMPLE_SETTINGS],
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


def model_card(record):
    """The model card (README.md), from the packaging record: every figure in it comes from `record`."""
    model, training, evaluation = record["model"], record["training"], record["evaluation"]
    tokens_seen = training["max_steps"] * training["batch_size"] * training["block_size"]
    seconds = sum(run["seconds"] for run in training["runs"])
    rows = []
    for name in SOURCES:
        fp32, shipped, xz = evaluation["float32"][name], evaluation["shipped"][name], evaluation["xz"][name]
        rows.append(f"| {name} | {record['corpus'][name]['valid_documents']:,} | {fp32['characters']:,} | "
                    f"{fp32['loss']:.3f} | {fp32['bits_per_character']:.3f} | {shipped['bits_per_character']:.3f} | "
                    f"{xz['xz_bits_per_character']:.3f} |")
    samples = []
    for sample in record["samples"]:
        samples.append(f"`{sample['settings']}`:\n")
        samples += [f"- {text!r}" for text in sample["texts"]]
        samples.append("")
    runs = "; ".join(f"{run['started']}, {run['seconds']:,} s, steps {run['from_step']}-{run['to_step']}"
                     + (f" ({run['note']})" if run.get("note") else "") for run in training["runs"])
    sources = "\n".join(f"- {name}: {LICENCES[name]}; {record['corpus'][name]['train_characters']:,} training "
                        f"characters" for name in SOURCES)
    return f"""# ko-mini: tfgen's embedded Korean GPT-2

A small Korean GPT-2 trained from scratch by tfgen itself, shipped inside the package so that
tfgen works offline: `GPT2LM.from_pretrained("ko-mini")`, `tfgen.default_model_path()`, and every
`tfgen` command without `--model`. It is small and saw only {tokens_seen / 1e6:.1f} M tokens: its Korean is
often broken and it knows little (see the samples and the validation figures below). Use it to learn
and test tfgen offline, or as a starting point for fine-tuning; for real text, load skt/kogpt2-base-v2.

- GPT-2, {model['n_layer']} layers x {model['n_embd']} wide, {model['n_head']} heads, a {model['n_positions']}-token
  context, no dropout; {model['parameters']:,} parameters (the LM head shares the token embedding).
- SentencePiece unigram tokenizer, {model['vocab_size']:,} pieces, KoGPT2-v1 conventions: `<unk>` 0, `<s>` 1,
  `</s>` 2, `<pad>` 3; byte fallback, so any text round-trips.
- Weights stored as float16 (`model.safetensors`, PyTorch layout; PyTorch's `GPT2LMHeadModel` reads the
  directory too) and loaded as float32.

## Licence

CC BY-SA 4.0: the training text includes CC BY-SA material (Wikipedia, KLUE, KorNLI/KorSTS, news), so
the weights are shared alike.

## Data

Every corpus in the shared Korean data folder except the modern novels (AKS-DHLAB/ModernKoreanNovelsTEI)
and the novel excerpt of NLP-kr/tensorflow-ml-nlp-tf2, which are kept for the fine-tuning demo:

{sources}

Every {VALID_EVERY}th document of each source is held out for validation (an article, a review, a
Bible chapter, a Q/A pair, a sentence).

## Recipe

`python recipes/ko_mini.py` (stages: prepare, tokenizer, baseline, train, evaluate, package; it resumes
where it stopped). Training: tfgen's `finetune` (Keras `fit`) from random weights, packed rows of
{training['block_size']} tokens, batch {training['batch_size']}, AdamW with peak learning rate
{training['learning_rate']}, {training['warmup_steps']} warmup steps then linear decay,
{training['max_steps']:,} steps = {tokens_seen:,} tokens seen
({tokens_seen / (training['steps_per_epoch'] * training['batch_size'] * training['block_size']):.2f} epochs),
bf16 mixed precision on the CPU.

Training ran on a 2-core CPU machine shared with other work, in {len(training['runs'])} runs
({seconds / 60:.0f} min of wall time in all): {runs}.

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
    parser.add_argument("stages", nargs="*", choices=STAGES, default=list(STAGES))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared Korean data folder")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ko-mini", help="corpus, tokenizer and run")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data folder at {args.data}; pass --data with the Korean corpora")
    work = args.work
    if "prepare" in args.stages and not (work / "corpus" / "train.txt").exists():
        prepare(args.data, work)
    if "tokenizer" in args.stages and not (work / "tokenizer").exists():
        train_tokenizer(work)
    if "baseline" in args.stages and not (work / "baseline.json").exists():
        write_json(work / "baseline.json", xz_figures(work))
    if "train" in args.stages:
        train(work)
    if "evaluate" in args.stages and not (work / "evaluation.json").exists():
        write_json(work / "evaluation.json",
                   model_figures(GPT2LM.from_pretrained(work / "run" / finetune.CHECKPOINT_DIR), work))
    if "package" in args.stages:
        package(work)


if __name__ == "__main__":
    main()
