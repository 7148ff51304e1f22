"""The fine-tuning job behind `tfgen finetune`: text files in, a resumable run directory out.

A run directory holds:
- `checkpoint/`: the latest HF-layout checkpoint, with the optimizer state and
  step count in `checkpoint/training_state/` (replaced atomically at each save);
  with `lora_rank`, merged weights and the adapter in PEFT's layout in `checkpoint/adapter/`;
- `training_log.csv`: Keras' CSVLogger, one row per epoch;
- `steps.csv`: each training step's own batch loss;
- `loss.png`: the loss curves;
- `finetune.json`: the settings the run was started with (marks the directory as a run).
"""

import csv
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import tensorflow as tf

from tfgen import checkpoint, data, training
from tfgen.model import CausalLM

RUN_FILE = "finetune.json"
CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "training_log.csv"
STEP_LOG_FILE = "steps.csv"
PLOT_FILE = "loss.png"


@dataclasses.dataclass
class FinetuneSettings:
    model: str
    train: list
    output: str
    valid: list = None
    valid_fraction: float = 0.0
    epochs: int = 1
    batch_size: int = 8
    block_size: int = 128
    learning_rate: float = 5e-5
    warmup_steps: int = None  # None: 5% of the steps
    max_steps: int = None
    save_steps: int = None  # None: at the end of every epoch only
    layout: str = "packed"
    document: str = "line"
    mixed_precision: bool = False
    jit_compile: object = "auto"  # True, False or "auto" (GPUs and TPUs only)
    resume: bool = False
    lora_rank: int = None  # None: every weight trains; else LoRA adapters of this rank only
    seed: int = 0
    verbose: int = 1


class StepLossLog(training.StepCounter):
    """Appends `step,loss` after every training step: that step's own batch loss.

    Keras reports a running mean over the epoch; with equal-sized batches
    (drop_remainder) the batch's loss is (b + 1) * mean_b - b * mean_(b-1).
    """

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)
        self._previous_mean = 0.0

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        loss = (batch + 1) * logs["loss"] - batch * self._previous_mean
        self._previous_mean = logs["loss"]
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            if new:
                f.write("step,loss\n")
            f.write(f"{self.step},{loss:.6f}\n")


def check_output_dir(output, resume):
    """An output directory must be new or empty, or, with resume, a run with a checkpoint."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output {output} is a file; give a directory")
    if resume:
        if not (output / RUN_FILE).is_file():
            raise FileNotFoundError(
                f"--resume: {output} holds no fine-tuning run to resume; drop --resume to start one"
            )
        training.read_training_counters(output / CHECKPOINT_DIR)
    elif output.exists() and any(output.iterdir()):
        if (output / RUN_FILE).is_file():
            raise FileExistsError(
                f"{output} holds an earlier fine-tuning run; pass --resume to continue it, or choose another --output"
            )
        raise FileExistsError(f"{output} is not empty and is not a fine-tuning run; choose a new or empty --output")


def check_same_lora_rank(output, lora_rank):
    """A run resumes with the LoRA rank it started with (none for full fine-tuning)."""
    started = json.loads((Path(output) / RUN_FILE).read_text(encoding="utf-8")).get("lora_rank")
    if started != lora_rank:

        def describe(rank):
            return f"--lora-rank {rank}" if rank else "full fine-tuning (no --lora-rank)"

        raise ValueError(
            f"the run in {output} was started with {describe(started)}; resume it with the same, "
            f"not {describe(lora_rank)}"
        )


def _load_model(settings, output):
    """The model to train: the checkpoint of a resumed full run; for LoRA the base model with its adapters."""
    if not settings.lora_rank:
        return CausalLM.from_pretrained(output / CHECKPOINT_DIR if settings.resume else settings.model)
    # The base weights stay frozen, so a resumed run reads the base again and then the adapter it trained.
    lm = CausalLM.from_pretrained(settings.model)
    if settings.resume:
        lm.load_lora_adapter(output / CHECKPOINT_DIR / training.LORA_ADAPTER_DIR)
    else:
        lm.enable_lora(settings.lora_rank)
    return lm


def _rewind_to_checkpoint(output, step):
    """After an interruption: drops the step log's rows past the checkpoint and any half-written checkpoint."""
    for partial in output.glob(".*"):  # temporary files and staging directories of writes cut short
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink()
    log = output / STEP_LOG_FILE
    if log.is_file():
        header, *rows = log.read_text().splitlines(keepends=True)
        kept = [row for row in rows if int(row.split(",")[0]) <= step]
        checkpoint.write_text_atomically(log, header + "".join(kept))


def _validation_batches(settings, documents, tokenizer):
    """(train documents, validation batches or None) from --valid files or --valid-fraction."""
    if settings.valid:
        valid = data.file_documents(settings.valid, settings.document)
    elif settings.valid_fraction:
        documents, valid = data.split_validation(documents, settings.valid_fraction)
    else:
        return documents, None
    batches = data.lm_batches(
        valid,
        tokenizer,
        settings.block_size,
        settings.batch_size,
        settings.layout,
        shuffle_buffer=0,
        drop_remainder=False,
    )
    return documents, batches


def finetune(settings):
    """Runs (or resumes) a fine-tuning run; returns the Keras History. Bad input raises ValueError/OSError."""
    if not settings.train:
        raise ValueError("no training files; pass --train FILE [FILE ...]")
    data.check_text_files(settings.train, settings.document)
    data.check_text_files(settings.valid or [], settings.document)
    check_output_dir(settings.output, settings.resume)
    if settings.resume:
        check_same_lora_rank(settings.output, settings.lora_rank)
    tf.keras.utils.set_random_seed(settings.seed)
    if not settings.mixed_precision:
        return _train(settings)
    with training.global_policy(training.mixed_precision_policy()):
        return _train(settings)


def _train(settings):
    output = Path(settings.output)
    lm = _load_model(settings, output)
    if lm.tokenizer is None:
        raise ValueError(f"{settings.model} has no tokenizer files; fine-tuning needs the model's tokenizer")
    if not 1 <= settings.block_size <= lm.config.n_positions:
        raise ValueError(
            f"--block-size {settings.block_size} is outside the model's context of "
            f"{lm.config.n_positions} tokens; use a block size from 1 to {lm.config.n_positions}"
        )

    documents = data.file_documents(settings.train, settings.document)
    documents, valid = _validation_batches(settings, documents, lm.tokenizer)
    train = data.lm_batches(
        documents, lm.tokenizer, settings.block_size, settings.batch_size, settings.layout, seed=settings.seed
    )
    if settings.verbose:
        print("counting the batches of an epoch (one pass over the text) ...", flush=True)
    steps_per_epoch = data.count_batches(train)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training text makes no full batch of {settings.batch_size} x {settings.block_size} "
            "tokens; lower --batch-size or --block-size, or add text"
        )
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps:
        total_steps = min(total_steps, settings.max_steps)
    warmup = round(0.05 * total_steps) if settings.warmup_steps is None else settings.warmup_steps
    lm.compile(
        optimizer=training.adamw(settings.learning_rate, warmup_steps=warmup, total_steps=total_steps),
        jit_compile=settings.jit_compile,
    )

    step = 0
    if settings.resume:
        step = training.restore_training_state(lm, output / CHECKPOINT_DIR)["step"]
        _rewind_to_checkpoint(output, step)
    else:
        output.mkdir(parents=True, exist_ok=True)
        record = {**dataclasses.asdict(settings), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
        checkpoint.write_text_atomically(output / RUN_FILE, json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    if step >= total_steps:
        print(f"{output} already ran {step} of {total_steps} steps; nothing to do")
        return None
    callbacks = [
        tf.keras.callbacks.CSVLogger(str(output / LOG_FILE), append=settings.resume),
        StepLossLog(output / STEP_LOG_FILE),
        training.TrainingCheckpoint(output / CHECKPOINT_DIR, settings.save_steps),
        training.StopAtStep(total_steps),
    ]
    # The batches repeat in the same seeded order on every run, so a resumed run skips what was seen.
    history = lm.fit(
        train.repeat().skip(step),
        validation_data=valid,
        epochs=math.ceil(total_steps / steps_per_epoch),
        initial_epoch=step // steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        verbose=settings.verbose,
    )
    plot_losses(output)
    return history


def _read_csv(path):
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(output):
    """Draws steps.csv's training loss and the per-epoch validation loss into loss.png (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    steps = _read_csv(output / STEP_LOG_FILE)
    epochs = [row for row in _read_csv(output / LOG_FILE) if row.get("val_loss") not in (None, "", "NA")]
    steps_per_epoch = json.loads((output / RUN_FILE).read_text(encoding="utf-8"))["steps_per_epoch"]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(
        [int(r["step"]) for r in steps],
        [float(r["loss"]) for r in steps],
        alpha=0.5,
        label="training loss (each step's batch)",
    )
    if epochs:
        axes.plot(
            [(int(r["epoch"]) + 1) * steps_per_epoch for r in epochs],
            [float(r["val_loss"]) for r in epochs],
            "o-",
            label="validation loss (end of epoch)",
        )
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats per token)")
    axes.legend()
    figure.tight_layout()
    partial = output / f".{PLOT_FILE}.tmp"
    figure.savefig(partial, format="png")
    plt.close(figure)
    os.replace(partial, output / PLOT_FILE)
