"""Keras fine-tuning: masked loss and metrics, AdamW, XLA and mixed precision, checkpoints that resume."""

import numpy as np
import pytest
import tensorflow as tf
import torch
from transformers import GPT2LMHeadModel, TFGPT2LMHeadModel

from tfgen import GPT2LM, training
from tfgen.data import lm_batches
from tiny_model import tiny_config


def _log_softmax(logits):
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_masked_loss_equals_a_hand_computation_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 7)).astype(np.float32)
    labels = np.array([[1, 2, 3, 0], [4, 5, 0, 0]])
    weights = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    picked = np.take_along_axis(_log_softmax(logits), labels[..., None], -1)[..., 0]
    expected = -(picked * weights).sum() / weights.sum()
    np.testing.assert_allclose(training.masked_lm_loss(labels, logits, weights).numpy(), expected, rtol=1e-6)

    garbage = logits.copy()
    garbage[weights == 0] = rng.standard_normal((int((weights == 0).sum()), 7)) * 50
    np.testing.assert_allclose(training.masked_lm_loss(labels, garbage, weights).numpy(), expected, rtol=1e-6)
    loss = training.MaskedLMLoss()(labels, logits, sample_weight=weights)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-6)


def test_evaluate_reports_masked_loss_accuracy_and_perplexity(tiny_lm, ko_lines):
    batches = lm_batches(
        ko_lines[:16], tiny_lm.tokenizer, block_size=24, batch_size=16, layout="documents", shuffle_buffer=0
    )
    features, labels, weights = next(iter(batches))
    weights = weights.numpy()
    assert 0 < weights.mean() < 1  # the batch has padding
    logits = tiny_lm(features).numpy()
    logprobs = np.take_along_axis(_log_softmax(logits.astype(np.float64)), labels.numpy()[..., None], -1)[..., 0]
    loss = -(logprobs * weights).sum() / weights.sum()
    accuracy = ((logits.argmax(-1) == labels.numpy()) * weights).sum() / weights.sum()

    lm = GPT2LM.from_config(tiny_lm.config, tiny_lm.tokenizer)
    lm.set_weights(tiny_lm.get_weights())
    lm.compile()
    results = lm.evaluate(batches, verbose=0, return_dict=True)
    np.testing.assert_allclose(results["loss"], loss, rtol=1e-4)
    np.testing.assert_allclose(results["accuracy"], accuracy, rtol=1e-5)
    np.testing.assert_allclose(results["perplexity"], np.exp(loss), rtol=1e-4)


def test_adamw_decays_neither_layer_norms_nor_biases(tiny_lm):
    lm = GPT2LM.from_config(tiny_lm.config)
    optimizer = training.adamw(learning_rate=0.1, weight_decay=0.5)
    for v in lm.trainable_variables:  # biases start at zero, where decay would not show
        v.assign(tf.random.normal(v.shape) + 1.0)
    before = {v.name: v.numpy() for v in lm.trainable_variables}
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in lm.trainable_variables])
    decayed = set()
    for v in lm.trainable_variables:
        if np.allclose(v.numpy(), before[v.name] * (1 - 0.1 * 0.5), rtol=1e-6):
            decayed.add(v.name)
        else:
            np.testing.assert_array_equal(v.numpy(), before[v.name])
    kept = {v.name for v in lm.trainable_variables} - decayed
    assert kept == {v.name for v in lm.trainable_variables if "/ln_" in v.name or v.name.endswith("bias:0")}
    assert any("c_attn/weight" in name for name in decayed) and any("wte" in name for name in decayed)


def test_warmup_then_linear_decay():
    schedule = training.WarmupDecay(1e-3, warmup_steps=10, total_steps=110)
    rates = [float(schedule(step)) for step in (0, 4, 9, 10, 60, 110, 200)]
    np.testing.assert_allclose(rates, [1e-4, 5e-4, 1e-3, 1e-3, 0.5e-3, 0, 0], atol=1e-9)
    np.testing.assert_allclose(float(training.WarmupDecay(1e-3)(10_000)), 1e-3)


def test_from_config_takes_vocabulary_and_special_ids_from_the_tokenizer(tiny_lm):
    tok = tiny_lm.tokenizer
    lm = GPT2LM.from_config({"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}, tok)
    assert lm.config.vocab_size == tok.vocab_size and lm.config.n_embd == 32
    assert (lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert lm.tokenizer is tok and lm(tf.constant([[1, 2]])).shape == (1, 2, tok.vocab_size)


@pytest.mark.slow
def test_fit_lowers_the_loss_and_the_checkpoint_reloads_in_transformers(tiny_lm, ko_lines, tmp_path):
    tok = tiny_lm.tokenizer
    tf.keras.utils.set_random_seed(0)
    lm = GPT2LM.from_config(tiny_config(tok), tok)
    lm.compile(optimizer=training.adamw(learning_rate=3e-3, warmup_steps=4, total_steps=40))
    batches = lm_batches(ko_lines[:400], tok, block_size=32, batch_size=8, seed=0)
    history = lm.fit(batches.repeat(), steps_per_epoch=10, epochs=4, verbose=0).history["loss"]
    assert history[-1] < history[0] - 1.0  # nats, over 40 steps

    lm.save_pretrained(tmp_path / "model")
    ids, mask = tok.encode_batch(["안녕하세요", "근육이 커지기 위해서는"])
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    ours = lm(ids, mask).numpy()[mask == 1]
    tf_model = TFGPT2LMHeadModel.from_pretrained(tmp_path / "model", use_safetensors=False)
    tf_logits = tf_model(ids, attention_mask=mask, position_ids=positions).logits.numpy()
    pt_model = GPT2LMHeadModel.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        pt_logits = pt_model(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    np.testing.assert_allclose(ours, tf_logits[mask == 1], atol=1e-4)
    np.testing.assert_allclose(ours, pt_logits[mask == 1], atol=1e-4)


def _without_dropout(tiny_lm):
    """A copy of tiny_lm that trains deterministically, so that two runs can be compared."""
    config = {**tiny_lm.config.to_dict(), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    lm = GPT2LM.from_config(config, tiny_lm.tokenizer)
    lm.set_weights(tiny_lm.get_weights())
    return lm


def _train(tiny_lm, batches, steps, **compile_kwargs):
    """tiny_lm's weights after `steps` of SGD."""
    lm = _without_dropout(tiny_lm)
    lm.compile(optimizer=tf.keras.optimizers.SGD(0.5), **compile_kwargs)
    return lm, lm.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0).history["loss"][0]


@pytest.mark.slow
def test_the_xla_train_step_matches_the_plain_one(tiny_lm, ko_lines):
    batches = lm_batches(ko_lines[:100], tiny_lm.tokenizer, block_size=32, batch_size=8, shuffle_buffer=0)
    xla_lm, xla_loss = _train(tiny_lm, batches, 4, jit_compile=True)
    plain_lm, plain_loss = _train(tiny_lm, batches, 4, jit_compile=False)
    np.testing.assert_allclose(xla_loss, plain_loss, rtol=1e-4)
    for a, b in zip(xla_lm.get_weights(), plain_lm.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_mixed_precision_trains_in_bfloat16_or_float16(tiny_lm, ko_lines):
    try:
        policy = training.mixed_precision_policy()
    except ValueError as error:
        pytest.skip(str(error))
    batches = lm_batches(ko_lines[:200], tiny_lm.tokenizer, block_size=32, batch_size=8, seed=0)
    with training.global_policy(policy):
        tf.keras.utils.set_random_seed(0)
        lm = GPT2LM.from_config(tiny_lm.config, tiny_lm.tokenizer)
        lm.compile(optimizer=training.adamw(learning_rate=3e-3))
        history = lm.fit(batches.repeat(), steps_per_epoch=8, epochs=2, verbose=0).history["loss"]
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    assert lm.gpt2.transformer.h[0].attn.c_attn.compute_dtype == policy.removeprefix("mixed_")
    assert all(v.dtype == tf.float32 for v in lm.trainable_variables)  # master weights stay float32
    assert lm(tf.constant([[1, 2, 3]])).dtype == tf.float32
    assert history[1] < history[0] - 0.3
    assert lm.generate(tf.constant([[1, 2, 3]]), max_new_tokens=4).shape == (1, 7)


def _slots(optimizer):
    return [v.numpy() for v in optimizer.variables]


@pytest.mark.slow
def test_resume_continues_at_the_saved_step_with_the_same_optimizer_state(tiny_lm, ko_lines, tmp_path):
    batches = lm_batches(ko_lines[:200], tiny_lm.tokenizer, block_size=32, batch_size=8, seed=0).repeat()
    lm = _without_dropout(tiny_lm)
    lm.compile(optimizer=training.adamw(1e-3, total_steps=20))
    checkpointing = training.TrainingCheckpoint(tmp_path / "ckpt", save_steps=3)
    lm.fit(batches, steps_per_epoch=4, epochs=2, verbose=0, callbacks=[checkpointing, training.StopAtStep(7)])
    assert int(lm.optimizer.iterations) == 7
    saved = training.read_training_counters(tmp_path / "ckpt")
    assert saved == {"epoch": 2, "step": 7}  # the end of the second epoch, cut short at step 7

    resumed = GPT2LM.from_pretrained(tmp_path / "ckpt")
    resumed.compile(optimizer=training.adamw(1e-3, total_steps=20))
    assert training.restore_training_state(resumed, tmp_path / "ckpt") == saved
    assert int(resumed.optimizer.iterations) == 7
    for a, b in zip(_slots(resumed.optimizer), _slots(lm.optimizer)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(resumed.get_weights(), lm.get_weights()):
        np.testing.assert_array_equal(a, b)

    # One more step from the same state gives the same weights in both.
    batch = next(iter(batches))
    lm.train_on_batch(*batch)
    resumed.train_on_batch(*batch)
    assert int(resumed.optimizer.iterations) == 8
    for a, b in zip(resumed.get_weights(), lm.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_restoring_without_training_state_is_a_clear_error(tiny_lm, tiny_lm_dir):
    lm = GPT2LM.from_config(tiny_lm.config, tiny_lm.tokenizer)
    lm.compile()
    with pytest.raises(FileNotFoundError, match="holds no training state"):
        training.restore_training_state(lm, tiny_lm_dir)


@pytest.mark.slow
def test_keras_callbacks_early_stopping_csv_logger_and_tensorboard(tiny_lm, ko_lines, tmp_path):
    batches = lm_batches(ko_lines[:100], tiny_lm.tokenizer, block_size=32, batch_size=8, seed=0)
    lm = _without_dropout(tiny_lm)
    lm.compile(optimizer=training.adamw(1e-3))
    callbacks = [
        tf.keras.callbacks.EarlyStopping(monitor="val_loss", min_delta=100.0, patience=1),  # no epoch improves by 100
        tf.keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        tf.keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb")),
    ]
    history = lm.fit(
        batches.repeat(), steps_per_epoch=3, epochs=10, validation_data=batches.take(2), callbacks=callbacks, verbose=0
    )
    assert len(history.history["loss"]) == 2  # the first epoch sets the mark, the second fails to beat it
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert (
        rows[0].split(",") == ["epoch", "accuracy", "loss", "perplexity", "val_accuracy", "val_loss", "val_perplexity"]
        and len(rows) == 3
    )
    from tensorflow.core.util import event_pb2

    tags = {
        value.tag
        for path in (tmp_path / "tb" / "train").glob("events.out.tfevents.*")
        for record in tf.data.TFRecordDataset(str(path))
        for value in event_pb2.Event.FromString(record.numpy()).summary.value
    }
    assert {"epoch_loss", "epoch_perplexity", "epoch_accuracy"} <= tags
