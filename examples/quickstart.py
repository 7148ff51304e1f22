"""tfgen end to end on a fresh machine: train a small Korean GPT-2, save it, load it, generate.

Until tfgen ships its own Korean model, this trains a SentencePiece tokenizer
and a small GPT-2 on Korean text for a minute or two (Keras fit), saves an
HF-layout checkpoint, reloads it and decodes the seeds' prompts greedily and
by sampling, with the compiled decode loop.

    python examples/quickstart.py [--data ../shared/data/ko] [--output runs/quickstart]
"""

import argparse
import itertools
import time
from pathlib import Path

from tfgen import GPT2LM, training  # first: tfgen sets TensorFlow's environment before it loads

import tensorflow as tf
from transformers import GPT2Config

from tfgen.tokenizer import train_sentencepiece
from tfgen.data import lm_batches

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ko"
PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때"]


def korean_lines(data_dir, count):
    """Non-empty lines of the Korean Wikipedia sample and the chatbot questions."""
    with open(data_dir / "HyundongHwang_PyTorchDeepLearningStart" / "kowiki_sample.txt", encoding="utf-8") as f:
        wiki = [line.strip() for line in itertools.islice(f, count) if line.strip()]
    with open(data_dir / "songys_Chatbot_data" / "ChatbotData.csv", encoding="utf-8") as f:
        next(f)
        chat = [line.split(",")[0] for line in itertools.islice(f, count)]
    return wiki + chat


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared Korean data folder")
    parser.add_argument("--output", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    tf.keras.utils.set_random_seed(0)
    lines = korean_lines(args.data, 4000)
    tokenizer = train_sentencepiece(lines, args.output / "tokenizer", vocab_size=4000)
    lm = GPT2LM.from_config(GPT2Config(n_positions=256, n_embd=128, n_layer=4, n_head=4), tokenizer)
    batches = lm_batches(lines, tokenizer, block_size=32, batch_size=32, layout="documents", seed=0)
    lm.compile(optimizer=training.adamw(3e-3, weight_decay=0.0))
    print(f"training a {lm.count_params():,}-parameter GPT-2 on {len(lines):,} lines")
    lm.fit(batches, epochs=args.epochs, verbose=2)
    lm.save_pretrained(args.output / "model")

    lm = GPT2LM.from_pretrained(args.output / "model")
    for settings in [dict(), dict(do_sample=True, top_k=50, top_p=0.95, seed=0)]:
        start = time.perf_counter()
        texts = lm.generate_text(PROMPTS, max_new_tokens=32, **settings)
        print(f"\n{settings or 'greedy'} ({time.perf_counter() - start:.1f} s, compile included)")
        for text in texts:
            print(" ", text)
    print(f"\nsaved to {args.output / 'model'}; try: tfgen generate 안녕하세요 --model {args.output / 'model'}")


if __name__ == "__main__":
    main()
