"""A tiny GPT-2 trained briefly on Korean text, for tests that compare against transformers."""

import shutil

import pytest
import tensorflow as tf
from transformers import GPT2Config

from tfgen import GPT2LM, Tokenizer
from tfgen.data import lm_batches


def tiny_config(tokenizer, n_positions=128):
    return GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=n_positions,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def train_tiny_lm(tokenizer, lines, epochs=5, max_tokens=48, learning_rate=1e-2, seed=0):
    """A 2-layer, 64-wide GPT-2 after a few epochs of Keras fit on `lines`, so its logits are far from uniform."""
    tf.keras.utils.set_random_seed(seed)
    lm = GPT2LM(tiny_config(tokenizer), tokenizer)
    lm.compile(optimizer=tf.keras.optimizers.Adam(learning_rate))
    batches = lm_batches(lines, tokenizer, block_size=max_tokens, batch_size=32, layout="documents", seed=seed)
    lm.fit(batches, epochs=epochs, verbose=0)
    return lm


@pytest.fixture(scope="session")
def tiny_lm_dir(spm_dir, ko_lines, tmp_path_factory):
    """A trained tiny GPT-2 saved by save_pretrained: config, tf_model.h5, model.safetensors, tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-lm")
    train_tiny_lm(Tokenizer.from_pretrained(spm_dir), ko_lines).save_pretrained(directory)
    return directory


def copy_without(source, directory, left_out):
    """`directory` with every file of the checkpoint `source` but `left_out`."""
    for path in source.iterdir():
        if path.name != left_out:
            shutil.copy(path, directory / path.name)
    return directory


@pytest.fixture(scope="session")
def safetensors_only_dir(tiny_lm_dir, tmp_path_factory):
    """The same checkpoint without tf_model.h5: weights come from the PyTorch-layout safetensors."""
    return copy_without(tiny_lm_dir, tmp_path_factory.mktemp("tiny-lm-safetensors"), "tf_model.h5")


@pytest.fixture(scope="session")
def h5_only_dir(tiny_lm_dir, tmp_path_factory):
    """The same checkpoint without model.safetensors (which from_pretrained prefers): weights from tf_model.h5."""
    return copy_without(tiny_lm_dir, tmp_path_factory.mktemp("tiny-lm-h5"), "model.safetensors")


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    return GPT2LM.from_pretrained(tiny_lm_dir)


def text_of_tokens(tokenizer, lines, count):
    """The first words of `lines` that make at least `count` tokens, joined by spaces."""
    words = []
    for word in " ".join(lines).split():
        words.append(word)
        if len(tokenizer.encode(" ".join(words))) >= count:
            return " ".join(words)


@pytest.fixture(scope="session")
def long_text(tiny_lm, ko_lines):
    """About three contexts of the tiny GPT-2 (3 x 128 tokens)."""
    return text_of_tokens(tiny_lm.tokenizer, ko_lines, 3 * tiny_lm.net.context)


def load_recording_assigns(load, monkeypatch):
    """(the model `load()` returns, the dtype of every value checkpoint.read_weights assigned to a variable)."""
    from tfgen import checkpoint

    assigned, assign = [], checkpoint._assign

    class Recording:
        def __init__(self, variable):
            self.variable = variable

        def __getattr__(self, name):
            return getattr(self.variable, name)

        def __getitem__(self, key):  # a slice, assigned a block of rows at a time
            return Recording(self.variable[key])

        def assign(self, value):
            assigned.append(tf.as_dtype(value.dtype))
            return self.variable.assign(value)

    monkeypatch.setattr(checkpoint, "_assign", lambda variable, *args: assign(Recording(variable), *args))
    return load(), assigned
