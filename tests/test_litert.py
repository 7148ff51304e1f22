"""The LiteRT export and its runtime: run where TensorFlow cannot be imported, GPT2LM's tokens, clear CLI errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfgen import cli, export_litert
from tfgen.litert import CONFIG_FILE, MODEL_FILE, LiteRTLM

PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때 😀", "대한민국의 수도는 서울이며, 가장 큰 도시이다"]
TEXTS = ["대한민국의 수도는 서울이다", "영화가 정말 재미있었어요"]
CAPACITY = 64
GREEDY = [dict(max_new_tokens=20), dict(max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2,
                                        min_new_tokens=5)]
SAMPLING = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=16)
# int8 weights (dynamic-range quantization) may move a perplexity by a few percent; the kernels differ by CPU
# (AVX2, AVX-512 VNNI, AMX), which moves it by far less than this.
PERPLEXITY_TOLERANCE = 0.10

# A fresh interpreter in which `import tensorflow` (and transformers, which would load it) raises ImportError.
BLOCK_TENSORFLOW = """
import importlib.abc, sys

class BlockTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "transformers", "tf_keras"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, BlockTensorFlow())
"""
RUN_EXPORTS = BLOCK_TENSORFLOW + """
import json
try:
    import tensorflow
    blocked = False
except ImportError:
    blocked = True
from tfgen.litert import LiteRTLM

fp32_dir, int8_dir, request = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
fp32, int8 = LiteRTLM(fp32_dir), LiteRTLM(int8_dir)
prompt_ids = [fp32.tokenizer.encode(p) for p in request["prompts"]]
sampling = request["sampling"]
print(json.dumps({
    "tensorflow_blocked": blocked,
    "greedy": [[fp32.generate([ids], **settings)[0].tolist() for ids in prompt_ids] for settings in request["greedy"]],
    "greedy_text": fp32.generate_text(request["prompts"], return_full_text=False, **request["greedy"][0]),
    "streamed": ["".join(fp32.stream_text(p, **request["greedy"][0])) for p in request["prompts"]],
    "sampled": [fp32.generate([ids], seed=5, num_return_sequences=3, return_dict_in_generate=True, output_scores=True,
                              **sampling)["sequences"].tolist() for ids in prompt_ids],
    "sampled_again": [fp32.generate([ids], seed=5, num_return_sequences=3, **sampling).tolist() for ids in prompt_ids],
    "scores": {"fp32": fp32.score(request["texts"]), "int8": int8.score(request["texts"])},
    "tensorflow_loaded": "tensorflow" in sys.modules,
}))
"""


@pytest.fixture(scope="module")
def exports(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("litert")
    return {quantize: export_litert(tiny_lm, root / quantize, quantize=quantize, capacity=CAPACITY)
            for quantize in ("none", "int8")}


@pytest.fixture(scope="module")
def runtime_results(exports, tmp_path_factory):
    request = {"prompts": PROMPTS, "texts": TEXTS, "greedy": GREEDY, "sampling": SAMPLING}
    run = subprocess.run([sys.executable, "-c", RUN_EXPORTS, str(exports["none"]), str(exports["int8"]),
                          json.dumps(request)], cwd=tmp_path_factory.mktemp("run"), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.slow
def test_the_runtime_works_where_tensorflow_cannot_be_imported(runtime_results):
    assert runtime_results["tensorflow_blocked"]
    assert not runtime_results["tensorflow_loaded"]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(GREEDY)))
def test_fp32_greedy_tokens_equal_gpt2lm_generate(tiny_lm, runtime_results, case):
    for prompt, tokens in zip(PROMPTS, runtime_results["greedy"][case]):
        expected = tiny_lm.generate([tiny_lm.tokenizer.encode(prompt)], **GREEDY[case]).numpy()[0].tolist()
        assert tokens == expected


@pytest.mark.slow
def test_text_and_stream_are_gpt2lm_generate_text(tiny_lm, runtime_results):
    expected = tiny_lm.generate_text(PROMPTS, return_full_text=False, **GREEDY[0])
    assert runtime_results["greedy_text"] == expected
    assert runtime_results["streamed"] == expected


@pytest.mark.slow
def test_int8_scores_stay_near_fp32_and_fp32_scores_are_gpt2lm_score(tiny_lm, runtime_results):
    fp32, int8 = runtime_results["scores"]["fp32"], runtime_results["scores"]["int8"]
    for text, a, b, reference in zip(TEXTS, fp32, int8, tiny_lm.score(TEXTS)):
        assert a["tokens"] == b["tokens"] == reference["tokens"]
        np.testing.assert_allclose(a["token_logprobs"], reference["token_logprobs"], rtol=1e-4, atol=1e-4)
        assert abs(b["perplexity"] / a["perplexity"] - 1) < PERPLEXITY_TOLERANCE, text


def _kept_set(logits, temperature, top_k, top_p):
    """transformers' top-k then top-p set of next-token ids, from float64 logits."""
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled)[:top_k]
    probs = np.exp(scaled[order] - scaled[order].max())
    probs /= probs.sum()
    mass_above = np.cumsum(probs) - probs
    return set(order[mass_above < top_p].tolist())


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_and_stays_in_the_top_k_top_p_set(tiny_lm, runtime_results):
    assert runtime_results["sampled"] == runtime_results["sampled_again"]
    distinct = set()
    for prompt, rows in zip(PROMPTS, runtime_results["sampled"]):
        width = len(tiny_lm.tokenizer.encode(prompt))
        for row in rows:
            distinct.add(tuple(row[width:]))
            for position in range(width, len(row)):
                if row[position - 1] == tiny_lm.config.eos_token_id:
                    break
                logits = tiny_lm(np.array([row[:position]], np.int32)).numpy()[0, -1]
                assert row[position] in _kept_set(logits, SAMPLING["temperature"], SAMPLING["top_k"],
                                                  SAMPLING["top_p"])
    assert len(distinct) > len(PROMPTS)  # the three draws per prompt are not all the same


@pytest.mark.slow
def test_int8_export_is_smaller_and_written_with_its_config(exports):
    sizes = {q: (path / MODEL_FILE).stat().st_size for q, path in exports.items()}
    assert sizes["int8"] < 0.6 * sizes["none"]  # tiny matrices: the graph and the float vectors weigh more here
    config = json.loads((exports["int8"] / CONFIG_FILE).read_text())
    assert (config["quantize"], config["capacity"]) == ("int8", CAPACITY)
    assert (exports["int8"] / "tokenizer.model").is_file()
    assert not [p.name for p in exports["int8"].parent.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.slow
def test_runtime_errors_name_the_fix(exports):
    lm = LiteRTLM(exports["int8"])
    with pytest.raises(ValueError, match="no beam search"):
        lm.generate_text("안녕", num_beams=2)
    with pytest.raises(ValueError, match=f"capacity of {CAPACITY} tokens"):
        lm.generate_text("안녕", max_new_tokens=CAPACITY)
    with pytest.raises(ValueError, match="top_p must be in"):
        lm.generate_text("안녕", do_sample=True, top_p=1.5)
    with pytest.raises(FileNotFoundError, match="tfgen export --format litert"):
        LiteRTLM(exports["int8"].parent)


@pytest.mark.slow
def test_cli_exports_and_generate_runs_the_export_without_tensorflow(tiny_lm, tiny_lm_dir, tmp_path, capsys):
    output = tmp_path / "cli-export"
    assert cli.main(["export", "--format", "litert", "--quantize", "none", "--capacity", str(CAPACITY),
                     str(tiny_lm_dir), str(output)]) == 0
    assert "LiteRT model, none weights; capacity 64 tokens" in capsys.readouterr().out
    script = BLOCK_TENSORFLOW + "from tfgen.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", script, "generate", "--model", str(output), "--max-new-tokens", "12",
                          "--json", PROMPTS[1]], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["completions"] == [tiny_lm.generate_text(PROMPTS[1], return_full_text=False, max_new_tokens=12)]


@pytest.mark.parametrize("arguments, message", [
    (["--format", "litert", "--quantize", "int2"], "invalid choice: 'int2'"),
    (["--format", "tflite"], "invalid choice: 'tflite'"),
    (["--quantize", "int8"], "--quantize is for --format litert"),
    (["--format", "litert", "--num-beams", "4"], "--num-beams is for --format saved_model"),
    (["--format", "litert", "--capacity", "4096"], "capacity must be an integer from 2 to the model's context of 128"),
])
def test_cli_export_bad_input_is_one_line_and_exit_2(tiny_lm_dir, tmp_path, capsys, arguments, message):
    assert cli.main(["export", *arguments, str(tiny_lm_dir), str(tmp_path / "out")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
