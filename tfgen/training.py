"""Fine-tuning with Keras `fit`: masked loss and metrics, AdamW with warmup, mixed precision, checkpoints.

The batches come from `tfgen.data.lm_batches`: `(features, labels, weights)`,
the weights marking real (non-pad) target tokens. Keras passes them to the
loss and to `weighted_metrics` as sample weights.
"""

import contextlib
import json
from pathlib import Path

import tensorflow as tf

from tfgen import checkpoint

TRAINING_STATE_DIR = "training_state"
LORA_ADAPTER_DIR = "adapter"  # a LoRA run's adapter in PEFT's layout, beside the merged weights
_STATE_FILE = "trainer_state.json"
_OPTIMIZER_PREFIX = "optimizer"
# LayerNorm weights (ln_1, ln_2, ln_f) and every bias are not decayed, as in GPT-2 and transformers' Trainer.
NO_DECAY = ["ln_", "bias"]


def token_cross_entropy(labels, logits):
    """Each target token's cross-entropy [batch, len], computed in float32."""
    return tf.keras.losses.sparse_categorical_crossentropy(labels, tf.cast(logits, tf.float32), from_logits=True)


def masked_lm_loss(labels, logits, weights):
    """Cross-entropy averaged over the target tokens whose weight is 1, never over padding."""
    losses = token_cross_entropy(labels, logits)
    weights = tf.cast(weights, losses.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(losses * weights), tf.reduce_sum(weights))


class MaskedLMLoss(tf.keras.losses.Loss):
    """masked_lm_loss as a Keras loss: fit's sample weights mark the real target tokens."""

    def __init__(self, name="masked_lm_loss"):
        super().__init__(name=name)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is None:
            sample_weight = tf.ones_like(y_true)
        return masked_lm_loss(y_true, y_pred, sample_weight)


class Perplexity(tf.keras.metrics.Mean):
    """exp of the mean cross-entropy over the weighted (real) target tokens seen so far."""

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(token_cross_entropy(y_true, y_pred), sample_weight=sample_weight)

    def result(self):
        return tf.exp(super().result())


def default_metrics():
    """Masked accuracy and perplexity: pass as `weighted_metrics` so they skip padding."""
    return [tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy"), Perplexity()]


class WarmupDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak` over `warmup_steps`, then linear decay to 0 at `total_steps`.

    Without `total_steps` the rate stays at `peak` after the warmup.
    """

    def __init__(self, peak, warmup_steps=0, total_steps=None):
        if total_steps is not None and total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.peak, self.warmup_steps, self.total_steps = float(peak), int(warmup_steps), total_steps

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        rate = tf.constant(self.peak)
        if self.warmup_steps:
            rate = rate * tf.minimum(1.0, (step + 1) / self.warmup_steps)
        if self.total_steps is not None:
            remaining = (self.total_steps - step) / (self.total_steps - self.warmup_steps)
            rate = rate * tf.clip_by_value(remaining, 0.0, 1.0)
        return rate

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


def adamw(learning_rate=5e-5, weight_decay=0.01, warmup_steps=0, total_steps=None, clipnorm=1.0):
    """AdamW on a `WarmupDecay` schedule, gradients clipped to a global norm; no decay on LayerNorm or biases."""
    optimizer = tf.keras.optimizers.AdamW(
        learning_rate=WarmupDecay(learning_rate, warmup_steps, total_steps),
        weight_decay=weight_decay,
        global_clipnorm=clipnorm,
    )
    optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer


def mixed_precision_policy():
    """The mixed policy this machine runs fast: float16 (with loss scaling) on a GPU, else bfloat16 on a CPU with it."""
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    if _cpu_has_bfloat16():
        return "mixed_bfloat16"
    raise ValueError(
        "mixed precision: this machine has no GPU and its CPU has no bfloat16 instructions; train in float32"
    )


def _cpu_has_bfloat16():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_mixed_precision(policy=None):
    """Sets Keras' global dtype policy (default: `mixed_precision_policy()`); build or load models afterwards.

    Keras' compile wraps the optimizer for loss scaling under mixed_float16.
    """
    policy = policy or mixed_precision_policy()
    tf.keras.mixed_precision.set_global_policy(policy)
    return policy


@contextlib.contextmanager
def global_policy(policy):
    """Keras' global dtype policy is `policy` inside the block and what it was before after it."""
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def xla_pays_off(strategy):
    """Whether compile's jit_compile="auto" picks XLA: when `strategy` trains on GPUs or TPUs, not on CPUs.

    On a CPU the XLA train step measured no faster in float32 and 1.7x slower
    in mixed bfloat16 (benchmarks/train_speed.py), and TensorFlow has no XLA
    collectives for several CPU replicas.
    """
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy: TensorFlow places the step itself, on a GPU if there is one
        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return not any(tf.DeviceSpec.from_string(device).device_type == "CPU" for device in devices)


def _is_chief(model):
    return model.distribute_strategy.extended.should_checkpoint


def save_training_state(lm, directory, epoch):
    """Writes an HF-layout checkpoint plus the optimizer state and counters, atomically, in one directory.

    `epoch` is the number of completed epochs; the step count is the
    optimizer's `iterations`. `restore_training_state` reads it back.
    With LoRA the HF files hold merged weights and `adapter/` the adapter
    (PEFT's layout), which a resumed run loads onto the base model again;
    the optimizer state then covers the adapters only (the trainable weights).
    """
    with checkpoint.atomic_directory(directory) as staging:
        lm.write_checkpoint_files(staging)
        if lm.lora is not None:
            (staging / LORA_ADAPTER_DIR).mkdir()
            lm.lora.write(staging / LORA_ADAPTER_DIR, lm.config.name_or_path)
        state = staging / TRAINING_STATE_DIR
        state.mkdir()
        tf.train.Checkpoint(optimizer=lm.optimizer).write(str(state / _OPTIMIZER_PREFIX))
        counters = {"epoch": int(epoch), "step": int(lm.optimizer.iterations.numpy())}
        (state / _STATE_FILE).write_text(json.dumps(counters) + "\n")


def read_training_counters(directory):
    """{"epoch", "step"} of a checkpoint written by `save_training_state`."""
    path = Path(directory) / TRAINING_STATE_DIR / _STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no training state ({path} is missing); it cannot be resumed")
    return json.loads(path.read_text())


def restore_training_state(lm, directory):
    """Restores the optimizer state (slots and step count) saved beside `lm`'s weights; returns the counters.

    `lm` must be loaded from `directory` and compiled with the same kind of optimizer.
    """
    counters = read_training_counters(directory)
    with lm.distribute_strategy.scope():
        lm.optimizer.build(lm.trainable_variables)
    status = tf.train.Checkpoint(optimizer=lm.optimizer).read(
        str(Path(directory) / TRAINING_STATE_DIR / _OPTIMIZER_PREFIX)
    )
    status.assert_existing_objects_matched()
    return counters


class StepCounter(tf.keras.callbacks.Callback):
    """Keeps `self.step`, the optimizer's step count, without reading it from the device every step."""

    def on_train_begin(self, logs=None):
        self.step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1


class TrainingCheckpoint(StepCounter):
    """Saves `save_training_state(model, directory)` after every epoch and, if given, every `save_steps` steps.

    The directory is an HF-layout checkpoint (transformers reads it) with the
    optimizer state beside it, replaced atomically at each save. Only the
    chief worker writes.
    """

    def __init__(self, directory, save_steps=None):
        super().__init__()
        self.directory, self.save_steps = Path(directory), save_steps
        self._epoch = 0
        self._saved_step = None

    def _save(self, epochs_done):
        if self.step != self._saved_step and _is_chief(self.model):
            save_training_state(self.model, self.directory, epochs_done)
        self._saved_step = self.step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        last_of_epoch = batch + 1 == self.params.get("steps")  # on_epoch_end saves it, with the epoch counted
        if self.save_steps and self.step % self.save_steps == 0 and not last_of_epoch:
            self._save(self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        self._save(epoch + 1)


class StopAtStep(StepCounter):
    """Ends training once the optimizer has taken `total_steps` steps (counting steps of resumed runs)."""

    def __init__(self, total_steps):
        super().__init__()
        self.total_steps = total_steps

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.step >= self.total_steps:
            self.model.stop_training = True
