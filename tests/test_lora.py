"""LoRA fine-tuning (GPT-2 and GPT-J): only the adapters train, and the merged checkpoint and the PEFT adapter
files give transformers' PyTorch models (and the real `peft` package) the logits tfgen's LoRA model gives."""

import itertools
import json

import numpy as np
import pytest
import tensorflow as tf
import torch
from safetensors.numpy import load_file
from transformers import GPT2Config, GPT2LMHeadModel, GPTJForCausalLM

from tfgen import GPT2LM, CausalLM, cli, finetune, lora, training
from tfgen.data import lm_batches

PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때", "대한민국의 수도는 서울이며, 가장 큰 도시이다"]
PYTORCH_CLASSES = {"gpt2": GPT2LMHeadModel, "gptj": GPTJForCausalLM}
TARGETS = {"gpt2": ["c_attn"], "gptj": ["q_proj", "v_proj"]}


def _batches(lm, lines):
    return lm_batches(lines, lm.tokenizer, block_size=32, batch_size=16, layout="documents", seed=0)


def _logits(lm, text):
    ids, mask = lm.tokenizer.encode_batch([text])
    return ids, lm(ids, mask).numpy()


def _pytorch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _bible_verses(ko_data_dir, count=1500):
    """The first Bible verses (1961 translation): a style the tiny base models were not trained on (they saw
    ko_lines), so that adapting to it lowers held-out loss clearly."""
    with open(ko_data_dir / "bluesaurel_Korean-Bible-1961-KRV" / "bible_krv_1961.tsv", encoding="utf-8") as f:
        return [line.split("\t", 1)[1].strip() for line in itertools.islice(f, count)]


class Trained:
    """A model after LoRA training on most of `lines`: its base weights before and held-out loss before/after."""

    def __init__(self, base_dir, lines):
        tf.keras.utils.set_random_seed(0)
        self.base_dir = base_dir
        self.lm = CausalLM.from_pretrained(base_dir)
        self.model_type = self.lm.config.model_type
        self.base_weights = [w.numpy() for w in self.lm.net.model.weights]
        self.lm.enable_lora(8)
        self.lm.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
        held_out = _batches(self.lm, lines[::10])
        self.loss_before = self.lm.evaluate(held_out, verbose=0, return_dict=True)["loss"]
        self.lm.fit(_batches(self.lm, [line for i, line in enumerate(lines) if i % 10]), epochs=1, verbose=0)
        self.loss_after = self.lm.evaluate(held_out, verbose=0, return_dict=True)["loss"]

    def pytorch_base(self):
        return PYTORCH_CLASSES[self.model_type].from_pretrained(self.base_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["gpt2", "gptj"])
def trained(request, ko_data_dir):
    return Trained(
        request.getfixturevalue({"gpt2": "tiny_lm_dir", "gptj": "gptj_dir"}[request.param]), _bible_verses(ko_data_dir)
    )


@pytest.mark.slow
def test_at_rank_8_on_gpt2_base_size_only_the_adapters_train_under_2_percent():
    lm = GPT2LM(GPT2Config())  # 124 M parameters, weights built from the config (nothing loaded)
    total = lm.count_params()
    lm.enable_lora(8)
    trainable = lm.trainable_weights
    assert {id(w) for w in trainable} == {id(w) for pair in lm.lora.pairs for w in pair}
    assert len(trainable) == 2 * 12  # an A and a B on each block's c_attn
    count = sum(int(np.prod(w.shape)) for w in trainable)
    assert count == 12 * (768 * 8 + 8 * 3 * 768)
    assert count / total < 0.02, count / total
    assert sum(int(np.prod(w.shape)) for w in lm.non_trainable_weights) == total


@pytest.mark.parametrize("directory", ["tiny_lm_dir", "gptj_dir"])
def test_enabling_changes_no_output_until_trained(directory, request):
    lm = CausalLM.from_pretrained(request.getfixturevalue(directory))
    ids, mask = lm.tokenizer.encode_batch(PROMPTS)
    logits, tokens = lm(ids, mask).numpy(), lm.generate(ids, mask, max_new_tokens=6).numpy()
    lm.enable_lora(4)
    np.testing.assert_array_equal(lm(ids, mask).numpy(), logits)
    np.testing.assert_array_equal(lm.generate(ids, mask, max_new_tokens=6).numpy(), tokens)


@pytest.mark.slow
def test_fit_lowers_held_out_loss_and_leaves_the_base_weights_bit_identical(trained):
    assert trained.loss_after < trained.loss_before - 0.02, (trained.loss_before, trained.loss_after)
    for before, after in zip(trained.base_weights, trained.lm.net.model.weights):
        np.testing.assert_array_equal(after.numpy(), before)
    assert all(float(np.abs(b.numpy()).max()) > 0 for _, b in trained.lm.lora.pairs)


@pytest.mark.slow
def test_the_merged_checkpoint_gives_pytorch_the_logits_of_the_lora_model(trained, tmp_path):
    lm = trained.lm
    lm.save_pretrained(tmp_path / "merged")
    merged = PYTORCH_CLASSES[trained.model_type].from_pretrained(tmp_path / "merged").eval()
    ids, logits = _logits(lm, PROMPTS[3])
    np.testing.assert_allclose(_pytorch_logits(merged, ids), logits, atol=1e-4)
    # The adapters moved the logits well beyond that tolerance, and saving left the base weights as they were.
    assert np.abs(_pytorch_logits(trained.pytorch_base(), ids) - logits).max() > 1e-2
    for before, after in zip(trained.base_weights, lm.net.model.weights):
        np.testing.assert_array_equal(after.numpy(), before)
    assert not (tmp_path / "merged" / lora.ADAPTER_CONFIG_FILE).exists()


@pytest.mark.slow
def test_generate_equals_generate_of_the_merged_checkpoint_loaded_back(trained, tmp_path):
    lm = trained.lm
    lm.save_pretrained(tmp_path / "merged")
    reloaded = CausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.lora is None
    ids, mask = lm.tokenizer.encode_batch(PROMPTS)
    tokens = lm.generate(ids, mask, max_new_tokens=10).numpy()
    np.testing.assert_array_equal(reloaded.generate(ids, mask, max_new_tokens=10).numpy(), tokens)
    assert not np.array_equal(
        CausalLM.from_pretrained(trained.base_dir).generate(ids, mask, max_new_tokens=10).numpy(), tokens
    )
    np.testing.assert_allclose(
        [r["logprob"] for r in reloaded.score(PROMPTS)], [r["logprob"] for r in lm.score(PROMPTS)], atol=1e-4
    )


@pytest.mark.slow
def test_the_peft_adapter_loads_with_peft_and_back_into_tfgen(trained, tmp_path):
    from peft import PeftModel

    lm = trained.lm
    lm.save_lora_adapter(tmp_path / "adapter", base_model_name_or_path="tiny-base")
    config = json.loads((tmp_path / "adapter" / lora.ADAPTER_CONFIG_FILE).read_text())
    assert {
        key: config[key]
        for key in (
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "target_modules",
            "fan_in_fan_out",
            "base_model_name_or_path",
            "lora_dropout",
            "bias",
        )
    } == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_alpha": 8,
        "target_modules": TARGETS[trained.model_type],
        "fan_in_fan_out": trained.model_type == "gpt2",
        "base_model_name_or_path": "tiny-base",
        "lora_dropout": 0.0,
        "bias": "none",
    }
    tensors = load_file(tmp_path / "adapter" / lora.ADAPTER_WEIGHTS_FILE)
    target = TARGETS[trained.model_type][0]
    a, b = (tensors[f"base_model.model.transformer.h.0.attn.{target}.lora_{letter}.weight"] for letter in "AB")
    width = lm.config.n_embd
    assert a.shape == (8, width) and b.shape == (width * (3 if target == "c_attn" else 1), 8)

    peft_model = PeftModel.from_pretrained(trained.pytorch_base(), tmp_path / "adapter").eval()
    ids, logits = _logits(lm, PROMPTS[1])
    np.testing.assert_allclose(_pytorch_logits(peft_model, ids), logits, atol=1e-4)

    fresh = CausalLM.from_pretrained(trained.base_dir)
    fresh.load_lora_adapter(tmp_path / "adapter")
    np.testing.assert_array_equal(_logits(fresh, PROMPTS[1])[1], logits)


@pytest.mark.slow
def test_the_saved_model_export_runs_the_adapters(trained, tmp_path):
    from tfgen import export_saved_model

    lm = trained.lm
    served = tf.saved_model.load(str(export_saved_model(lm, tmp_path / "export", capacity=64, num_beams=2)))
    ids, mask = lm.tokenizer.encode_batch(PROMPTS)
    greedy = served.generate_ids(tf.constant(ids), tf.constant(mask), max_new_tokens=10)
    np.testing.assert_array_equal(greedy["sequences"].numpy(), lm.generate(ids, mask, max_new_tokens=10).numpy())


def test_bad_settings_are_clear_errors(tiny_lm_dir, gptj_dir, tmp_path):
    lm = CausalLM.from_pretrained(tiny_lm_dir)
    for rank in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
            lm.enable_lora(rank)
    with pytest.raises(ValueError, match="LoRA alpha must be a positive number"):
        lm.enable_lora(4, alpha=0)
    with pytest.raises(ValueError, match="no LoRA adapter; call enable_lora"):
        lm.save_lora_adapter(tmp_path / "none")
    assert lm.lora is None and lm.trainable_weights  # nothing was frozen by the failed calls
    lm.enable_lora(4)
    with pytest.raises(ValueError, match="already enabled on this model \\(rank 4\\)"):
        lm.enable_lora(4)
    with pytest.raises(ValueError, match="with_dtype copies the base weights only"):
        lm.with_dtype("bfloat16")
    with pytest.raises(NotImplementedError, match="saved with save_pretrained \\(merged weights\\)"):
        lm.save(tmp_path / "lora.keras")
    lm.save_lora_adapter(tmp_path / "rank4")
    other = CausalLM.from_pretrained(tiny_lm_dir)
    other.enable_lora(2)
    with pytest.raises(ValueError, match="has r 4, these adapters 2"):
        other.load_lora_adapter(tmp_path / "rank4")
    gptj = CausalLM.from_pretrained(gptj_dir)
    with pytest.raises(ValueError, match="target_modules \\['c_attn'\\]"):
        gptj.load_lora_adapter(tmp_path / "rank4")
    assert gptj.lora is None
    compiled = CausalLM.from_pretrained(tiny_lm_dir)
    compiled.compile()
    with pytest.raises(ValueError, match="enable_lora must come before compile"):
        compiled.enable_lora(4)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        compiled.load_lora_adapter(tmp_path)


@pytest.fixture(scope="module")
def novel(ko_lines, tmp_path_factory):
    path = tmp_path_factory.mktemp("novel") / "novel.txt"
    path.write_text("\n".join(ko_lines[-300:]) + "\n", encoding="utf-8")
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
            "1e-2",
            "--epochs",
            "3",
            *extra,
        ]
    )


@pytest.mark.slow
def test_finetune_with_lora_rank_checkpoints_and_resumes(tiny_lm_dir, novel, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_lm_dir, novel, run, "--lora-rank", "4", "--max-steps", "6", "--save-steps", "3") == 0
    checkpoint_dir = run / finetune.CHECKPOINT_DIR
    assert training.read_training_counters(checkpoint_dir)["step"] == 6
    adapter = checkpoint_dir / training.LORA_ADAPTER_DIR
    assert json.loads((adapter / lora.ADAPTER_CONFIG_FILE).read_text())["r"] == 4

    # checkpoint/ holds merged weights: loaded plainly, they give what the base with the adapter gives.
    merged = CausalLM.from_pretrained(checkpoint_dir)
    with_adapter = CausalLM.from_pretrained(tiny_lm_dir)
    with_adapter.load_lora_adapter(adapter)
    np.testing.assert_allclose(_logits(merged, PROMPTS[3])[1], _logits(with_adapter, PROMPTS[3])[1], atol=1e-4)
    assert not np.allclose(
        _logits(merged, PROMPTS[3])[1], _logits(CausalLM.from_pretrained(tiny_lm_dir), PROMPTS[3])[1]
    )

    # The optimizer state holds Adam's slots of the adapters only (2 per layer, m and v each).
    saved = tf.train.list_variables(str(checkpoint_dir / training.TRAINING_STATE_DIR / "optimizer"))
    width, layers = merged.config.n_embd, merged.config.n_layer
    assert sorted(tuple(shape) for _, shape in saved if shape) == sorted(
        [(width, 4)] * 2 * layers + [(4, 3 * width)] * 2 * layers
    ), saved

    assert _finetune(tiny_lm_dir, novel, run, "--lora-rank", "4", "--max-steps", "9", "--resume") == 0
    assert training.read_training_counters(checkpoint_dir)["step"] == 9
    steps = np.loadtxt(run / finetune.STEP_LOG_FILE, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(steps[:, 0], np.arange(1, 10))
    capsys.readouterr()

    assert _finetune(tiny_lm_dir, novel, run, "--max-steps", "12", "--resume") == 2
    assert "started with --lora-rank 4; resume it with the same, not full fine-tuning" in capsys.readouterr().err
    assert _finetune(tiny_lm_dir, novel, tmp_path / "bad", "--lora-rank", "0") == 2
    err = capsys.readouterr().err
    assert "argument --lora-rank: must be a positive integer" in err and err.count("\n") == 1
