"""The embedded Korean model, ko-mini: shipped in the package, loads offline by name, and is what the CLI uses."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tfgen
from tfgen import GPT2LM

MAX_PACKAGE_BYTES = 50 * 2**20
HANGUL = range(0xAC00, 0xD7A4)


def _has_hangul(text):
    return any(ord(c) in HANGUL for c in text)


@pytest.fixture(scope="module")
def ko_mini():
    return GPT2LM.from_pretrained("ko-mini")


def test_the_package_holds_the_model_within_50_mb():
    directory = tfgen.default_model_path()
    names = {path.name for path in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "README.md", "training.json"} <= names
    assert sum(path.stat().st_size for path in directory.iterdir()) <= MAX_PACKAGE_BYTES


def test_short_name_and_default_path_load_the_same_model(ko_mini):
    by_path = GPT2LM.from_pretrained(tfgen.default_model_path())
    ids = np.array([ko_mini.tokenizer.encode("안녕하세요")], np.int32)
    np.testing.assert_array_equal(ko_mini(ids).numpy(), by_path(ids).numpy())


def test_kogpt2_conventions_and_a_256_token_context(ko_mini):
    tokenizer = ko_mini.tokenizer
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    )
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert ko_mini.config.n_positions >= 256
    assert ko_mini.config.vocab_size == tokenizer.vocab_size


def test_it_continues_korean_prompts_in_korean(ko_mini):
    texts = ko_mini.generate_text(
        ["안녕하세요", "근육이 커지기 위해서는"], max_new_tokens=24, min_new_tokens=12, return_full_text=False
    )
    assert all(_has_hangul(text) for text in texts)


def test_it_prefers_korean_word_order(ko_mini):
    """A trained model finds a well-formed sentence likelier than its words shuffled; random weights would not care."""
    good, shuffled = ko_mini.score(["나는 오늘 아침에 학교에 갔다.", "갔다 학교에 아침에 오늘 나는."])
    assert good["logprob"] > shuffled["logprob"] + 5


def test_the_weights_match_the_training_record(ko_mini):
    record = json.loads((tfgen.default_model_path() / "training.json").read_text(encoding="utf-8"))
    assert record["model"]["parameters"] == ko_mini.gpt2.count_params()
    assert record["model"]["n_layer"] == ko_mini.config.n_layer and record["model"]["n_embd"] == ko_mini.config.n_embd


@pytest.mark.slow
def test_pytorch_reads_the_shipped_checkpoint(ko_mini):
    torch = pytest.importorskip("torch")
    from transformers import GPT2LMHeadModel

    reference = GPT2LMHeadModel.from_pretrained(tfgen.default_model_path()).eval()
    ids = np.array([ko_mini.tokenizer.encode("근육이 커지기 위해서는")], np.int32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ko_mini(ids).numpy(), expected, atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_the_cli_uses_it_offline_without_model_argument():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tfgen", "generate", "안녕하세요", "--min-new-tokens", "12", "--max-new-tokens", "16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("안녕하세요") and _has_hangul(result.stdout[len("안녕하세요") :])
