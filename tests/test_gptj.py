"""GPT-J (the KoGPT family) through tfgen's compiled decoding, against transformers' PyTorch GPTJForCausalLM."""

import json

import numpy as np
import pytest
import tensorflow as tf
import torch
from transformers import GPTJForCausalLM

from test_sampling import transformers_filter
from tfgen import GPT2LM, GPTJLM, CausalLM, checkpoint
from tfgen.data import lm_batches
from tiny_gptj import pt_reference
from tiny_model import load_recording_assigns

PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때", "대한민국의 수도는 서울이며, 가장 큰 도시이다"]
SEED_PROMPT = "야! 너는 AI지? 정말로 말을 알아듣니?"


@pytest.fixture(scope="module")
def gptj(gptj_dir):
    return CausalLM.from_pretrained(gptj_dir)


@pytest.fixture(scope="module")
def pt_gptj(gptj_dir):
    return pt_reference(gptj_dir)


def _pt_generate(model, ids, mask, **settings):
    with torch.no_grad():
        return model.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), **settings
        ).numpy()


def test_the_checkpoint_is_fp16_shards_with_kogpt_special_tokens(gptj_dir, gptj_bin_dir, gptj):
    for directory, index in [
        (gptj_dir, "model.safetensors.index.json"),
        (gptj_bin_dir, "pytorch_model.bin.index.json"),
    ]:
        shards = set(json.loads((directory / index).read_text())["weight_map"].values())
        assert len(shards) >= 2
    tokenizer = gptj.tokenizer
    assert [tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token] == [
        "[BOS]",
        "[EOS]",
        "[UNK]",
        "[PAD]",
    ]
    assert isinstance(gptj, GPTJLM) and {v.dtype for v in gptj.gptj.weights} == {tf.float32}


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_greedy_on_a_ragged_batch_matches_pytorch_token_for_token(weights, gptj_dir, gptj_bin_dir, pt_gptj):
    lm = CausalLM.from_pretrained(gptj_dir if weights == "safetensors" else gptj_bin_dir)
    ids, mask = lm.tokenizer.encode_batch(PROMPTS)
    assert len(set(mask.sum(axis=1))) > 1
    settings = dict(
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=lm.tokenizer.eos_token_id,
        eos_token_id=lm.tokenizer.eos_token_id,
    )
    np.testing.assert_array_equal(
        lm.generate(ids, mask, **settings).numpy(), _pt_generate(pt_gptj, ids, mask, **settings)
    )


@pytest.mark.parametrize(
    "settings",
    [
        # seed 004's beam call
        dict(num_beams=5, no_repeat_ngram_size=2, num_return_sequences=5, early_stopping=True),
        dict(num_beams=3, num_return_sequences=2, length_penalty=0.6),
    ],
    ids=["seed-004-beams", "length-penalty"],
)
def test_beam_search_matches_pytorch(settings, gptj, pt_gptj):
    ids, mask = gptj.tokenizer.encode_batch([SEED_PROMPT] if settings["num_beams"] == 5 else PROMPTS[:3])
    settings = dict(
        max_new_tokens=16,
        pad_token_id=gptj.tokenizer.eos_token_id,
        eos_token_id=gptj.tokenizer.eos_token_id,
        **settings,
    )
    np.testing.assert_array_equal(
        gptj.generate(ids, mask, **settings).numpy(), _pt_generate(pt_gptj, ids, mask, do_sample=False, **settings)
    )


def test_sampled_tokens_lie_in_the_set_transformers_warpers_allow(gptj, pt_gptj):
    """Seed 004's sampling settings: each sampled token is kept by temperature, top-k and top-p on PyTorch's logits."""
    ids = gptj.tokenizer.encode(SEED_PROMPT)
    settings = dict(top_k=50, top_p=0.95, temperature=0.75)
    out = gptj.generate(
        [ids], do_sample=True, num_return_sequences=3, max_new_tokens=12, seed=3, eos_token_id=None, **settings
    ).numpy()
    assert len({tuple(row) for row in out}) > 1
    for row in out:
        with torch.no_grad():
            logits = pt_gptj(torch.tensor(row[None, :-1], dtype=torch.long)).logits[0].numpy()
        for column in range(len(ids), len(row)):
            allowed = np.isfinite(transformers_filter(logits[column - 1][None], **settings)[0])
            assert allowed[row[column]], (column, row[column])


def test_score_matches_pytorch_log_probabilities(gptj, pt_gptj):
    for text, result in zip(PROMPTS, gptj.score(PROMPTS)):
        ids = gptj.tokenizer.encode(text)
        with torch.no_grad():
            logprobs = torch.log_softmax(pt_gptj(torch.tensor([ids])).logits[0], dim=-1)
        expected = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(result["token_logprobs"], expected, atol=1e-4)


def test_save_pretrained_writes_what_transformers_reads(gptj, pt_gptj, tmp_path):
    gptj.save_pretrained(tmp_path / "saved")
    reloaded = GPTJForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([gptj.tokenizer.encode(PROMPTS[3])])
    with torch.no_grad():
        expected = pt_gptj(ids).logits.numpy()
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(gptj(ids.numpy()).numpy(), expected, atol=1e-4)
    assert isinstance(CausalLM.from_pretrained(tmp_path / "saved"), GPTJLM)


def test_fit_lowers_held_out_loss(gptj_dir, ko_lines):
    lm = CausalLM.from_pretrained(gptj_dir)
    train = [line for i, line in enumerate(ko_lines) if i % 10]
    held_out = ko_lines[::10]

    def batches(lines):
        return lm_batches(lines, lm.tokenizer, block_size=32, batch_size=16, layout="documents", seed=0)

    lm.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    before = lm.evaluate(batches(held_out), verbose=0, return_dict=True)["loss"]
    lm.fit(batches(train), epochs=1, verbose=0)
    after = lm.evaluate(batches(held_out), verbose=0, return_dict=True)["loss"]
    assert after < before - 0.05, (before, after)


def test_keras_file_round_trip(gptj, tmp_path):
    path = tmp_path / "gptj.keras"
    gptj.save(path)
    loaded = tf.keras.models.load_model(path, custom_objects={"GPTJLM": GPTJLM})
    ids = np.array([gptj.tokenizer.encode(PROMPTS[1])])
    np.testing.assert_allclose(loaded(ids).numpy(), gptj(ids).numpy(), atol=1e-6)
    assert loaded.generate_text(PROMPTS[1], max_new_tokens=6) == gptj.generate_text(PROMPTS[1], max_new_tokens=6)


def test_bfloat16_loads_every_weight_in_bfloat16(gptj_dir, monkeypatch):
    lm, assigned = load_recording_assigns(lambda: CausalLM.from_pretrained(gptj_dir, dtype="bfloat16"), monkeypatch)
    assert {v.dtype for v in lm.gptj.weights} == {tf.bfloat16}
    assert set(assigned) == {tf.bfloat16} and len(assigned) == len(lm.gptj.weights)  # no float32 copy assigned
    assert lm(np.array([[5, 6, 7]])).dtype == tf.float32
    assert lm.generate([[5, 6, 7]], max_new_tokens=4, eos_token_id=None).shape == (1, 7)


def test_a_low_precision_one_row_projection_runs_as_two_rows_with_the_same_values(gptj_dir):
    for dtype in ("bfloat16", "float32"):
        net = CausalLM.from_pretrained(gptj_dir, dtype=dtype).net
        for layer in (net.model.transformer.h[0].mlp, net.model.lm_head):
            _assert_projects_as_the_layer(net, layer, dtype)


def _assert_projects_as_the_layer(net, layer, dtype):
    x = tf.cast(tf.random.stateless_normal([1, 1, net.config.n_embd], seed=[1, 2]), dtype)
    projected = tf.function(lambda x: net.project(layer, x), jit_compile=True)(x)
    alone = tf.function(lambda x: layer(x), jit_compile=True)(x)
    assert projected.shape == alone.shape and projected.dtype == alone.dtype
    # The two-row product may sum in another order than the one-row one: bfloat16 rounding apart.
    np.testing.assert_allclose(
        tf.cast(projected, tf.float32).numpy(),
        tf.cast(alone, tf.float32).numpy(),
        rtol=0.02,
        atol=0.02 * float(tf.reduce_max(tf.abs(tf.cast(alone, tf.float32)))),
    )


def test_h5_and_tensors_read_in_many_blocks_load_the_same_weights(gptj, gptj_dir, gptj_bin_dir, tmp_path, monkeypatch):
    gptj.save_pretrained(tmp_path)
    (tmp_path / checkpoint.SAFETENSORS_FILE).unlink()  # tf_model.h5 is read
    monkeypatch.setattr(checkpoint, "_BLOCK_BYTES", 100)  # a few rows per block: every tensor in many blocks
    for directory, dtype in [
        (tmp_path, "bfloat16"),
        (tmp_path, "float32"),
        (gptj_dir, "float32"),
        (gptj_bin_dir, "bfloat16"),
    ]:
        lm = CausalLM.from_pretrained(directory, dtype=dtype)
        for ours, theirs in zip(lm.gptj.weights, gptj.gptj.weights):
            np.testing.assert_array_equal(ours.numpy(), tf.cast(theirs, dtype).numpy())


def test_unsupported_model_types_and_mismatched_classes_are_clear_errors(gptj_dir, tiny_lm_dir, tmp_path):
    for path in gptj_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type 'llama'.*supported model types: gpt2, gptj"):
        CausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a gptj model, which GPT2LM cannot load; use tfgen.CausalLM"):
        GPT2LM.from_pretrained(gptj_dir)
    assert isinstance(CausalLM.from_pretrained(tiny_lm_dir), GPT2LM)


@pytest.mark.slow
def test_the_saved_model_export_serves_what_generate_does(gptj, tmp_path):
    from tfgen import export_saved_model

    directory = export_saved_model(gptj, tmp_path / "export", capacity=64, num_beams=3)
    served = tf.saved_model.load(str(directory))
    ids, mask = gptj.tokenizer.encode_batch(PROMPTS)
    settings = dict(
        max_new_tokens=12, eos_token_id=gptj.tokenizer.eos_token_id, pad_token_id=gptj.tokenizer.pad_token_id
    )
    greedy = served.generate_ids(tf.constant(ids), tf.constant(mask), max_new_tokens=12)
    np.testing.assert_array_equal(greedy["sequences"].numpy(), gptj.generate(ids, mask, **settings).numpy())
    sampled = served.generate_ids(
        tf.constant(ids),
        tf.constant(mask),
        max_new_tokens=12,
        do_sample=True,
        seed=5,
        top_k=50,
        top_p=0.95,
        temperature=0.75,
    )
    np.testing.assert_array_equal(
        sampled["sequences"].numpy(),
        gptj.generate(ids, mask, do_sample=True, seed=5, top_k=50, top_p=0.95, temperature=0.75, **settings).numpy(),
    )
    beams = served.generate_beam(tf.constant(ids), tf.constant(mask), max_new_tokens=12)
    np.testing.assert_array_equal(beams["sequences"].numpy(), gptj.generate(ids, mask, num_beams=3, **settings).numpy())


def test_cli_generate_and_score_take_a_gptj_model(gptj, gptj_dir, capsys):
    from tfgen.cli import main

    assert main(["generate", PROMPTS[1], "--model", str(gptj_dir), "--max-new-tokens", "8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["token_ids"] == [gptj.complete([PROMPTS[1]], max_new_tokens=8)[0][0].new_token_ids]
    assert main(["score", PROMPTS[0], "--model", str(gptj_dir), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["logprob"] == pytest.approx(gptj.score(PROMPTS[0])["logprob"], abs=1e-4)


def test_seed_004_calls_as_the_readme_writes_them(gptj_dir):
    """README's seed 004 section, run on the tiny GPT-J in place of KoGPT 6B."""
    import tfgen

    lm = tfgen.CausalLM.from_pretrained(
        gptj_dir, bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]"
    )
    prompt = "야! 너는 AI지? 정말로 말을 알아듣니?"
    beams = lm.generate_text(
        prompt,
        max_length=40,
        num_beams=5,
        no_repeat_ngram_size=2,
        num_return_sequences=5,
        early_stopping=True,
        pad_token_id=lm.tokenizer.eos_token_id,
    )
    sampled = lm.generate_text(
        prompt,
        max_length=40,
        do_sample=True,
        top_k=50,
        top_p=0.95,
        temperature=0.75,
        num_return_sequences=3,
        pad_token_id=lm.tokenizer.eos_token_id,
    )
    interview = lm.generate_text(
        "\n요즘 굉장히 핫한 인공지능인 GPT님과 인터뷰를 나눠보겠습니다!\nQ : GPT님, 요즘 바쁘시죠?\nA : ",
        max_length=100,
        do_sample=True,
        top_k=50,
        top_p=0.95,
        temperature=0.85,
        num_return_sequences=3,
        pad_token_id=lm.tokenizer.eos_token_id,
    )
    for texts in (beams, sampled, interview):
        assert all(isinstance(text, str) for text in texts)
    assert len(beams) == 5 and len(sampled) == 3 and len(interview) == 3
    assert all(text.startswith(prompt) for text in beams + sampled)


@pytest.mark.slow
def test_litert_export_generates_and_scores_as_gptjlm(gptj, tmp_path):
    from tfgen import export_litert
    from tfgen.litert import LiteRTLM

    runtime = LiteRTLM(export_litert(gptj, tmp_path / "litert", quantize="none", capacity=64))
    for prompt in PROMPTS:
        ids = gptj.tokenizer.encode(prompt)
        for settings in (
            dict(max_new_tokens=12),
            dict(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=2),
        ):
            expected = gptj.generate([ids], **settings).numpy()[0].tolist()
            assert runtime.generate([ids], **settings)[0].tolist() == expected
    for result, reference in zip(runtime.score(PROMPTS), gptj.score(PROMPTS)):
        assert result["tokens"] == reference["tokens"]
        np.testing.assert_allclose(result["token_logprobs"], reference["token_logprobs"], rtol=1e-4, atol=1e-4)
