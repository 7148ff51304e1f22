"""Tokenizer for GPT-2 models: a SentencePiece model or a Hugging Face tokenizer.json.

KoGPT2-v1 ships a SentencePiece model (``*.model`` / ``*.spiece``);
skt/kogpt2-base-v2 ships a ``tokenizer.json``. Both are wrapped behind one
interface. This module does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
# tokenizer_config.json's switches for the special tokens encode adds (transformers' names).
_ADD_TOKEN_KEYS = ("add_bos_token", "add_eos_token")
# Used when neither the configs nor the model name a token, the first the vocabulary has: KoGPT2's names,
# then GPT-2's "<|endoftext|>" (its BOS, EOS and unknown token, as transformers' GPT2Tokenizer defaults).
_DEFAULT_SPECIAL_TOKENS = {
    "bos_token": ("<s>", "<|endoftext|>"),
    "eos_token": ("</s>", "<|endoftext|>"),
    "pad_token": ("<pad>",),
    "unk_token": ("<unk>", "<|endoftext|>"),
}
_SP_SUFFIXES = (".model", ".spiece")
# What a decoder writes for bytes that do not (yet) make a character.
INCOMPLETE = "\ufffd"
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class _SentencePiece:
    filename = "tokenizer.model"

    def __init__(self, path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    def builtin_special_tokens(self):
        ids = {
            "bos_token": self.sp.bos_id(),
            "eos_token": self.sp.eos_id(),
            "pad_token": self.sp.pad_id(),
            "unk_token": self.sp.unk_id(),
        }
        return {key: self.sp.id_to_piece(i) for key, i in ids.items() if i >= 0}

    def token_to_id(self, token):
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk_id for a piece it does not know.
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, token_id):
        return self.sp.id_to_piece(token_id)

    def encode(self, text):
        return self.sp.encode(text)

    def default_added_tokens(self):
        # KoGPT2-v1 (seed 002) and tfgen's SentencePiece models start every text with BOS.
        return {"add_bos_token": True, "add_eos_token": False}

    def token_text(self, token_id):
        if self.sp.is_byte(token_id) or self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return self.sp.id_to_piece(token_id)  # '<0xEC>', '<s>': sp.decode would give '' or '\ufffd'
        return self.sp.id_to_piece(token_id).replace("▁", " ")

    def decode(self, ids, skip_special_tokens):
        if skip_special_tokens:
            return self.sp.decode(ids)
        # sp.decode drops control symbols such as <s>; write them out as text.
        return "".join(
            "".join(map(self.sp.id_to_piece, group)) if control else self.sp.decode(list(group))
            for control, group in itertools.groupby(ids, key=self.sp.is_control)
        )

    def sentencepiece_model(self):
        return self.sp.serialized_model_proto()

    def save(self, path):
        path.write_bytes(self.sentencepiece_model())


class _HuggingFace:
    filename = "tokenizer.json"

    def __init__(self, path):
        import tokenizers  # only tokenizer.json models need it (the LiteRT runtime needs only SentencePiece)

        self.tok = tokenizers.Tokenizer.from_file(str(path))
        decoder = json.loads(self.tok.to_str()).get("decoder") or {}
        self._byte_level = decoder.get("type") == "ByteLevel"

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def builtin_special_tokens(self):
        return {}

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id):
        return self.tok.id_to_token(token_id)

    def encode(self, text, add_special_tokens=False):
        # add_special_tokens: what the file's post-processor adds, as in transformers' encode.
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def default_added_tokens(self):
        return {"add_bos_token": None, "add_eos_token": None}  # None: the post-processor decides

    def token_text(self, token_id):
        alone = self.tok.decode([token_id], skip_special_tokens=False)
        # Decoders such as Metaspace drop the word-start space of a text's first token; the token's text
        # is what it adds after another token.
        twice = self.tok.decode([token_id, token_id], skip_special_tokens=False)
        text = twice[len(alone) :] if twice.startswith(alone) and len(twice) > len(alone) else alone
        if INCOMPLETE in text and INCOMPLETE not in self.id_to_token(token_id):  # only part of a character
            if self._byte_level:
                return _bytes_text(bytes(_BYTE_LEVEL_BYTES[c] for c in self.id_to_token(token_id)))
            return self.id_to_token(token_id)  # a byte-fallback piece such as '<0xEC>'
        return text

    def decode(self, ids, skip_special_tokens):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def sentencepiece_model(self):
        return None

    def save(self, path):
        self.tok.save(str(path))


@dataclasses.dataclass
class Completion:
    """One generated sequence: the whole text, the new text and the new token ids (through EOS)."""

    text: str
    new_text: str
    new_token_ids: list


def completion_texts(completions, return_full_text, single):
    """generate_text's result from complete()'s: per prompt a string (a list when it has several completions);
    one prompt's result alone when `single`."""
    results = [[c.text if return_full_text else c.new_text for c in per_prompt] for per_prompt in completions]
    results = [texts[0] if len(texts) == 1 else texts for texts in results]
    return results[0] if single else results


class Tokenizer:
    """Text <-> token ids for a GPT-2 model.

    Build one with :meth:`from_file` or :meth:`from_pretrained`. The special
    tokens (``bos_token`` ... ``mask_token``, ``None`` where the tokenizer has
    none) and their ids are plain attributes.

    Which special tokens :meth:`encode` adds follows the files, as transformers
    does: ``add_bos_token`` / ``add_eos_token`` where tokenizer_config.json sets
    them; otherwise a SentencePiece model adds BOS first (KoGPT2-v1) and a
    tokenizer.json what its post-processor adds (KoGPT2-v2's and GPT-2's add
    nothing). The two attributes are None when the post-processor decides.
    """

    # Set in __init__ for each of _SPECIAL_TOKEN_KEYS: the token and its id, None where the tokenizer has none.
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    mask_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    mask_token_id: int | None

    def __init__(self, backend, special_tokens, added_tokens=None):
        self._backend = backend
        self._vocab_size = backend.vocab_size  # read once: tokenizers' get_vocab_size builds the whole vocabulary
        for key in _SPECIAL_TOKEN_KEYS:
            token = special_tokens.get(key)
            token_id = None if token is None else backend.token_to_id(token)
            if token is not None and token_id is None:
                raise ValueError(
                    f"{key} {token!r} is not in the vocabulary; name a token the tokenizer has "
                    f"(see its tokenizer.json or SentencePiece model)"
                )
            setattr(self, key, token)
            setattr(self, f"{key}_id", token_id)
        ids = {"add_bos_token": self.bos_token_id, "add_eos_token": self.eos_token_id}
        if added_tokens and any(added_tokens.get(key) is not None for key in _ADD_TOKEN_KEYS):
            added = {key: bool(added_tokens.get(key)) for key in _ADD_TOKEN_KEYS}
            for key, token_id in ids.items():
                if added[key] and token_id is None:
                    raise ValueError(
                        f"tokenizer_config.json sets {key}, but the tokenizer has no such token; "
                        "name it (bos_token / eos_token) or unset the switch"
                    )
        else:  # the backend's rule, where the token exists
            added = {
                key: add if add is None else add and ids[key] is not None
                for key, add in backend.default_added_tokens().items()
            }
        self.add_bos_token, self.add_eos_token = added["add_bos_token"], added["add_eos_token"]
        self.all_special_ids = frozenset(
            i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id) if i is not None
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **special_tokens: str) -> Tokenizer:
        """Load a SentencePiece ``.model``/``.spiece`` file or a ``tokenizer.json``.

        Special tokens come from ``special_tokens`` (``bos_token="</s>"``,
        ``pad_token=None`` ..., as ``PreTrainedTokenizerFast.from_pretrained``
        takes them), then ``special_tokens_map.json`` and
        ``tokenizer_config.json`` beside the file, in that order, as in
        transformers. Tokens none of them names come from the SentencePiece
        model's own ids, else are ``<s> </s> <pad> <unk>`` where the vocabulary
        has them, else GPT-2's ``<|endoftext|>`` (BOS, EOS and unknown). A
        token not in the vocabulary is a ValueError.
        """
        unknown = sorted(set(special_tokens) - set(_SPECIAL_TOKEN_KEYS))
        if unknown:
            raise TypeError(
                f"unknown special token argument(s) {', '.join(unknown)}; expected {', '.join(_SPECIAL_TOKEN_KEYS)}"
            )
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer file at {path} (expected a SentencePiece *.model/*.spiece file or a tokenizer.json)"
            )
        backend: _SentencePiece | _HuggingFace
        if path.suffix in _SP_SUFFIXES:
            backend = _SentencePiece(path)
        elif path.suffix == ".json":
            backend = _HuggingFace(path)
        else:
            raise ValueError(f"{path}: expected a *.model, *.spiece or tokenizer.json file")

        tokens = backend.builtin_special_tokens()
        for key, names in _DEFAULT_SPECIAL_TOKENS.items():
            if tokens.get(key) is None:
                tokens[key] = next((name for name in names if backend.token_to_id(name) is not None), None)
        added_tokens = {}
        for name in _CONFIG_FILES:
            config = _read_json(path.parent / name)
            tokens.update(_special_tokens(config))
            added_tokens.update({key: config[key] for key in _ADD_TOKEN_KEYS if key in config})
        return cls(backend, {**tokens, **special_tokens}, added_tokens)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **special_tokens: str) -> Tokenizer:
        """Load the tokenizer saved in ``directory``.

        A SentencePiece model is preferred over ``tokenizer.json``:
        ``tokenizer.model`` first, then the directory's only ``*.model`` or
        ``*.spiece`` file. See :meth:`from_file` for the special tokens and
        the ``special_tokens`` overrides.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
        if (directory / "tokenizer.model").is_file():
            return cls.from_file(directory / "tokenizer.model", **special_tokens)
        sp_files = sorted(p for p in directory.iterdir() if p.suffix in _SP_SUFFIXES)
        if len(sp_files) > 1:
            names = ", ".join(p.name for p in sp_files)
            raise ValueError(f"{directory} holds several SentencePiece models ({names}); use Tokenizer.from_file")
        if sp_files:
            return cls.from_file(sp_files[0], **special_tokens)
        if (directory / "tokenizer.json").is_file():
            return cls.from_file(directory / "tokenizer.json", **special_tokens)
        raise FileNotFoundError(
            f"no tokenizer file in {directory} (expected tokenizer.model, *.model, *.spiece or tokenizer.json)"
        )

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write the tokenizer file, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        A SentencePiece model is written as ``tokenizer.model``, a Hugging Face
        one as ``tokenizer.json`` (loadable by ``PreTrainedTokenizerFast``).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"directory {directory} does not exist")
        self._backend.save(directory / self._backend.filename)
        tokens = {key: getattr(self, key) for key in _SPECIAL_TOKEN_KEYS}
        config = dict(tokens)  # explicit nulls keep "no such token" on reload
        config.update({key: getattr(self, key) for key in _ADD_TOKEN_KEYS if getattr(self, key) is not None})
        if isinstance(self._backend, _HuggingFace):
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        special_map = {key: token for key, token in tokens.items() if token is not None}
        _write_json(directory / "tokenizer_config.json", config)
        _write_json(directory / "special_tokens_map.json", special_map)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def sentencepiece_model(self):
        """The serialized SentencePiece model (bytes), or None for a tokenizer.json tokenizer."""
        return self._backend.sentencepiece_model()

    @property
    def padding_id(self):
        """The id that pads batches: the pad token's, else the EOS token's, else 0."""
        return next((i for i in (self.pad_token_id, self.eos_token_id) if i is not None), 0)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, the BOS/EOS the files say (see the class)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if add_special_tokens and self.add_bos_token is None:
            return self._backend.encode(text, add_special_tokens=True)
        ids = self._backend.encode(text)
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token
        return ids

    def encode_batch(self, texts, add_special_tokens=True):
        """Encode and left-pad ``texts``; returns int32 ``(input_ids, attention_mask)``, both ``[B, L]``.

        Rows are padded with `padding_id`.
        """
        return self.left_pad([self.encode(text, add_special_tokens=add_special_tokens) for text in texts])

    def left_pad(self, rows):
        """Lists of ids left-padded with `padding_id` to the longest; int32 ``(input_ids, attention_mask)``."""
        length = max(map(len, rows), default=0)
        input_ids = np.full((len(rows), length), self.padding_id, dtype=np.int32)
        attention_mask = np.zeros((len(rows), length), dtype=np.int32)
        for row, ids in enumerate(rows):
            if ids:
                input_ids[row, -len(ids) :] = ids
                attention_mask[row, -len(ids) :] = 1
        return input_ids, attention_mask

    def knows(self, token_id):
        """Whether ``token_id`` is in the vocabulary (a model's embedding may have more rows than it)."""
        return 0 <= token_id < self._vocab_size

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or 1-D array); BOS/EOS/pad are dropped if ``skip_special_tokens``.

        Ids the vocabulary lacks spell nothing, as in transformers' fast tokenizers.
        """
        ids = [i for i in map(int, ids) if self.knows(i)]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return self._backend.decode(ids, skip_special_tokens)

    def completion(self, prompt_ids, new_ids, eos_ids, prompt_text=None):
        """The `Completion` of a prompt's real ids by generated ids, cut after the first of `eos_ids`.

        The new text is the full text minus the decoded prompt (as transformers'
        pipeline gives it), or the new ids decoded alone where the full text does
        not start with the prompt's; `prompt_text` saves decoding the prompt again.
        """
        new_ids = [int(t) for t in new_ids]
        ends = [j for j, t in enumerate(new_ids) if t in eos_ids]
        new_ids = new_ids[: ends[0] + 1] if ends else new_ids
        prompt_text = self.decode(prompt_ids) if prompt_text is None else prompt_text
        text = self.decode(list(prompt_ids) + new_ids)
        new_text = text[len(prompt_text) :] if text.startswith(prompt_text) else self.decode(new_ids)
        return Completion(text, new_text, new_ids)

    def text_pieces(self, prompt_ids, id_blocks, eos_ids, prompt_text=None):
        """The new text of a completion as its ids arrive in blocks, in pieces that join to `completion`'s new text.

        A piece never ends inside a character: text that ends in U+FFFD (bytes
        that do not make a character yet) waits for the rest of its bytes.
        """
        prompt_text = self.decode(prompt_ids) if prompt_text is None else prompt_text
        new_ids, sent = [], ""
        for block in id_blocks:
            new_ids.extend(int(t) for t in block)
            text = self.completion(prompt_ids, new_ids, eos_ids, prompt_text).new_text.rstrip(INCOMPLETE)
            if text.startswith(sent) and len(text) > len(sent):
                yield text[len(sent) :]
                sent = text
        final = self.completion(prompt_ids, new_ids, eos_ids, prompt_text).new_text
        if not final.startswith(sent):  # SentencePiece and byte-fallback decoders only ever add text at the end
            raise RuntimeError(f"the tokenizer's text changed from {sent!r} to {final!r} as tokens were added")
        if final != sent:
            yield final[len(sent) :]

    def decode_batch(self, rows: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` for each row of ``rows``."""
        return [self.decode(row, skip_special_tokens) for row in rows]

    def id_to_token(self, token_id):
        """The raw vocabulary piece of ``token_id``, e.g. ``'▁안녕'``; None for an id the vocabulary lacks."""
        token_id = int(token_id)
        return self._backend.id_to_token(token_id) if self.knows(token_id) else None

    def token_text(self, token_id):
        """The text ``token_id`` adds, as ``decode([token_id])`` shows it (``' most'``, ``' 안녕'``).

        A word-start token keeps its space, also where the decoder drops it from
        a text's first token; special tokens are shown (``'<s>'``), and a token
        that is only part of a character shows those bytes as ``<0xNN>``
        (``' <0xEC><0x95>'``) instead of a replacement character; an id the
        vocabulary lacks shows as ``''``, what ``decode`` makes of it.
        """
        token_id = int(token_id)
        return self._backend.token_text(token_id) if self.knows(token_id) else ""


def warn_if_vocabulary_differs(tokenizer, model_vocab_size, model_path):
    """One warning where a model's embedding rows and its tokenizer's vocabulary differ in size."""
    if tokenizer is None or tokenizer.vocab_size == model_vocab_size:
        return
    if tokenizer.vocab_size < model_vocab_size:
        effect = (
            f"ids {tokenizer.vocab_size} to {model_vocab_size - 1} have no token and decode to nothing, "
            "as in transformers"
        )
    else:
        effect = f"token ids from {model_vocab_size} on have no embedding row; the model cannot read them"
    warnings.warn(
        f"{model_path}: the model's vocabulary has {model_vocab_size} ids, its tokenizer's "
        f"{tokenizer.vocab_size}: {effect}",
        stacklevel=3,
    )


def _byte_level_alphabet():
    """Byte-level BPE's character for each byte: printable Latin-1 bytes stand for themselves, the other 68
    bytes (controls, space, DEL, NBSP, soft hyphen) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(0x100 + i): b for i, b in enumerate(others)}}


_BYTE_LEVEL_BYTES = _byte_level_alphabet()


def _bytes_text(data):
    """UTF-8 ``data`` as text, with bytes that are not a whole character written as ``<0xNN>``."""
    parts = []
    while data:
        try:
            parts.append(data.decode("utf-8"))
            break
        except UnicodeDecodeError as error:
            parts.append(data[: error.start].decode("utf-8"))
            parts.extend(f"<0x{byte:02X}>" for byte in data[error.start : error.end])
            data = data[error.end :]
    return "".join(parts)


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _special_tokens(config):
    """The special tokens a transformers config file names (a value may be a dict with "content")."""
    tokens = {}
    for key in _SPECIAL_TOKEN_KEYS:
        if key in config:
            value = config[key]
            tokens[key] = value["content"] if isinstance(value, dict) else value
    return tokens


def _write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def train_sentencepiece(
    texts, directory, vocab_size, model_type="unigram", character_coverage=0.9995, input_sentence_size=2_000_000
):
    """Trains a KoGPT2-v1-style SentencePiece tokenizer on an iterable of texts and saves it in `directory`.

    Ids: <unk> 0, <s> 1, </s> 2, <pad> 3. Identity normalisation, kept
    whitespace and byte fallback make decode(encode(text)) == text for any
    text; characters below the coverage are spelled with byte pieces. Corpora
    with more than `input_sentence_size` texts are sampled down to that many.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            byte_fallback=True,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    except RuntimeError as error:  # e.g. "Vocabulary size too high (8000). Please set it to a value <= 1518."
        raise ValueError(f"SentencePiece training failed: {error}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _SentencePiece.filename
    path.write_bytes(model.getvalue())
    tokenizer = Tokenizer.from_file(path)
    tokenizer.save_pretrained(directory)
    return tokenizer
