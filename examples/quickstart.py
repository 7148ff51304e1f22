"""tfgen's main job on a fresh machine, offline: Korean text from the embedded model, ko-mini.

Loads the model that ships inside the package (no network, no download) and
continues the seeds' prompts with the decoding strategies the seeds teach:
greedy, beam search, n-gram blocking with a repetition penalty, and top-k /
top-p sampling, all in one compiled decode loop; then shows the model's
step-by-step top choices and the probability of two sentences.

    python examples/quickstart.py [--model ko-mini] [--max-new-tokens 40]
"""

import argparse
import time

import tfgen  # first: tfgen sets TensorFlow's environment before it loads

PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때"]
STRATEGIES = {
    "greedy": dict(),
    "beam search, 4 beams": dict(num_beams=4, early_stopping=True),
    "beams + no_repeat_ngram_size=3, repetition_penalty=1.2": dict(
        num_beams=4, no_repeat_ngram_size=3, repetition_penalty=1.2
    ),
    "sampling, top_k=50, top_p=0.95, temperature=0.8": dict(
        do_sample=True, top_k=50, top_p=0.95, temperature=0.8, seed=0
    ),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ko-mini", help="embedded model name or checkpoint directory")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    lm = tfgen.GPT2LM.from_pretrained(args.model)
    print(
        f"model: {args.model} ({lm.count_params():,} parameters, {lm.config.n_layer} layers x "
        f"{lm.config.n_embd}, vocabulary {lm.tokenizer.vocab_size:,})"
    )
    for name, settings in STRATEGIES.items():
        start = time.perf_counter()
        texts = lm.generate_text(PROMPTS, max_new_tokens=args.max_new_tokens, **settings)
        print(f"\n{name} ({time.perf_counter() - start:.1f} s, the first call of a strategy compiles it)")
        for text in texts:
            print(" ", text)

    print("\ntop 5 next tokens, step by step, after '근육이 커지기 위해서는' (greedy path):")
    for row in lm.top_choices("근육이 커지기 위해서는", steps=5, k=5):
        print(f"  {row['input']!r:>24} -> " + ", ".join(f"{token!r} {p:.2f}" for token, p in row["choices"]))

    print("\nsentence log-probabilities:")
    sentences = ["나는 오늘 학교에 갔다.", "학교에 나는 갔다 오늘."]
    for sentence, result in zip(sentences, lm.score(sentences)):
        print(f"  {sentence}: log p = {result['logprob']:.2f}, perplexity {result['perplexity']:.1f}")


if __name__ == "__main__":
    main()
