import io
import json
import shutil
import string

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from tfgen import Tokenizer

TEXT = "안녕하세요, 반갑습니다."
# Text a Korean user might type: Hangul syllables, ASCII letters, digits, spaces, punctuation.
typed_text = st.text(
    st.one_of(
        st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),
        st.sampled_from(string.ascii_letters + string.digits + string.punctuation + " "),
    ),
    max_size=60,
)


@pytest.fixture(scope="module")
def sp_tok(spm_dir):
    return Tokenizer.from_pretrained(spm_dir)


@pytest.fixture(scope="module")
def hf_tok(hf_tokenizer_dir):
    return Tokenizer.from_pretrained(hf_tokenizer_dir)


@pytest.fixture(params=["sp", "hf"])
def tok(request, sp_tok, hf_tok):
    return {"sp": sp_tok, "hf": hf_tok}[request.param]


def write_config(directory, name, config):
    (directory / name).write_text(json.dumps(config), encoding="utf-8")


# --- round trips ---------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_sp_decode_encode_round_trips_corpus_lines(sp_tok, ko_lines, data):
    line = data.draw(st.sampled_from(ko_lines))
    assert sp_tok.decode(sp_tok.encode(line)) == line


@settings(max_examples=300, deadline=None)
@given(text=typed_text)
def test_sp_decode_encode_round_trips_typed_text(sp_tok, text):
    # Identity normalisation, kept whitespace and byte fallback: every string survives,
    # including leading/repeated spaces and syllables the model never saw.
    assert sp_tok.decode(sp_tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_hf_decode_encode_round_trips_corpus_lines(hf_tok, ko_lines, data):
    # Only corpus lines: the Metaspace decoder drops a leading space, and the added
    # special tokens are matched inside text ("<s>" typed by a user becomes BOS).
    line = data.draw(st.sampled_from(ko_lines))
    assert hf_tok.decode(hf_tok.encode(line)) == line


# --- special tokens ------------------------------------------------------------


def test_sentencepiece_encode_prepends_bos_unless_told_not_to(sp_tok):
    # KoGPT2-v1's convention (seed 002): BOS first.
    ids = sp_tok.encode(TEXT)
    assert sp_tok.add_bos_token is True and sp_tok.add_eos_token is False
    assert ids[0] == sp_tok.bos_token_id
    assert sp_tok.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert sp_tok.bos_token_id not in ids[1:]


def test_tokenizer_json_adds_what_its_post_processor_adds(hf_tok, hf_tokenizer_dir, ko_lines):
    # The fixture's file has no post-processor (as KoGPT2-v2's): no BOS, as transformers encodes it.
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast.from_pretrained(hf_tokenizer_dir)
    assert hf_tok.add_bos_token is None
    for line in [TEXT, *ko_lines[::200]]:
        assert hf_tok.encode(line) == fast.encode(line) == hf_tok.encode(line, add_special_tokens=False)
    assert hf_tok.bos_token_id not in hf_tok.encode(TEXT)


@pytest.mark.parametrize("template", ["<s> $A", "<s> $A </s>", "$A </s>"])
def test_tokenizer_json_post_processor_template_is_followed(hf_tokenizer_dir, tmp_path, template):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((hf_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    spec["post_processor"] = json.loads(
        processors.TemplateProcessing(
            single=template, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        ).__getstate__()
    )
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    shutil.copy(hf_tokenizer_dir / "tokenizer_config.json", tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    fast = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tok.encode(TEXT) == fast.encode(TEXT)
    assert (tok.encode(TEXT)[0] == tok.bos_token_id) == template.startswith("<s>")
    assert (tok.encode(TEXT)[-1] == tok.eos_token_id) == template.endswith("</s>")


@pytest.mark.parametrize("kind", ["sp", "hf"])
@pytest.mark.parametrize("add_bos, add_eos", [(False, False), (True, True), (False, True)])
def test_tokenizer_config_switches_decide_bos_and_eos(spm_dir, hf_tokenizer_dir, tmp_path, kind, add_bos, add_eos):
    source = {"sp": spm_dir / "tokenizer.model", "hf": hf_tokenizer_dir / "tokenizer.json"}[kind]
    shutil.copy(source, tmp_path)
    write_config(tmp_path, "tokenizer_config.json", {"add_bos_token": add_bos, "add_eos_token": add_eos})
    tok = Tokenizer.from_pretrained(tmp_path)
    plain = tok.encode(TEXT, add_special_tokens=False)
    assert tok.encode(TEXT) == [tok.bos_token_id] * add_bos + plain + [tok.eos_token_id] * add_eos
    saved = tmp_path / "saved"
    saved.mkdir()
    tok.save_pretrained(saved)
    assert Tokenizer.from_pretrained(saved).encode(TEXT) == tok.encode(TEXT)


def test_special_token_overrides_as_transformers_takes_them(hf_tokenizer_dir, spm_dir):
    from transformers import PreTrainedTokenizerFast

    overrides = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tok = Tokenizer.from_pretrained(hf_tokenizer_dir, **overrides)
    fast = PreTrainedTokenizerFast.from_pretrained(hf_tokenizer_dir, **overrides)
    for key in overrides:
        assert getattr(tok, f"{key}_id") == getattr(fast, f"{key}_id"), key
    assert Tokenizer.from_pretrained(spm_dir, pad_token=None).pad_token_id is None
    with pytest.raises(ValueError, match=r"mask_token '<mask>' is not in the vocabulary"):
        Tokenizer.from_pretrained(hf_tokenizer_dir, mask_token="<mask>")
    with pytest.raises(TypeError, match="sep_token"):
        Tokenizer.from_pretrained(hf_tokenizer_dir, sep_token="</s>")


def test_special_ids_come_from_the_sentencepiece_model(spm_dir, tmp_path):
    shutil.copy(spm_dir / "tokenizer.model", tmp_path / "ko.model")
    tok = Tokenizer.from_file(tmp_path / "ko.model")
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    assert tok.all_special_ids == frozenset({1, 2, 3})


def test_config_files_override_the_model(spm_dir, tmp_path):
    shutil.copy(spm_dir / "tokenizer.model", tmp_path)
    config = {"bos_token": "<s>", "eos_token": {"content": "<pad>"}, "pad_token": None}
    write_config(tmp_path, "tokenizer_config.json", config)
    # special_tokens_map.json wins over tokenizer_config.json, as in transformers.
    write_config(tmp_path, "special_tokens_map.json", {"bos_token": "</s>"})
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token, tok.bos_token_id) == ("</s>", 2)
    assert (tok.eos_token, tok.eos_token_id) == ("<pad>", 3)
    assert (tok.pad_token, tok.pad_token_id) == (None, None)
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 0)  # not named: from the model
    assert tok.all_special_ids == frozenset({2, 3})


def test_sentencepiece_without_special_ids_falls_back_to_kogpt2_names(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([TEXT, "오늘은 운수가 좋더니만"] * 20),
        model_writer=model,
        vocab_size=40,
        hard_vocab_limit=False,
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=["<s>", "</s>"],
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tok = Tokenizer.from_file(tmp_path / "tokenizer.model")
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.unk_token == "<unk>"
    assert tok.pad_token is None  # neither a model id nor a "<pad>" piece
    assert tok.all_special_ids == frozenset({tok.bos_token_id, tok.eos_token_id})
    # User-defined pieces are not control symbols: sp.decode alone would print them.
    ids = tok.encode(TEXT) + [tok.eos_token_id]
    assert tok.decode(ids) == TEXT
    # sentencepiece keeps the word-start space that follows a user-defined piece.
    assert tok.decode(ids, skip_special_tokens=False) == f"<s> {TEXT}</s>"


def test_tokenizer_json_without_configs_uses_default_names(hf_tokenizer_dir, tmp_path):
    shutil.copy(hf_tokenizer_dir / "tokenizer.json", tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0, 1, 2, 3)


def test_config_token_missing_from_vocabulary_is_an_error(spm_dir, tmp_path):
    shutil.copy(spm_dir / "tokenizer.model", tmp_path)
    write_config(tmp_path, "tokenizer_config.json", {"pad_token": "[PAD]"})
    with pytest.raises(ValueError, match=r"pad_token '\[PAD\]'"):
        Tokenizer.from_pretrained(tmp_path)


# --- batches -------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_batch_left_pads(tok, ko_lines, add_special_tokens):
    texts = [ko_lines[0], "", TEXT, ko_lines[-1]]
    input_ids, mask = tok.encode_batch(texts, add_special_tokens=add_special_tokens)
    rows = [tok.encode(text, add_special_tokens=add_special_tokens) for text in texts]
    length = max(map(len, rows))
    assert input_ids.dtype == mask.dtype == np.int32
    assert input_ids.shape == mask.shape == (len(texts), length)
    for ids, row, row_mask in zip(rows, input_ids, mask):
        pad = length - len(ids)
        assert row_mask.tolist() == [0] * pad + [1] * len(ids)
        assert row[pad:].tolist() == ids
        assert (row[:pad] == tok.pad_token_id).all()


def test_encode_batch_pads_with_eos_without_a_pad_token(spm_dir, tmp_path):
    shutil.copy(spm_dir / "tokenizer.model", tmp_path)
    write_config(tmp_path, "tokenizer_config.json", {"pad_token": None})
    tok = Tokenizer.from_pretrained(tmp_path)
    input_ids, mask = tok.encode_batch(["가", TEXT])
    assert input_ids[0, 0] == tok.eos_token_id and mask[0, 0] == 0


def test_decode_batch_undoes_encode_batch(tok, ko_lines):
    texts = ko_lines[:5]
    input_ids, _ = tok.encode_batch(texts)
    assert tok.decode_batch(input_ids) == texts


# --- decode --------------------------------------------------------------------


def test_decode_skips_special_tokens_by_default(tok):
    ids = tok.encode(TEXT) + [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]
    assert tok.decode(ids) == TEXT
    assert tok.decode(np.array(ids, dtype=np.int32)) == TEXT


def test_sp_decode_shows_special_tokens_when_asked(sp_tok):
    ids = sp_tok.encode(TEXT) + [sp_tok.eos_token_id, sp_tok.pad_token_id]
    assert sp_tok.decode(ids, skip_special_tokens=False) == f"<s>{TEXT}</s><pad>"


def test_hf_decode_shows_special_tokens_when_asked(hf_tok):
    ids = hf_tok.encode(TEXT) + [hf_tok.eos_token_id, hf_tok.pad_token_id]
    assert hf_tok.decode(ids, skip_special_tokens=False) == f"{TEXT}</s><pad>"
    # The Metaspace decoder strips the word-start space of the first token only.
    assert hf_tok.decode([hf_tok.bos_token_id, *ids], skip_special_tokens=False) == f"<s> {TEXT}</s><pad>"


def test_tokens_and_their_text(tok):
    assert tok.id_to_token(tok.bos_token_id) == "<s>"
    pieces = {i: tok.id_to_token(i) for i in range(tok.vocab_size)}
    word_start = next(i for i, piece in pieces.items() if len(piece) > 1 and piece[0] == "▁")
    assert tok.token_text(word_start) == " " + pieces[word_start][1:]


def test_ids_past_the_vocabulary_spell_nothing_as_in_transformers(tok, hf_tokenizer_dir):
    """A model's embedding may have more rows than its tokenizer has tokens: those ids decode to nothing."""
    from transformers import PreTrainedTokenizerFast

    ids = tok.encode(TEXT)
    beyond = [tok.vocab_size, tok.vocab_size + 63]
    assert tok.decode(ids[:2] + beyond + ids[2:]) == tok.decode(ids)
    assert tok.decode(beyond, skip_special_tokens=False) == ""
    assert tok.token_text(tok.vocab_size) == "" and tok.id_to_token(tok.vocab_size) is None
    fast = PreTrainedTokenizerFast.from_pretrained(hf_tokenizer_dir)
    hf_ids = fast.encode(TEXT)
    assert fast.decode(hf_ids[:2] + [fast.vocab_size + 5] + hf_ids[2:]) == fast.decode(hf_ids)  # the rule copied
    assert fast.convert_ids_to_tokens(fast.vocab_size + 5) is None


# --- saving --------------------------------------------------------------------


def assert_same_tokenizer(a, b, lines):
    assert a.vocab_size == b.vocab_size
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(a, key) == getattr(b, key)
        assert getattr(a, f"{key}_id") == getattr(b, f"{key}_id")
    assert [a.encode(line) for line in lines] == [b.encode(line) for line in lines]


def test_sentencepiece_save_and_load_round_trip(sp_tok, ko_lines, tmp_path):
    sp_tok.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert_same_tokenizer(sp_tok, Tokenizer.from_pretrained(tmp_path), ko_lines[::100])


def test_save_keeps_a_removed_token_removed(spm_dir, tmp_path):
    shutil.copy(spm_dir / "tokenizer.model", tmp_path)
    write_config(tmp_path, "tokenizer_config.json", {"pad_token": None})
    saved = tmp_path / "saved"
    saved.mkdir()
    Tokenizer.from_pretrained(tmp_path).save_pretrained(saved)
    assert Tokenizer.from_pretrained(saved).pad_token is None  # the model's own pad id stays unused


def test_tokenizer_json_save_and_load_round_trip(hf_tok, ko_lines, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert_same_tokenizer(hf_tok, Tokenizer.from_pretrained(tmp_path), ko_lines[::100])


def test_transformers_reads_saved_tokenizer_json(hf_tok, ko_lines, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf_tok.save_pretrained(tmp_path)
    fast = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert fast.all_special_tokens == ["<s>", "</s>", "<unk>", "<pad>"]
    assert (fast.bos_token_id, fast.pad_token_id) == (hf_tok.bos_token_id, hf_tok.pad_token_id)
    for line in ko_lines[::100]:
        assert fast.encode(line, add_special_tokens=False) == hf_tok.encode(line, add_special_tokens=False)
        assert fast.encode(line) == hf_tok.encode(line)


def test_from_pretrained_prefers_sentencepiece(spm_dir, hf_tokenizer_dir, sp_tok, tmp_path):
    shutil.copy(hf_tokenizer_dir / "tokenizer.json", tmp_path)
    shutil.copy(spm_dir / "tokenizer.model", tmp_path / "kogpt2.spiece")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == sp_tok.vocab_size
    assert tok.encode(TEXT) == sp_tok.encode(TEXT)


# --- bad input -----------------------------------------------------------------


def test_missing_paths_raise_file_not_found(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_file(missing / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(missing)


def test_directory_without_tokenizer_file_raises_file_not_found(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_save_pretrained_needs_an_existing_directory(sp_tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        sp_tok.save_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("text", [b"bytes", None, ["a list"]])
def test_encode_rejects_non_str(sp_tok, text):
    with pytest.raises(TypeError, match=type(text).__name__):
        sp_tok.encode(text)
