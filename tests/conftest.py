"""Shared fixtures: Korean text from the shared data folder and small tokenizers trained on it."""

import atexit
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

# XLA's persistent compile cache (tfgen._env) goes to a directory of this session, never the user's home;
# subprocesses the tests start inherit it.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="tfgen-test-compile-cache-")
os.environ["TFGEN_COMPILE_CACHE"] = _COMPILE_CACHE
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)

import pytest  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from tfgen.tokenizer import train_sentencepiece  # noqa: E402

DATA_DIR = Path(os.environ.get("TFGEN_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko"))
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>"]


def _every_nth(lines, step, count):
    """``count`` non-empty lines, every ``step``-th, reading no further than needed."""
    lines = (line.rstrip("\n") for line in lines)
    return list(itertools.islice((line for line in itertools.islice(lines, 0, None, step) if line), count))


@pytest.fixture(scope="session")
def ko_data_dir():
    if not DATA_DIR.is_dir():
        pytest.skip(f"Korean data not found at {DATA_DIR} (set TFGEN_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def ko_lines(ko_data_dir):
    """About 2,000 Korean lines: Wikipedia paragraphs, movie reviews and a short story."""
    wiki_path = ko_data_dir / "HyundongHwang_PyTorchDeepLearningStart" / "kowiki_sample.txt"
    with open(wiki_path, encoding="utf-8") as f:
        wiki = _every_nth(f, 10, 900)
    with open(ko_data_dir / "e9t_nsmc" / "ratings_reconstructed.txt", encoding="utf-8") as f:
        next(f)  # header: id, document, label
        reviews = [line.split("\t")[1] for line in itertools.islice(f, 0, 16_000, 20)]
    with open(ko_data_dir / "NLP-kr_tensorflow-ml-nlp-tf2" / "finetune_data.txt", encoding="utf-8") as f:
        story = _every_nth(f, 1, 300)
    return wiki + [review for review in reviews if review] + story


@pytest.fixture(scope="session")
def spm_dir(ko_lines, tmp_path_factory):
    """A directory with ``tokenizer.model`` (SentencePiece, vocab 1000) and its config files."""
    directory = tmp_path_factory.mktemp("spm")
    # Coverage below 1.0 lets ~2,000 distinct Hangul syllables fit a 1,000-piece vocabulary;
    # the rare ones are spelled with byte pieces.
    train_sentencepiece(ko_lines, directory, vocab_size=1000, character_coverage=0.98)
    return directory


def bpe_tokenizer_spec(lines, special_tokens, unk_token, vocab_size, limit_alphabet):
    """A BPE tokenizer.json's contents (Metaspace, byte fallback with its <0xNN> pieces) trained on `lines`."""
    tokenizer = HFTokenizer(models.BPE(unk_token=unk_token, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, limit_alphabet=limit_alphabet, special_tokens=special_tokens, show_progress=False
    )
    tokenizer.train_from_iterator(lines, trainer)
    # The trainer does not add the <0xNN> pieces that byte fallback spells with.
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return spec


@pytest.fixture(scope="session")
def hf_tokenizer_dir(ko_lines, tmp_path_factory):
    """A directory with a BPE ``tokenizer.json`` (Metaspace, byte fallback) and ``tokenizer_config.json``."""
    spec = bpe_tokenizer_spec(ko_lines, SPECIAL_TOKENS, "<unk>", vocab_size=1000, limit_alphabet=400)
    directory = tmp_path_factory.mktemp("hf")
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = dict(zip(["bos_token", "eos_token", "pad_token", "unk_token"], SPECIAL_TOKENS))
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


# The tiny GPT-J (PyTorch-trained, fp16 shards, kogpt-style tokenizer) that the GPT-J tests share.
from tiny_gptj import gptj_bin_dir, gptj_dir, kogpt_tokenizer_dir, tiny_gptj_model  # noqa: E402,F401

# The trained tiny GPT-2 that model, generation and CLI tests share.
from tiny_model import h5_only_dir, long_text, safetensors_only_dir, tiny_lm, tiny_lm_dir  # noqa: E402,F401
