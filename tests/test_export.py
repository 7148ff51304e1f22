"""The SavedModel export: served by TensorFlow alone, the same results as GPT2LM in process, clear errors."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfgen import GPT2LM, Tokenizer, cli, export_saved_model
from tfgen.export import serving_module
from tiny_model import tiny_config

# A ragged batch: different lengths, and an emoji that the tiny SentencePiece model spells in bytes.
PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때 😀", "대한민국의 수도는 서울이며, 가장 큰 도시이다"]
CAPACITY = 64
NUM_BEAMS = 3
SAMPLING = dict(
    do_sample=True,
    seed=7,
    top_k=20,
    top_p=0.9,
    temperature=0.8,
    repetition_penalty=1.3,
    no_repeat_ngram_size=2,
    max_new_tokens=20,
)
GREEDY = dict(max_new_tokens=20)
BEAM = dict(max_new_tokens=12, length_penalty=0.5)

# Runs in a fresh interpreter, outside the checkout, where tfgen and transformers cannot be imported.
LOAD_AND_GENERATE = """
import json, sys
sys.modules["tfgen"] = None  # `import tfgen` now raises ImportError
sys.modules["transformers"] = None
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the SentencePiece ops)

blocked = []
for name in ("tfgen", "transformers"):
    try:
        __import__(name)
    except ImportError:
        blocked.append(name)
model = tf.saved_model.load(sys.argv[1])
results = {}
for name, (function, settings) in json.loads(sys.argv[2]).items():
    out = getattr(model, function)(tf.constant(json.loads(sys.argv[3])), **settings)
    results[name] = {"completions": [text.decode("utf-8") for text in out["completions"].numpy()],
                     "sequences": out["sequences"].numpy().tolist()}
print(json.dumps({"blocked": blocked, "results": results}))
"""
SAVED_MODEL_CLI_WITH_TEXT_OPS = (
    "import tensorflow_text; from tensorflow.python.tools.saved_model_cli import main; main()"
)


@pytest.fixture(scope="module")
def export_dir(tiny_lm, tmp_path_factory):
    return export_saved_model(
        tiny_lm, tmp_path_factory.mktemp("export") / "model", capacity=CAPACITY, num_beams=NUM_BEAMS
    )


@pytest.fixture(scope="module")
def loaded(export_dir):
    import tensorflow_text  # noqa: F401  (the SentencePiece ops the export's graph uses)

    return tf.saved_model.load(str(export_dir))


def _in_process(lm, settings, num_beams=1):
    ids, mask = lm.tokenizer.encode_batch(PROMPTS)
    return {
        "completions": lm.generate_text(PROMPTS, return_full_text=False, num_beams=num_beams, **settings),
        "sequences": lm.generate(ids, mask, num_beams=num_beams, **settings).numpy().tolist(),
    }


@pytest.mark.slow
def test_a_fresh_process_without_tfgen_generates_what_generate_text_does(tiny_lm, export_dir, tmp_path):
    requests = {
        "greedy": ["generate_text", GREEDY],
        "sampling": ["generate_text", SAMPLING],
        "beam": ["generate_beam", BEAM],
    }
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, str(export_dir), json.dumps(requests), json.dumps(PROMPTS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    served = json.loads(run.stdout.splitlines()[-1])
    assert served["blocked"] == ["tfgen", "transformers"]
    results = served["results"]
    assert results["greedy"] == _in_process(tiny_lm, GREEDY)
    assert results["sampling"] == _in_process(tiny_lm, SAMPLING)
    assert results["beam"] == _in_process(tiny_lm, BEAM, num_beams=NUM_BEAMS)
    assert any(text.strip() for text in results["greedy"]["completions"])


def test_in_graph_tokenizer_encodes_as_the_tokenizer_does(tiny_lm):
    module = serving_module(tiny_lm, capacity=CAPACITY, num_beams=2)
    ids, mask = module.text.encode(tf.constant(PROMPTS))
    expected_ids, expected_mask = tiny_lm.tokenizer.encode_batch(PROMPTS)
    np.testing.assert_array_equal(ids.numpy(), expected_ids)
    np.testing.assert_array_equal(mask.numpy(), expected_mask)


@pytest.mark.slow
def test_request_settings_change_the_output_without_a_retrace(tiny_lm):
    module = serving_module(tiny_lm, capacity=CAPACITY, num_beams=2)

    def generate(**settings):
        return module.generate_text(tf.constant(PROMPTS), max_new_tokens=12, **settings)["sequences"].numpy().tolist()

    greedy, sampled = generate(), generate(do_sample=True, seed=1)
    assert greedy != sampled
    for changed in [dict(repetition_penalty=2.0), dict(no_repeat_ngram_size=1)]:
        assert generate(**changed) != greedy, changed
    for changed in [dict(seed=2), dict(temperature=3.0), dict(top_k=2), dict(top_k=0, top_p=0.3)]:
        assert generate(**{"do_sample": True, "seed": 1, **changed}) != sampled, changed
    module.generate_text(tf.constant(PROMPTS[:1]), max_new_tokens=40)  # another batch, prompt and buffer size
    module.generate_ids(*tiny_lm.tokenizer.encode_batch(PROMPTS[1:]), max_new_tokens=3, do_sample=True)
    assert module.generate_text.experimental_get_tracing_count() == 1
    assert module.generate_ids.experimental_get_tracing_count() == 1
    assert module.programs["greedy"].experimental_get_tracing_count() == 1
    assert module.programs["sample"].experimental_get_tracing_count() == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_new_tokens=60), f"plus max_new_tokens (60) exceeds the capacity of {CAPACITY} tokens"),
        (dict(top_p=0.0), "top_p must be in (0, 1], got 0"),
        (dict(do_sample=True, temperature=-1.0), "temperature must be > 0 when sampling, got -1"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
        (dict(top_k=-1), "top_k must be a non-negative integer"),
        (dict(no_repeat_ngram_size=9), "no_repeat_ngram_size must be an integer from 0 (off) to 8, got 9"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    ],
)
def test_bad_requests_fail_with_a_clear_message(loaded, settings, message):
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        loaded.generate_text(tf.constant(PROMPTS), **settings)
    assert message in error.value.message


@pytest.mark.slow
def test_empty_requests_fail_clearly_and_the_model_still_serves(loaded, tiny_lm):
    with pytest.raises(tf.errors.InvalidArgumentError, match="a prompt has no tokens"):
        loaded.generate_ids(input_ids=[[5, 6]], attention_mask=[[0, 0]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="no prompts"):
        loaded.generate_text(tf.constant([], tf.string))
    new = loaded.generate_text(tf.constant(PROMPTS[:1]), max_new_tokens=5)["completions"].numpy()[0].decode()
    assert new == tiny_lm.generate_text(PROMPTS[0], return_full_text=False, max_new_tokens=5)


def test_an_interrupted_export_leaves_no_partial_directory(tiny_lm, tmp_path, monkeypatch):
    def interrupted_save(module, directory, **kwargs):
        (Path(directory) / "saved_model.pb").write_bytes(b"half")  # a save cut short
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.saved_model, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        export_saved_model(tiny_lm, tmp_path / "export", capacity=CAPACITY)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "saved_model.pb").write_bytes(b"the previous export")
    with pytest.raises(KeyboardInterrupt):
        export_saved_model(tiny_lm, tmp_path / "export", capacity=CAPACITY)
    assert [path.name for path in tmp_path.iterdir()] == ["export"]
    assert (tmp_path / "export" / "saved_model.pb").read_bytes() == b"the previous export"


def test_export_settings_are_checked(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="capacity must be from 2 to the model's context of 128"):
        export_saved_model(tiny_lm, tmp_path / "export", capacity=129)
    with pytest.raises(ValueError, match="num_beams must be an integer >= 2"):
        export_saved_model(tiny_lm, tmp_path / "export", num_beams=1)
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_saved_model_cli_shows_and_runs_the_export(export_dir, tiny_lm):
    shown = subprocess.run(
        ["saved_model_cli", "show", "--dir", str(export_dir), "--all"], capture_output=True, text=True, check=True
    ).stdout
    for line in [
        "signature_def['serving_default']",
        "inputs['prompts']",
        "inputs['temperature']",
        "inputs['seed']",
        "outputs['completions']",
        "signature_def['generate_ids']",
        "inputs['input_ids']",
        "signature_def['generate_beam']",
        "inputs['length_penalty']",
    ]:
        assert line in shown
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            SAVED_MODEL_CLI_WITH_TEXT_OPS,
            "run",
            "--dir",
            str(export_dir),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--input_exprs",
            f'prompts=["{PROMPTS[1]}"];max_new_tokens=8',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    completions = run.split("Result for output key completions:\n")[1].splitlines()[0]
    expected = tiny_lm.generate_text(PROMPTS[1], return_full_text=False, max_new_tokens=8)
    assert ast.literal_eval(completions) == [expected.encode("utf-8")]


@pytest.mark.slow
def test_a_tokenizer_json_model_exports_the_ids_signatures(hf_tokenizer_dir, tmp_path):
    tokenizer = Tokenizer.from_pretrained(hf_tokenizer_dir)
    tf.keras.utils.set_random_seed(0)
    lm = GPT2LM.from_config(tiny_config(tokenizer), tokenizer)
    model = tf.saved_model.load(str(export_saved_model(lm, tmp_path / "ids", capacity=40, num_beams=2)))
    assert {"input_ids", "attention_mask"} <= set(model.signatures["serving_default"].structured_input_signature[1])
    assert not hasattr(model, "generate_text")
    ids, mask = tokenizer.encode_batch(PROMPTS)
    out = model.generate_ids(ids, mask, max_new_tokens=6)["sequences"].numpy()
    np.testing.assert_array_equal(out, lm.generate(ids, mask, max_new_tokens=6).numpy())


@pytest.mark.slow
def test_cli_export_writes_the_saved_model_and_refuses_to_overwrite(tiny_lm_dir, tmp_path, capsys):
    output = tmp_path / "served"
    assert cli.main(["export", str(tiny_lm_dir), str(output), "--capacity", "48", "--num-beams", "2"]) == 0
    assert "serving_default: prompts -> completions, sequences" in capsys.readouterr().out
    assert (output / "saved_model.pb").is_file()
    assert cli.main(["export", str(tiny_lm_dir), str(output)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["export", "no/such/model/dir", "out"], "no model directory"),
        (["export", "{model}", "out", "--capacity", "0"], "must be a positive integer"),
        (["export", "{model}", "out", "--capacity", "4096"], "capacity must be from 2 to the model's context"),
        (["export", "{model}", "out", "--num-beams", "1"], "num_beams must be an integer >= 2"),
    ],
)
def test_cli_export_bad_input_is_one_line(arguments, message, tiny_lm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main([part.format(model=tiny_lm_dir) for part in arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
