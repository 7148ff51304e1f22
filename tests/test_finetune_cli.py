"""`tfgen finetune` and `tfgen tokenizer train`: runs, resumes, and clear errors for bad input."""

import csv
import json

import numpy as np
import pytest

from tfgen import GPT2LM, Tokenizer, cli, finetune, training


@pytest.fixture(scope="module")
def novel(ko_data_dir, tmp_path_factory):
    """The first 300 lines of seed 002's novel, the text it fine-tunes on."""
    source = ko_data_dir / "NLP-kr_tensorflow-ml-nlp-tf2" / "finetune_data.txt"
    path = tmp_path_factory.mktemp("novel") / "novel.txt"
    with open(source, encoding="utf-8") as f:
        path.write_text("".join(line for _, line in zip(range(300), f)), encoding="utf-8")
    return path


def _finetune(model, train, output, *extra):
    return cli.main(
        [
            "finetune",
            "--model",
            str(model),
            "--train",
            str(train),
            "--output",
            str(output),
            "--batch-size",
            "8",
            "--block-size",
            "32",
            "--learning-rate",
            "3e-3",
            *extra,
        ]
    )


@pytest.mark.slow
def test_finetune_writes_a_checkpoint_a_log_and_a_plot_then_resumes(tiny_lm_dir, novel, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_lm_dir, novel, run, "--epochs", "3", "--max-steps", "10", "--valid-fraction", "0.1") == 0
    settings = json.loads((run / finetune.RUN_FILE).read_text())
    assert training.read_training_counters(run / "checkpoint")["step"] == 10
    with open(run / finetune.LOG_FILE) as f:
        epochs = list(csv.DictReader(f))
    assert {"loss", "val_loss", "accuracy", "perplexity"} <= set(epochs[0])
    steps = np.loadtxt(run / finetune.STEP_LOG_FILE, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(steps[:, 0], np.arange(1, 11))
    assert steps[-3:, 1].mean() < steps[:3, 1].mean()
    assert (run / finetune.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tuned = GPT2LM.from_pretrained(run / "checkpoint")
    assert settings["total_steps"] == 10 and tuned.tokenizer.vocab_size == tuned.config.vocab_size
    original = GPT2LM.from_pretrained(tiny_lm_dir)
    ids, mask = original.tokenizer.encode_batch(["이때"])
    assert not np.allclose(tuned(ids, mask).numpy(), original(ids, mask).numpy())

    assert _finetune(tiny_lm_dir, novel, run, "--epochs", "3", "--max-steps", "14", "--resume") == 0
    assert training.read_training_counters(run / "checkpoint")["step"] == 14
    steps = np.loadtxt(run / finetune.STEP_LOG_FILE, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(steps[:, 0], np.arange(1, 15))
    capsys.readouterr()

    assert _finetune(tiny_lm_dir, novel, run, "--epochs", "3", "--max-steps", "14", "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.slow
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_lm_dir, novel, tmp_path):
    common = ("--epochs", "2", "--max-steps", "8", "--xla", "off", "--layout", "documents")
    assert _finetune(tiny_lm_dir, novel, tmp_path / "whole", *common) == 0
    assert (
        _finetune(
            tiny_lm_dir,
            novel,
            tmp_path / "split",
            "--epochs",
            "2",
            "--max-steps",
            "5",
            "--save-steps",
            "5",
            "--xla",
            "off",
            "--layout",
            "documents",
        )
        == 0
    )
    assert _finetune(tiny_lm_dir, novel, tmp_path / "split", *common, "--resume") == 0
    whole = GPT2LM.from_pretrained(tmp_path / "whole" / "checkpoint").get_weights()
    split = GPT2LM.from_pretrained(tmp_path / "split" / "checkpoint").get_weights()
    # The same batches in the same order reach the same weights; dropout masks differ, hence the tolerance.
    assert max(float(np.abs(a - b).max()) for a, b in zip(whole, split)) < 0.05


@pytest.fixture
def euc_kr_file(tmp_path):
    path = tmp_path / "legacy.txt"
    path.write_bytes("첫 줄\n둘째 줄\n".encode() + "셋째 줄\n".encode("euc-kr"))
    return path


@pytest.fixture
def cluttered_dir(tmp_path):
    directory = tmp_path / "cluttered"
    directory.mkdir()
    (directory / "notes.txt").write_text("mine")
    return directory


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "missing.txt: no such file"),
        ("empty", "empty.txt: the file has no text"),
        ("not-utf8", "legacy.txt, line 3: not UTF-8"),
        ("block-size", "--block-size 4096 is outside the model's context of 128 tokens"),
        ("cluttered-output", "is not empty and is not a fine-tuning run"),
        ("resume-nothing", "holds no fine-tuning run to resume"),
        ("zero-epochs", "argument --epochs: must be a positive integer"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    case, message, tiny_lm_dir, novel, euc_kr_file, cluttered_dir, tmp_path, capsys
):
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    train, output, extra = novel, tmp_path / "out", []
    if case == "missing":
        train = tmp_path / "missing.txt"
    elif case == "empty":
        train = tmp_path / "empty.txt"
    elif case == "not-utf8":
        train = euc_kr_file
    elif case == "block-size":
        extra = ["--block-size", "4096"]
    elif case == "cluttered-output":
        output = cluttered_dir
    elif case == "resume-nothing":
        extra = ["--resume"]
    elif case == "zero-epochs":
        extra = ["--epochs", "0"]
    assert _finetune(tiny_lm_dir, train, output, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    if case == "cluttered-output":
        assert sorted(p.name for p in cluttered_dir.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_an_earlier_run_is_not_overwritten_without_resume(tiny_lm_dir, novel, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_lm_dir, novel, run, "--max-steps", "2") == 0
    capsys.readouterr()
    assert _finetune(tiny_lm_dir, novel, run, "--max-steps", "2") == 2
    assert "holds an earlier fine-tuning run; pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_tokenizer_train_writes_a_loadable_sentencepiece_model(novel, tmp_path, capsys, model_type):
    output = tmp_path / "tok"
    assert (
        cli.main(
            [
                "tokenizer",
                "train",
                str(novel),
                "--vocab-size",
                "1500",
                "--output",
                str(output),
                "--model-type",
                model_type,
            ]
        )
        == 0
    )
    tok = Tokenizer.from_pretrained(output)
    assert tok.vocab_size == 1500
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token] == ["<s>", "</s>", "<pad>", "<unk>"]
    for line in novel.read_text(encoding="utf-8").splitlines()[:50]:
        assert tok.decode(tok.encode(line)) == line


def test_tokenizer_train_errors(novel, euc_kr_file, cluttered_dir, tmp_path, capsys):
    cases = [
        ([str(euc_kr_file), "--vocab-size", "100", "--output", str(tmp_path / "a")], "legacy.txt, line 3: not UTF-8"),
        ([str(novel), "--vocab-size", "100", "--output", str(cluttered_dir)], "is not an empty directory"),
        ([str(novel), "--vocab-size", "900000", "--output", str(tmp_path / "b")], "Vocabulary size too high"),
    ]
    for args, message in cases:
        assert cli.main(["tokenizer", "train", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_lm_dir, novel, tmp_path):
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    common = [
        "finetune",
        "--model",
        str(tiny_lm_dir),
        "--train",
        str(novel),
        "--output",
        str(run),
        "--batch-size",
        "8",
        "--block-size",
        "32",
        "--epochs",
        "50",
        "--save-steps",
        "3",
        "--xla",
        "off",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "tfgen", *common, "--max-steps", "400"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = run / "checkpoint" / "training_state" / "trainer_state.json"
    try:
        deadline = time.monotonic() + 180
        while not (state.is_file() and training.read_training_counters(run / "checkpoint")["step"] >= 6):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its second save"
            time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL: no clean-up code runs
        process.wait()
    saved = training.read_training_counters(run / "checkpoint")["step"]
    assert saved % 3 == 0 and GPT2LM.from_pretrained(run / "checkpoint").tokenizer is not None

    assert cli.main([*common, "--max-steps", str(saved + 4), "--resume"]) == 0
    assert training.read_training_counters(run / "checkpoint")["step"] == saved + 4
    steps = np.loadtxt(run / finetune.STEP_LOG_FILE, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(steps[:, 0], np.arange(1, saved + 5))  # no step logged twice
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_mixed_precision_run_saves_float32_weights_and_leaves_the_policy_alone(tiny_lm_dir, novel, tmp_path):
    import tensorflow as tf

    try:
        training.mixed_precision_policy()
    except ValueError as error:
        pytest.skip(str(error))
    run = tmp_path / "run"
    assert _finetune(tiny_lm_dir, novel, run, "--max-steps", "3", "--mixed-precision") == 0
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    assert training.read_training_counters(run / "checkpoint")["step"] == 3
    tuned = GPT2LM.from_pretrained(run / "checkpoint")
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in tuned.get_weights())
