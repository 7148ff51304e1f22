"""The same Keras `fit` under MirroredStrategy and MultiWorkerMirroredStrategy reaches the single-device losses.

Each run is a separate process (tests/distributed_fit.py), since a strategy's
devices and cluster are fixed when TensorFlow starts. All runs load one
checkpoint (a tiny GPT-2 without dropout) inside the strategy's scope and fit
on the same packed batches, in order, with plain SGD (which, unlike Adam,
would show a gradient scaled wrongly across replicas). With packed rows every
replica sees the same number of real tokens, so the mean of the replicas'
mean losses is the single-device mean loss, and the replicas' summed,
1/replicas-scaled gradients are its gradient.

XLA cannot compile the distributed train step on CPUs (TensorFlow has no XLA
collectives for CPU devices, and an XLA cluster cannot reach a variable on
another logical CPU); GPT2LM.compile's default jit_compile="auto" leaves XLA off
on CPUs, for the single-device reference too.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().with_name("distributed_fit.py")
STEPS = 8
GLOBAL_BATCH = 8  # divisible by the 2 replicas
BLOCK_SIZE = 32
RTOL = 1e-3  # observed: under 1e-6 relative (float32 summation order, XLA or not)
TIMEOUT_S = 240

pytestmark = pytest.mark.slow


class WorkerFailed(AssertionError):
    """A worker process failed or timed out; the message holds the end of its output."""


def _env(**extra):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def _start(args, env, log):
    # Output goes to a file (a pipe could fill and block the worker); its own process group lets a failure
    # kill the worker and anything it started together.
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _kill(process):
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _output(log):
    log.seek(0)
    return log.read().decode("utf-8", "replace")


def _result(process, output):
    if process.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        raise WorkerFailed(f"worker exited with {process.returncode}:\n{tail}")
    return json.loads(output.strip().splitlines()[-1])


def run_workers(arg_lists, envs, timeout=TIMEOUT_S):
    """Runs worker processes side by side; their JSON results, or WorkerFailed (all of them killed) if one fails."""
    logs = [tempfile.TemporaryFile() for _ in arg_lists]
    processes = []
    try:
        processes = [_start(args, env, log) for args, env, log in zip(arg_lists, envs, logs)]
        deadline = time.monotonic() + timeout
        while any(process.poll() is None for process in processes):
            for process, log in zip(processes, logs):
                if process.poll() not in (None, 0):
                    _result(process, _output(log))  # raises; the others are killed below
            if time.monotonic() > deadline:
                outputs = [_output(log) for log in logs]
                tails = "\n---\n".join("\n".join(output.splitlines()[-20:]) for output in outputs)
                raise WorkerFailed(f"workers still running after {timeout} s:\n{tails}")
            time.sleep(0.2)
        return [_result(process, _output(log)) for process, log in zip(processes, logs)]
    finally:
        for process in processes:
            _kill(process)
        for log in logs:
            log.close()


def run_worker(mode, fit_setup, *extra):
    args = [mode, fit_setup["model_dir"], fit_setup["data_file"], *fit_setup["args"], *extra]
    return run_workers([args], [_env()])[0]


def free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def fit_setup(spm_dir, ko_lines, tmp_path_factory):
    """A dropout-free tiny GPT-2 checkpoint, a text file of Korean documents and the worker's common flags."""
    import tensorflow as tf
    from transformers import GPT2Config

    from tfgen import GPT2LM, Tokenizer

    directory = tmp_path_factory.mktemp("distributed")
    tokenizer = Tokenizer.from_pretrained(spm_dir)
    config = GPT2Config(
        n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )  # fit must be deterministic
    tf.keras.utils.set_random_seed(0)
    GPT2LM.from_config(config, tokenizer).save_pretrained(directory / "model")
    data_file = directory / "documents.txt"
    # The first 60 lines are Wikipedia paragraphs: ~7,000 tokens, more than the 8 batches of 8 x 33 need.
    data_file.write_text("\n".join(ko_lines[:60]) + "\n", encoding="utf-8")
    args = [
        "--steps",
        STEPS,
        "--batch-size",
        GLOBAL_BATCH,
        "--block-size",
        BLOCK_SIZE,
        "--optimizer",
        "sgd",
        "--learning-rate",
        0.2,
    ]
    return {"model_dir": directory / "model", "data_file": data_file, "args": args}


@pytest.fixture(scope="module")
def single(fit_setup):
    result = run_worker("single", fit_setup)
    assert result["num_replicas"] == 1 and result["iterations"] == STEPS and result["jit_compile"] is False
    assert result["real_tokens"] == STEPS * GLOBAL_BATCH * BLOCK_SIZE  # no padding: replicas split tokens evenly
    assert len(result["losses"]) == STEPS
    assert result["final_loss"] < result["losses"][0] - 0.3  # the steps did train, so matching is not trivial
    return result


def assert_same_training(result, reference):
    assert result["num_replicas"] == 2 and result["iterations"] == STEPS and result["jit_compile"] is False
    assert result["real_tokens"] == reference["real_tokens"]
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=RTOL)
    np.testing.assert_allclose(result["final_loss"], reference["final_loss"], rtol=RTOL)
    np.testing.assert_allclose(result["weight_norm"], reference["weight_norm"], rtol=RTOL)


def test_mirrored_strategy_on_two_cpus_matches_single_device(fit_setup, single):
    mirrored = run_worker("mirrored", fit_setup)
    assert_same_training(mirrored, single)


def test_multi_worker_mirrored_strategy_matches_single_device(fit_setup, single):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    args = ["multiworker", fit_setup["model_dir"], fit_setup["data_file"], *fit_setup["args"]]
    envs = [_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})) for i in (0, 1)]
    workers = run_workers([args, args], envs)
    assert [w["task_index"] for w in workers] == [0, 1]
    for worker in workers:
        assert_same_training(worker, single)
    assert workers[0]["losses"] == workers[1]["losses"]  # the workers agree exactly: they apply the same all-reduce
