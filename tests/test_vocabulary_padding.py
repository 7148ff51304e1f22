"""A model whose embedding has 64 rows more than its tokenizer has tokens (as GPT-J 6B's 50,400 for 50,257, or a
checkpoint padded to a multiple of 64): every decoding path gives text, never an error, when those ids come out."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from transformers import GPT2Config

from tfgen import GPT2LM, Tokenizer, cli, export_litert, export_saved_model

PADDING = 64
PROMPT = "대한민국의 수도는"
SAMPLING = dict(do_sample=True, top_k=0, top_p=1.0, seed=3, max_new_tokens=24)


def _biased_towards_padding(tokenizer):
    """An untrained tiny GPT-2 whose every next-token distribution is the same: the padding ids and ten of the
    tokenizer's pieces equally likely, the last padding id a little more (so greedy picks it)."""
    vocab = tokenizer.vocab_size + PADDING
    lm = GPT2LM(
        GPT2Config(
            vocab_size=vocab,
            n_positions=64,
            n_embd=32,
            n_layer=1,
            n_head=2,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        tokenizer,
    )
    lm(np.array([[1, 2]], np.int32))
    transformer = lm.gpt2.transformer
    # The final LayerNorm outputs its bias alone, e_0 * 1, so a token's logit is its embedding's first feature.
    transformer.ln_f.gamma.assign(tf.zeros_like(transformer.ln_f.gamma))
    transformer.ln_f.beta.assign(tf.one_hot(0, 32))
    wte = transformer.wte.embeddings.numpy()
    wte[:, 0] = -10.0
    plain = [i for i in range(tokenizer.vocab_size) if i not in tokenizer.all_special_ids][100:110]
    wte[plain + list(range(tokenizer.vocab_size, vocab)), 0] = 5.0
    wte[vocab - 1, 0] = 6.0
    transformer.wte.embeddings.assign(wte)
    return lm


@pytest.fixture(scope="module")
def padded_dir(spm_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("padded-vocabulary")
    _biased_towards_padding(Tokenizer.from_pretrained(spm_dir)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def padded_lm(padded_dir):
    with pytest.warns(UserWarning, match=r"its tokenizer's 1000: ids 1000 to 1063 have no token"):
        return GPT2LM.from_pretrained(padded_dir)


def _padding_ids(ids, tokenizer):
    return [i for i in ids if not tokenizer.knows(int(i))]


def test_greedy_sampling_beams_and_streaming_give_text(padded_lm):
    tokenizer = padded_lm.tokenizer
    greedy = padded_lm.generate(np.array([tokenizer.encode(PROMPT)], np.int32), max_new_tokens=8).numpy()[0]
    assert _padding_ids(greedy, tokenizer) == [tokenizer.vocab_size + PADDING - 1] * 8
    assert padded_lm.generate_text(PROMPT, max_new_tokens=8) == PROMPT  # those ids spell nothing

    ids = tokenizer.encode(PROMPT)
    sampled = padded_lm.complete([PROMPT], **SAMPLING)[0][0]
    assert _padding_ids(sampled.new_token_ids, tokenizer) and len(_padding_ids(sampled.new_token_ids, tokenizer)) < 24
    assert sampled.new_text == tokenizer.decode(sampled.new_token_ids) != ""
    assert "".join(padded_lm.stream_text(PROMPT, **SAMPLING)) == sampled.new_text
    assert tokenizer.decode(ids + sampled.new_token_ids) == sampled.text
    assert isinstance(padded_lm.generate_text(PROMPT, num_beams=3, max_new_tokens=8), str)
    choices = padded_lm.top_choices(PROMPT, steps=2, k=3)[0]["choices"]
    assert choices[0] == ("", pytest.approx(choices[0][1]))


def test_cli_generates_and_streams(padded_dir, capsys):
    for extra in ([], ["--stream"], ["--do-sample", "--seed", "3"]):
        assert cli.main(["generate", PROMPT, "--model", str(padded_dir), "--max-new-tokens", "12", *extra]) == 0
        out, err = capsys.readouterr()
        assert out.startswith(PROMPT) and "Traceback" not in err


@pytest.mark.slow
def test_saved_model_decodes_in_the_graph(padded_lm, tmp_path):
    import tensorflow_text  # noqa: F401  (the SentencePiece ops of the export's graph)

    model = tf.saved_model.load(str(export_saved_model(padded_lm, tmp_path / "saved", capacity=40, num_beams=2)))
    out = model.generate_text(tf.constant([PROMPT]), **SAMPLING)
    sequences = out["sequences"].numpy()[0]
    completion = out["completions"].numpy()[0].decode("utf-8")
    assert _padding_ids(sequences, padded_lm.tokenizer)
    expected = padded_lm.tokenizer.completion(
        padded_lm.tokenizer.encode(PROMPT), sequences[-24:], {padded_lm.config.eos_token_id}
    )
    assert completion == expected.new_text != ""


LITERT_RUN = """
import json, sys
from tfgen.litert import LiteRTLM
lm = LiteRTLM(sys.argv[1])
sampling = json.loads(sys.argv[3])
print(json.dumps({"greedy": lm.generate_text(sys.argv[2], max_new_tokens=8),
                  "sampled": lm.complete([sys.argv[2]], **sampling)[0][0].new_token_ids,
                  "text": lm.generate_text(sys.argv[2], return_full_text=False, **sampling),
                  "streamed": "".join(lm.stream_text(sys.argv[2], **sampling))}))
"""


@pytest.mark.slow
def test_litert_runtime_decodes(padded_lm, tmp_path):
    directory = export_litert(padded_lm, tmp_path / "litert", quantize="none", capacity=40)
    run = subprocess.run(
        [sys.executable, "-c", LITERT_RUN, str(directory), PROMPT, json.dumps(SAMPLING)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ids 1000 to 1063 have no token" in run.stderr  # warned once, on loading
    result = json.loads(run.stdout)
    assert result["greedy"] == PROMPT
    assert _padding_ids(result["sampled"], padded_lm.tokenizer)
    assert result["text"] == result["streamed"] == padded_lm.tokenizer.decode(result["sampled"])


@pytest.mark.slow
def test_server_answers_200(padded_dir, tmp_path):
    from test_serve import ServerProcess

    server = ServerProcess(padded_dir, tmp_path / "server.log", "--max-batch", "2")
    try:
        client = server.client()
        response = client.completions.create(
            model=padded_dir.name, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2
        )
        assert response.choices[0].text == "" and response.usage.completion_tokens == 12
        assert response.choices[0].logprobs.tokens == [""] * 12
        sampled = client.completions.create(model=padded_dir.name, prompt=PROMPT, max_tokens=24, seed=3)
        streamed = client.completions.create(model=padded_dir.name, prompt=PROMPT, max_tokens=24, seed=3, stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed) == sampled.choices[0].text != ""
    finally:
        server.stop()
