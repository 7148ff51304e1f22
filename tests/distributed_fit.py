"""Worker for tests/test_distributed.py: a few steps of Keras `fit` under a tf.distribute strategy.

    python tests/distributed_fit.py MODE MODEL_DIR DATA_FILE [--steps N] [--batch-size B] ...

MODE is "single" (the default strategy, one CPU), "mirrored" (MirroredStrategy
over two logical CPU devices of this process) or "multiworker"
(MultiWorkerMirroredStrategy; the cluster and this worker's index come from
the TF_CONFIG environment variable). Every mode loads the same checkpoint
(MODEL_DIR, as written by `save_pretrained`) inside the strategy's scope,
compiles there, and fits on the documents of DATA_FILE (one per line) in the
packed layout, in order. Each step is its own epoch, so the history holds
the loss of every step. The last stdout line is JSON:

    {"mode", "task_index", "num_replicas", "jit_compile", "iterations", "real_tokens",
     "losses": [per step], "final_loss", "weight_norm", "seconds"}

`final_loss` is `evaluate` on the first batches after training.
"""

import argparse
import json
import os
import sys
import time
import traceback

import tfgen  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: split
import tensorflow as tf

from tfgen import GPT2LM
from tfgen.data import lm_batches, read_documents

MODES = ("single", "mirrored", "multiworker")
MIRRORED_DEVICES = 2


def make_strategy(mode):
    """The strategy for `mode`; for "mirrored", two logical CPUs are set up first (before TF picks devices)."""
    if mode == "single":
        return tf.distribute.get_strategy()
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * MIRRORED_DEVICES)
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if "TF_CONFIG" not in os.environ:
        raise SystemExit("multiworker mode needs TF_CONFIG (the cluster and this worker's task index)")
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def optimizer(name, learning_rate):
    if name == "sgd":
        return tf.keras.optimizers.SGD(learning_rate)
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("model_dir")
    parser.add_argument("data_file")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch size (divisible by the replicas)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--learning-rate", type=float, default=0.2)
    parser.add_argument("--eval-batches", type=int, default=2)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    strategy = make_strategy(args.mode)
    replicas = strategy.num_replicas_in_sync
    if args.batch_size % replicas:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {replicas} replicas")
    task_index = json.loads(os.environ["TF_CONFIG"])["task"]["index"] if args.mode == "multiworker" else 0

    tf.keras.utils.set_random_seed(0)  # fit draws no random numbers here (no dropout in the config), but be safe
    with strategy.scope():
        lm = GPT2LM.from_pretrained(args.model_dir)
        lm.compile(optimizer=optimizer(args.optimizer, args.learning_rate))  # jit_compile="auto"

    documents = list(read_documents([args.data_file]))
    batches = lm_batches(
        documents,
        lm.tokenizer,
        block_size=args.block_size,
        batch_size=args.batch_size,
        layout="packed",
        shuffle_buffer=0,
    )
    train = batches.take(args.steps)
    # No padding (real_tokens == steps * batch * block): every replica then sees as many real tokens as the
    # others, and the mean of the replicas' mean losses is the mean loss of the whole batch.
    real_tokens = int(train.reduce(0.0, lambda total, batch: total + tf.reduce_sum(batch[2])).numpy())
    # One step per epoch: each epoch's "loss" is that step's loss, not a running mean. The iterator is kept
    # between epochs (the dataset's cardinality is unknown), so the steps see consecutive batches.
    history = lm.fit(train, epochs=args.steps, steps_per_epoch=1, verbose=0).history
    final_loss = lm.evaluate(batches.take(args.eval_batches), verbose=0, return_dict=True)["loss"]
    weight_norm = float(tf.linalg.global_norm([tf.convert_to_tensor(w) for w in lm.trainable_weights]).numpy())
    result = {
        "mode": args.mode,
        "task_index": task_index,
        "num_replicas": replicas,
        "jit_compile": lm._jit_compile,
        "iterations": int(lm.optimizer.iterations.numpy()),
        "real_tokens": real_tokens,
        "losses": [float(x) for x in history["loss"]],
        "final_loss": float(final_loss),
        "weight_norm": weight_norm,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    # After a failure, a strategy's threads can keep the interpreter from exiting: leave at once.
    try:
        main()
    except SystemExit as error:
        if error.code in (0, None):
            raise
        if not isinstance(error.code, int):
            print(error.code, file=sys.stderr, flush=True)
        os._exit(error.code if isinstance(error.code, int) else 1)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
