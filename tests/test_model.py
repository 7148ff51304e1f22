"""GPT2LM as a Keras model and as an HF-layout checkpoint that transformers reads."""

import os

import numpy as np
import pytest
import tensorflow as tf
import torch
from transformers import GPT2LMHeadModel, TFGPT2LMHeadModel

from tfgen import GPT2LM, checkpoint
from tiny_model import load_recording_assigns, tiny_config

TEXTS = ["안녕하세요", "근육이 커지기 위해서는 단백질이 필요하다"]


@pytest.fixture(scope="module")
def batch(tiny_lm):
    return tiny_lm.tokenizer.encode_batch(TEXTS)


def _pt_logits(directory, ids, mask):
    model = GPT2LMHeadModel.from_pretrained(directory).eval()
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.numpy()


def test_saved_checkpoint_gives_the_same_logits_in_transformers_tf_and_pytorch(tiny_lm, tiny_lm_dir, batch):
    ids, mask = batch
    ours = tiny_lm(ids, mask).numpy()
    real = mask == 1
    tf_model = TFGPT2LMHeadModel.from_pretrained(tiny_lm_dir, use_safetensors=False)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    tf_logits = tf_model(ids, attention_mask=mask, position_ids=positions).logits.numpy()
    np.testing.assert_allclose(ours[real], tf_logits[real], atol=1e-4)
    np.testing.assert_allclose(ours[real], _pt_logits(tiny_lm_dir, ids, mask)[real], atol=1e-4)


def test_safetensors_checkpoint_loads_the_same_weights(tiny_lm, safetensors_only_dir, batch):
    ids, mask = batch
    loaded = GPT2LM.from_pretrained(safetensors_only_dir)
    np.testing.assert_array_equal(loaded(ids, mask).numpy(), tiny_lm(ids, mask).numpy())
    assert loaded.tokenizer.encode(TEXTS[1]) == tiny_lm.tokenizer.encode(TEXTS[1])


def test_pytorch_bin_loads_the_same_weights(tiny_lm, tiny_lm_dir, tmp_path, batch):
    # Read by tfgen's own pickle reader (tests/test_hub_checkpoints.py also runs it where torch cannot be imported).
    directory = tmp_path / "pt"
    GPT2LMHeadModel.from_pretrained(tiny_lm_dir).save_pretrained(directory, safe_serialization=False)
    tiny_lm.tokenizer.save_pretrained(directory)
    ids, mask = batch
    loaded = GPT2LM.from_pretrained(directory)
    np.testing.assert_array_equal(loaded(ids, mask).numpy(), tiny_lm(ids, mask).numpy())


def test_missing_paths_and_unreachable_hub_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        GPT2LM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT2LM.from_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not fetch 'skt/kogpt2-base-v2'"):
        GPT2LM.from_pretrained("skt/kogpt2-base-v2")


def test_a_failed_save_leaves_the_old_checkpoint_and_no_temporary_files(tiny_lm, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    tiny_lm.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_lm.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with pytest.raises(RuntimeError):
        tiny_lm.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_keras_api_summary_predict_and_weights(tiny_lm, tmp_path, batch, capsys):
    tiny_lm.summary()
    assert "Total params" in capsys.readouterr().out
    ids, mask = batch
    predicted = tiny_lm.predict({"input_ids": ids, "attention_mask": mask}, verbose=0)
    np.testing.assert_allclose(predicted, tiny_lm(ids, mask).numpy(), atol=1e-5)

    fresh = GPT2LM(tiny_config(tiny_lm.tokenizer), tiny_lm.tokenizer)
    assert not np.allclose(fresh(ids, mask).numpy(), predicted, atol=1e-3)
    tiny_lm.save_weights(tmp_path / "weights")
    fresh.load_weights(tmp_path / "weights")
    np.testing.assert_array_equal(fresh(ids, mask).numpy(), tiny_lm(ids, mask).numpy())


def test_left_padding_does_not_change_a_rows_logits(tiny_lm):
    ids = tiny_lm.tokenizer.encode(TEXTS[1])
    alone = tiny_lm(tf.constant([ids])).numpy()[0]
    pad = tiny_lm.tokenizer.pad_token_id
    padded = tiny_lm(tf.constant([[pad] * 5 + ids]), tf.constant([[0] * 5 + [1] * len(ids)])).numpy()[0, 5:]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_saved_files_get_the_usual_permissions(tiny_lm, tmp_path):
    umask = os.umask(0o022)
    try:
        tiny_lm.save_pretrained(tmp_path / "model")
    finally:
        os.umask(umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "model").iterdir()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_weights_survive_save_weights_in_hdf5_too(tiny_lm, tmp_path, batch):
    ids, mask = batch
    tiny_lm.save_weights(tmp_path / "weights.h5")
    fresh = GPT2LM(tiny_config(tiny_lm.tokenizer), tiny_lm.tokenizer)
    fresh.load_weights(tmp_path / "weights.h5")
    np.testing.assert_array_equal(fresh(ids, mask).numpy(), tiny_lm(ids, mask).numpy())


@pytest.mark.slow
def test_keras_save_works_in_the_keras_format_and_names_the_alternatives_otherwise(tiny_lm, tmp_path, batch):
    ids, mask = batch
    tiny_lm.save(tmp_path / "model.keras")
    loaded = tf.keras.models.load_model(str(tmp_path / "model.keras"))
    np.testing.assert_array_equal(loaded(ids, mask).numpy(), tiny_lm(ids, mask).numpy())
    assert loaded.generate_text(TEXTS[1], max_new_tokens=6) == tiny_lm.generate_text(TEXTS[1], max_new_tokens=6)
    for save in [
        lambda: tiny_lm.save(tmp_path / "model.h5"),
        lambda: tiny_lm.save(tmp_path / "saved_model"),
        lambda: tiny_lm.save(tmp_path / "other.keras", save_format="tf"),
        lambda: tf.keras.models.save_model(tiny_lm, str(tmp_path / "saved_model")),
        lambda: tf.saved_model.save(tiny_lm, str(tmp_path / "saved_model")),
    ]:
        with pytest.raises(NotImplementedError, match=r"save_pretrained\(directory\).*`tfgen export"):
            save()
    assert [path.name for path in tmp_path.iterdir()] == ["model.keras"]


def test_bfloat16_copy_keeps_half_size_weights_and_close_logits(tiny_lm_dir, batch):
    fp32 = GPT2LM.from_pretrained(tiny_lm_dir)
    bf16 = GPT2LM.from_pretrained(tiny_lm_dir, dtype="bfloat16")
    assert {v.dtype for v in bf16.gpt2.weights} == {tf.bfloat16}
    input_ids, attention_mask = batch
    expected = fp32(input_ids, attention_mask=attention_mask).numpy()
    logits = bf16(input_ids, attention_mask=attention_mask)
    assert logits.dtype == tf.float32
    mask = attention_mask.astype(bool)
    # bfloat16 keeps 8 significant bits (2**-9 relative rounding per value; 0.45% norm-wise error seen on an AMD
    # EPYC). A norm-wise bound ten times that holds whichever kernels the CPU runs (AVX2 converting to float32,
    # AVX-512 BF16 or AMX computing in bfloat16); a bound on single values depends on them.
    error = np.linalg.norm(logits.numpy()[mask] - expected[mask]) / np.linalg.norm(expected[mask])
    assert error < 0.05, error
    # Without an EOS no row ends early, so the shape holds whichever tokens bfloat16 rounding picks.
    ids = bf16.generate(input_ids, attention_mask, max_new_tokens=6, eos_token_id=None).numpy()
    assert ids.shape == (input_ids.shape[0], input_ids.shape[1] + 6)
    np.testing.assert_array_equal(ids[:, : input_ids.shape[1]], input_ids)
    assert ((ids >= 0) & (ids < bf16.config.vocab_size)).all()


def _values(lm):
    return [variable.numpy() for variable in lm.net.weights]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tf_model_h5_loads_in_a_dtype_as_the_float32_load_cast_to_it(
    h5_only_dir, safetensors_only_dir, dtype, monkeypatch
):
    fp32 = GPT2LM.from_pretrained(h5_only_dir)
    for ours, theirs in zip(_values(fp32), _values(GPT2LM.from_pretrained(safetensors_only_dir))):
        np.testing.assert_array_equal(ours, theirs)
    # Read tensor by tensor into the target dtype: no float32 value reaches a variable.
    half, assigned = load_recording_assigns(lambda: GPT2LM.from_pretrained(h5_only_dir, dtype=dtype), monkeypatch)
    assert set(assigned) == {tf.as_dtype(dtype)} and len(assigned) == len(half.net.weights)
    for ours, weight in zip(_values(half), fp32.net.weights):
        np.testing.assert_array_equal(ours, tf.cast(weight, dtype).numpy())


@pytest.mark.parametrize("weights", ["h5", "safetensors", "bin"])
def test_tensors_read_in_many_blocks_load_the_same_weights(
    weights, h5_only_dir, safetensors_only_dir, tiny_lm, tmp_path, monkeypatch
):
    directory = {"h5": h5_only_dir, "safetensors": safetensors_only_dir}.get(weights)
    if weights == "bin":
        directory = tmp_path
        GPT2LMHeadModel.from_pretrained(safetensors_only_dir).save_pretrained(directory, safe_serialization=False)
    monkeypatch.setattr(checkpoint, "_BLOCK_BYTES", 100)  # a few rows per block: every tensor in many blocks
    for ours, theirs in zip(_values(GPT2LM.from_pretrained(directory, dtype="bfloat16")), tiny_lm.net.weights):
        np.testing.assert_array_equal(ours, tf.cast(theirs, tf.bfloat16).numpy())
