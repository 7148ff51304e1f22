"""A tiny GPT-J trained briefly with transformers' PyTorch class and saved as fp16 shards, with a kogpt-style tokenizer."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from transformers import GPTJConfig, GPTJForCausalLM

from conftest import bpe_tokenizer_spec

# KoGPT's special tokens, as seed 004 names them.
KOGPT_SPECIAL_TOKENS = ["[BOS]", "[EOS]", "[UNK]", "[PAD]", "[MASK]"]


@pytest.fixture(scope="session")
def kogpt_tokenizer_dir(ko_lines, tmp_path_factory):
    """A BPE tokenizer.json (Metaspace, byte fallback) with [BOS] [EOS] [UNK] [PAD] [MASK] and its config."""
    spec = bpe_tokenizer_spec(ko_lines, KOGPT_SPECIAL_TOKENS, "[UNK]", vocab_size=800, limit_alphabet=300)
    directory = tmp_path_factory.mktemp("kogpt-tokenizer")
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = dict(zip(["bos_token", "eos_token", "unk_token", "pad_token", "mask_token"], KOGPT_SPECIAL_TOKENS))
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def _token_rows(tokenizer_dir, lines, length):
    spec = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = spec.token_to_id("[EOS]")
    rows = [spec.encode(line).ids[: length - 1] + [eos] for line in lines]
    return [row for row in rows if len(row) >= 8]


def train_tiny_gptj(tokenizer_dir, lines, steps=150, length=32, seed=0):
    """A 2-layer, 64-wide GPT-J (rotary_dim 8 of head_dim 16) after `steps` Adam steps of PyTorch training."""
    torch.manual_seed(seed)
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    ids = {
        name: KOGPT_SPECIAL_TOKENS.index(token)
        for name, token in [("bos_token_id", "[BOS]"), ("eos_token_id", "[EOS]"), ("pad_token_id", "[PAD]")]
    }
    config = GPTJConfig(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, **ids)
    model = GPTJForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rows = _token_rows(tokenizer_dir, lines, length)
    rng = np.random.default_rng(seed)
    pad = ids["pad_token_id"]
    for _ in range(steps):
        batch = [rows[i] for i in rng.choice(len(rows), 16, replace=False)]
        width = max(map(len, batch))
        tokens = torch.tensor([row + [pad] * (width - len(row)) for row in batch])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])
        labels = torch.where(mask == 1, tokens, -100)
        loss = model(tokens, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_gptj_model(kogpt_tokenizer_dir, ko_lines):
    return train_tiny_gptj(kogpt_tokenizer_dir, ko_lines)


def _saved(model, tokenizer_dir, directory, safe_serialization):
    """`model` in float16 shards (~4 of them) with an index, and the tokenizer files beside them."""
    half = GPTJForCausalLM(model.config).half()
    half.load_state_dict(model.state_dict())
    half.save_pretrained(directory, safe_serialization=safe_serialization, max_shard_size="200KB")
    for path in tokenizer_dir.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    return directory


@pytest.fixture(scope="session")
def gptj_dir(tiny_gptj_model, kogpt_tokenizer_dir, tmp_path_factory):
    """The tiny GPT-J as sharded fp16 safetensors (model.safetensors.index.json) and a kogpt-style tokenizer."""
    return _saved(tiny_gptj_model, kogpt_tokenizer_dir, tmp_path_factory.mktemp("tiny-gptj"), True)


@pytest.fixture(scope="session")
def gptj_bin_dir(tiny_gptj_model, kogpt_tokenizer_dir, tmp_path_factory):
    """The same model as sharded fp16 pytorch_model.bin files (pytorch_model.bin.index.json)."""
    return _saved(tiny_gptj_model, kogpt_tokenizer_dir, tmp_path_factory.mktemp("tiny-gptj-bin"), False)


def pt_reference(directory):
    """transformers' PyTorch GPT-J on the same fp16 files, in float32."""
    return GPTJForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
