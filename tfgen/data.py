"""Training data for a causal language model: documents of text in, batches for Keras `fit` out.

A document is a string: an element of a list or of a `tf.data.Dataset` of
strings, or, from text files, a line or a blank-line-separated paragraph.
Files are read as a stream, never whole. `lm_batches` tokenizes documents
(`document_ids`: the special tokens `Tokenizer.encode` adds, then EOS) and
lays them out as rows of `block_size + 1` tokens:

- "documents": one document per row, cut to fit, right-padded;
- "packed": documents joined into one token stream and cut into full rows
  (a last, partial row is dropped), the standard layout for pretraining.

Each row gives one example `(features, labels, weights)`: features are
`{"input_ids", "attention_mask"}` (the row without its last token), labels
the row without its first token, weights 1.0 on real target tokens and 0.0
on padding. Shapes are static ([batch, block_size]), as XLA and TPUs want.
"""

import itertools
from pathlib import Path

import numpy as np
import tensorflow as tf

LAYOUTS = ("packed", "documents")
ENCODE_GROUP = 256  # documents that cross between Python and tf.data at once
DOCUMENT_UNITS = ("line", "paragraph")


class TextFileError(ValueError):
    """A training file that cannot be used: missing, empty or not UTF-8. The message names the file."""


def read_documents(paths, document="line"):
    """Yields the documents of UTF-8 text files, in order, reading line by line.

    `document` is "line" (each non-blank line) or "paragraph" (runs of
    non-blank lines, separated by blank lines, joined with newlines).
    Raises TextFileError naming the file and line of text that is not UTF-8.
    """
    if document not in DOCUMENT_UNITS:
        raise ValueError(f"document must be one of {DOCUMENT_UNITS}, got {document!r}")
    for path in map(Path, paths):
        if not path.is_file():
            raise TextFileError(f"{path}: no such file; check the path")
        paragraph = []
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise TextFileError(f"{path}, line {number}: not UTF-8 text; convert the file to UTF-8") from None
                if number == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    if paragraph:
                        yield "\n".join(paragraph)
                        paragraph = []
                elif document == "line":
                    yield line
                else:
                    paragraph.append(line)
        if paragraph:
            yield "\n".join(paragraph)


def check_text_files(paths, document="line"):
    """Reads each file through once; returns its document count. Raises TextFileError if one has none."""
    counts = {}
    for path in paths:
        counts[str(path)] = sum(1 for _ in read_documents([path], document))
        if counts[str(path)] == 0:
            raise TextFileError(f"{path}: the file has no text; give a file with at least one non-blank line")
    return counts


def _groups(items, size):
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group


def file_documents(paths, document="line"):
    """A `tf.data.Dataset` of the documents in text files, streamed (see `read_documents`).

    The documents cross from Python in groups: one crossing per document costs more than reading it.
    """
    paths = [str(p) for p in paths]
    return tf.data.Dataset.from_generator(
        lambda: _groups(read_documents(paths, document), ENCODE_GROUP),
        output_signature=tf.TensorSpec([None], tf.string),
    ).unbatch()


def as_documents(source):
    """A `tf.data.Dataset` of strings from a dataset of strings or a list of strings."""
    if isinstance(source, tf.data.Dataset):
        return source
    if isinstance(source, str):
        raise TypeError("pass a list of documents, not a single string (or use file_documents for file paths)")
    return tf.data.Dataset.from_tensor_slices(tf.constant(list(source), tf.string))


def split_validation(documents, fraction):
    """(train, validation) datasets: an evenly spread `fraction` of the documents goes to validation.

    Document i is held out when floor((i + 1) * fraction) > floor(i * fraction),
    so the split is deterministic and needs no pass over the data.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction!r}")
    numbered = documents.enumerate()

    def held_out(i, _):
        i = tf.cast(i, tf.float64)
        return tf.floor((i + 1) * fraction) > tf.floor(i * fraction)

    train = numbered.filter(lambda i, text: tf.logical_not(held_out(i, text))).map(lambda _, text: text)
    valid = numbered.filter(held_out).map(lambda _, text: text)
    return train, valid


def document_ids(tokenizer, text):
    """A training document's ids: `tokenizer.encode(text)` (the special tokens the model sees at generation:
    BOS first for SentencePiece models, none for KoGPT2-v2 and GPT-2), then EOS unless encode added it.

    The EOS ends the document, and in packed rows it is what precedes the next one, as in GPT-2's pre-training.
    """
    ids = tokenizer.encode(text)
    eos = tokenizer.eos_token_id
    return ids if eos is None or ids[-1:] == [eos] else [*ids, eos]


def _encoded_groups(documents, tokenizer):
    """Groups of up to ENCODE_GROUP documents as ragged int32 ids [docs, None], each `document_ids`."""

    def encode(texts):
        rows = [document_ids(tokenizer, text.decode("utf-8")) for text in texts.numpy()]
        return np.asarray([t for row in rows for t in row], np.int32), np.asarray([len(r) for r in rows], np.int64)

    def encode_op(texts):
        flat, lengths = tf.py_function(encode, [texts], [tf.int32, tf.int64])
        flat.set_shape([None])
        lengths.set_shape([None])
        return tf.RaggedTensor.from_row_lengths(flat, lengths)

    return documents.batch(ENCODE_GROUP).map(encode_op, num_parallel_calls=tf.data.AUTOTUNE)


def tokenize(documents, tokenizer):
    """Each document as int32 ids, as `document_ids` gives them."""
    return _encoded_groups(documents, tokenizer).unbatch()


def _packed_rows(groups, row_length):
    """Rows of `row_length` tokens cut from the groups' joined token stream; the last, partial row is dropped."""

    def cut(leftover, group):
        stream = tf.concat([leftover, group.flat_values], axis=0)
        full = tf.shape(stream)[0] // row_length * row_length
        return stream[full:], tf.reshape(stream[:full], [-1, row_length])

    return groups.scan(tf.zeros([0], tf.int32), cut).unbatch()


def _with_mask(ids):
    return ids, tf.ones_like(ids)


def _to_example(ids, mask):
    features = {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]}
    return features, ids[:, 1:], tf.cast(mask[:, 1:], tf.float32)


def lm_batches(
    documents, tokenizer, block_size, batch_size, layout="packed", shuffle_buffer=10_000, seed=None, drop_remainder=True
):
    """Batches of `(features, labels, weights)` for `fit` from documents (a dataset or list of strings).

    Documents are shuffled within `shuffle_buffer` (0: keep their order)
    with `seed`, reshuffled every epoch. With `drop_remainder` every batch
    has `batch_size` rows, so a compiled train step sees one shape only.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size and batch_size must be positive, got {block_size} and {batch_size}")
    documents = as_documents(documents)
    if shuffle_buffer:
        documents = documents.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if layout == "documents":
        rows = tokenize(documents, tokenizer).map(lambda ids: ids[: block_size + 1])
    else:
        rows = _packed_rows(_encoded_groups(documents, tokenizer), block_size + 1)
    batches = rows.map(_with_mask).padded_batch(
        batch_size,
        padded_shapes=([block_size + 1], [block_size + 1]),
        padding_values=(tokenizer.padding_id, 0),
        drop_remainder=drop_remainder,
    )
    return batches.map(_to_example).prefetch(tf.data.AUTOTUNE)


def count_batches(batches):
    """The number of batches in one pass over a finite dataset (goes through it once)."""
    return int(batches.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
