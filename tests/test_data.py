"""tfgen.data: documents from files, lists and datasets, laid out as padded documents or packed blocks."""

import shutil

import numpy as np
import pytest
import tensorflow as tf

from tfgen import data


def _batches(dataset):
    return [
        (f["input_ids"].numpy(), f["attention_mask"].numpy(), labels.numpy(), weights.numpy())
        for f, labels, weights in dataset
    ]


def _framed(tok, text):
    return [tok.bos_token_id, *tok.encode(text, add_special_tokens=False), tok.eos_token_id]


def test_documents_layout_is_one_right_padded_document_per_row(tiny_lm):
    tok = tiny_lm.tokenizer
    texts = ["안녕하세요", "근육이 커지기 위해서는 단백질이 필요하다", "이때"]
    ((ids, mask, labels, weights),) = _batches(
        data.lm_batches(texts, tok, block_size=16, batch_size=3, layout="documents", shuffle_buffer=0)
    )
    assert ids.shape == labels.shape == weights.shape == (3, 16)
    for row, text in enumerate(texts):
        framed = _framed(tok, text)[:17]
        n = len(framed)
        np.testing.assert_array_equal(ids[row, : n - 1], framed[:-1])
        np.testing.assert_array_equal(labels[row, : n - 1], framed[1:])
        np.testing.assert_array_equal(weights[row], np.arange(16) < n - 1)
        np.testing.assert_array_equal(mask[row], np.arange(16) < n)
        assert (ids[row, n:] == tok.pad_token_id).all()


def test_long_documents_are_cut_to_the_block(tiny_lm, ko_lines):
    tok = tiny_lm.tokenizer
    text = max(ko_lines, key=len)
    ((ids, mask, labels, weights),) = _batches(
        data.lm_batches([text], tok, block_size=8, batch_size=1, layout="documents", shuffle_buffer=0)
    )
    framed = _framed(tok, text)
    np.testing.assert_array_equal(ids[0], framed[:8])
    np.testing.assert_array_equal(labels[0], framed[1:9])
    assert weights.all() and mask.all()


def test_packed_layout_cuts_the_joined_token_stream_into_blocks(tiny_lm, ko_lines):
    tok = tiny_lm.tokenizer
    texts = ko_lines[:40]
    block = 24
    batches = _batches(
        data.lm_batches(texts, tok, block_size=block, batch_size=4, shuffle_buffer=0, drop_remainder=False)
    )
    stream = np.concatenate([_framed(tok, t) for t in texts])
    rows = np.concatenate([b[0] for b in batches]), np.concatenate([b[2] for b in batches])
    weights = np.concatenate([b[3] for b in batches])
    full_rows = len(stream) // (block + 1)
    for r in range(full_rows):
        piece = stream[r * (block + 1) : (r + 1) * (block + 1)]
        np.testing.assert_array_equal(rows[0][r], piece[:-1])
        np.testing.assert_array_equal(rows[1][r], piece[1:])
    assert len(rows[0]) == full_rows and weights.all()  # only full rows: the last, partial one is dropped


def test_drop_remainder_gives_one_static_shape(tiny_lm, ko_lines):
    dataset = data.lm_batches(ko_lines[:50], tiny_lm.tokenizer, block_size=16, batch_size=7, seed=0)
    features, labels, weights = dataset.element_spec
    assert features["input_ids"].shape == labels.shape == weights.shape == (7, 16)


def test_shuffling_is_seeded(tiny_lm, ko_lines):
    def first_ids(seed):
        dataset = data.lm_batches(
            ko_lines[:200], tiny_lm.tokenizer, block_size=16, batch_size=4, layout="documents", seed=seed
        )
        return next(iter(dataset))[0]["input_ids"].numpy()

    np.testing.assert_array_equal(first_ids(1), first_ids(1))
    assert not np.array_equal(first_ids(1), first_ids(2))


def test_files_stream_lines_or_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\ufeff첫 줄\n둘째 줄\n\n\n셋째 문단\n  \n넷째\n", encoding="utf-8")
    assert list(data.read_documents([path])) == ["첫 줄", "둘째 줄", "셋째 문단", "넷째"]
    assert list(data.read_documents([path], "paragraph")) == ["첫 줄\n둘째 줄", "셋째 문단", "넷째"]
    from_tf = [t.decode() for t in data.file_documents([path, path], "paragraph").as_numpy_iterator()]
    assert from_tf == ["첫 줄\n둘째 줄", "셋째 문단", "넷째"] * 2
    assert data.check_text_files([path]) == {str(path): 4}


def test_a_dataset_of_strings_is_a_source(tiny_lm, ko_lines):
    texts = ko_lines[:20]
    from_list = _batches(data.lm_batches(texts, tiny_lm.tokenizer, 8, 2, shuffle_buffer=0))
    from_dataset = _batches(
        data.lm_batches(tf.data.Dataset.from_tensor_slices(texts), tiny_lm.tokenizer, 8, 2, shuffle_buffer=0)
    )
    assert len(from_list) == len(from_dataset) > 1
    for list_batch, dataset_batch in zip(from_list, from_dataset):
        for a, b in zip(list_batch, dataset_batch):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_validation_split_holds_out_the_fraction_and_keeps_every_document_once(fraction):
    texts = [f"문서 {i}" for i in range(200)]
    train, valid = data.split_validation(data.as_documents(texts), fraction)
    train = [t.decode() for t in train.as_numpy_iterator()]
    valid = [t.decode() for t in valid.as_numpy_iterator()]
    assert len(valid) == round(200 * fraction)
    assert sorted(train + valid) == sorted(texts)


def test_bad_files_are_named(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(data.TextFileError, match="missing.txt: no such file"):
        data.check_text_files([missing])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(data.TextFileError, match="blank.txt: the file has no text"):
        data.check_text_files([blank])
    legacy = tmp_path / "euc-kr.txt"
    legacy.write_bytes("첫 줄\n".encode() + "둘째 줄\n".encode("euc-kr"))
    with pytest.raises(data.TextFileError, match="euc-kr.txt, line 2: not UTF-8"):
        data.check_text_files([legacy])


def test_a_fresh_pipeline_repeats_the_seeded_order_across_epochs_so_skipping_resumes_it(tiny_lm, ko_lines):
    def pipeline():
        return data.lm_batches(
            ko_lines[:60], tiny_lm.tokenizer, block_size=16, batch_size=4, layout="documents", seed=3
        ).repeat()

    whole = [f["input_ids"].numpy() for f, _, _ in pipeline().take(40)]  # several epochs of 15 batches
    resumed = [f["input_ids"].numpy() for f, _, _ in pipeline().skip(22).take(18)]
    for a, b in zip(whole[22:], resumed):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(whole[0], whole[15])  # each epoch has its own order


def test_a_document_is_what_encode_gives_then_one_eos(hf_tokenizer_dir, spm_dir, tmp_path):
    from tfgen import Tokenizer

    text = "근육이 커지기 위해서는"
    hf = Tokenizer.from_pretrained(hf_tokenizer_dir)  # no post-processor (as KoGPT2-v2's file): no BOS
    assert data.document_ids(hf, text) == [*hf.encode(text, add_special_tokens=False), hf.eos_token_id]
    sp = Tokenizer.from_pretrained(spm_dir)  # SentencePiece: BOS first, as at generation
    assert data.document_ids(sp, text) == [sp.bos_token_id, *sp.encode(text, add_special_tokens=False), sp.eos_token_id]
    shutil.copy(spm_dir / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": true, "add_eos_token": true}')
    both = Tokenizer.from_pretrained(tmp_path)  # encode adds the EOS already: not a second one
    assert data.document_ids(both, text) == both.encode(text) and both.encode(text)[-1] == both.eos_token_id
    assert both.encode(text)[-2] != both.eos_token_id
