"""The LiteRT export and its runtime: run where TensorFlow cannot be imported, GPT2LM's tokens, clear CLI errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfgen import cli, export_litert, scoring
from tfgen.litert import CONFIG_FILE, MODEL_FILE, LiteRTLM

PROMPTS = ["안녕하세요", "근육이 커지기 위해서는", "이때 😀", "대한민국의 수도는 서울이며, 가장 큰 도시이다"]
TEXTS = ["대한민국의 수도는 서울이다", "영화가 정말 재미있었어요"]
STRIDES = [None, 40]  # for a text of three contexts, in windows of the export's capacity
CAPACITY = 64
GREEDY = [
    dict(max_new_tokens=20),
    dict(max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5),
    dict(max_new_tokens=20, presence_penalty=0.8, frequency_penalty=1.5),
]
SAMPLING = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=16)
ROWS = 4  # the export's row tiers: 1, 2, 4
# Rows of one batch, each with its own settings (serving.protocol.Sampling fields).
ROW_SAMPLINGS = [
    dict(max_tokens=12),
    dict(max_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=2, min_tokens=5),
    dict(max_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7),
    dict(max_tokens=9, do_sample=True, temperature=1.2, top_p=0.7, seed=8),
]
STEP_TOKENS = 3
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
RUN_EXPORTS = (
    BLOCK_TENSORFLOW
    + """
import json
try:
    import tensorflow
    blocked = False
except ImportError:
    blocked = True
from tfgen.litert import LiteRTLM

from tfgen.serving.protocol import Sampling

fp32_dir, int8_dir, request = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
fp32, int8 = LiteRTLM(fp32_dir), LiteRTLM(int8_dir)
prompt_ids = [fp32.tokenizer.encode(p) for p in request["prompts"]]
sampling = request["sampling"]
width = max(len(ids) for ids in prompt_ids)
left_padded = [[0] * (width - len(ids)) + ids for ids in prompt_ids]
mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids]
row_samplings = [Sampling(**{**dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                                    no_repeat_ngram_size=0, min_tokens=0), **s}) for s in request["row_samplings"]]


def run_rows(schedule, eos_ids=(fp32.config["eos_token_id"],), frees=()):
    # Drives a LiteRTRows as the scheduler does: each (call, slot, row) of `schedule` starts prompt `row` with its
    # sampling in `slot` before step call `call`, each (call, slot) of `frees` frees a row before a call; a row done
    # (EOS or max_tokens) is freed. Per schedule entry, its steps' [ids, reached_eos].
    rows, steps, active, call = fp32.decode_rows(eos_ids=eos_ids), {}, {}, 0
    while len(steps) < len(schedule) or active:
        for at, slot in frees:
            if at == call and slot in active:
                rows.free_row(slot)
                del active[slot]
        starts = []
        for entry, (at, slot, row) in enumerate(schedule):
            if at == call:
                active[slot], steps[entry] = entry, []
                starts.append((slot, prompt_ids[row], row_samplings[row]))
        if starts:
            rows.start_rows(starts)
        for slot, (ids, reached_eos) in rows.step(request["k"]).items():
            entry = active[slot]
            steps[entry].append([ids, reached_eos])
            if reached_eos or sum(len(i) for i, _ in steps[entry]) == row_samplings[schedule[entry][2]].max_tokens:
                rows.free_row(slot)
                del active[slot]
        call += 1
    return [steps[entry] for entry in range(len(schedule))]


alone = [run_rows([(0, 0, row)])[0] for row in range(len(row_samplings))]
eos = alone[0][0][0][1]  # the second greedy token of row 0: its EOS in the EOS case
print(json.dumps({
    "tensorflow_blocked": blocked,
    "greedy": [[fp32.generate([ids], **settings)[0].tolist() for ids in prompt_ids] for settings in request["greedy"]],
    "greedy_text": fp32.generate_text(request["prompts"], return_full_text=False, **request["greedy"][0]),
    "streamed": ["".join(fp32.stream_text(p, **request["greedy"][0])) for p in request["prompts"]],
    "sampled": [fp32.generate([ids], seed=5, num_return_sequences=3, return_dict_in_generate=True, output_scores=True,
                              **sampling)["sequences"].tolist() for ids in prompt_ids],
    "sampled_again": [fp32.generate([ids], seed=5, num_return_sequences=3, **sampling).tolist() for ids in prompt_ids],
    "scores": {"fp32": fp32.score(request["texts"]), "int8": int8.score(request["texts"])},
    "long_scores": [fp32.score(request["long_text"], stride=stride) for stride in request["strides"]],
    "ragged_greedy": fp32.generate(left_padded, attention_mask=mask, **request["greedy"][1]).tolist(),
    "ragged_sampled": fp32.generate(prompt_ids, seed=5, num_return_sequences=2, **sampling).tolist(),
    "rows_alone": alone,
    "rows_together": run_rows([(0, slot, slot) for slot in range(len(row_samplings))]),
    "rows_joining": run_rows([(0, 0, 0), (0, 1, 1), (1, 3, 3), (2, 2, 2), (4, 1, 2)], frees=[(3, 1)]),
    "rows_eos": [eos, run_rows([(0, 0, 0)], eos_ids=(eos,))[0]],
    "tensorflow_loaded": "tensorflow" in sys.modules,
}))
"""
)


@pytest.fixture(scope="module")
def exports(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("litert")
    return {
        quantize: export_litert(tiny_lm, root / quantize, quantize=quantize, capacity=CAPACITY, rows=ROWS)
        for quantize in ("none", "int8")
    }


@pytest.fixture(scope="module")
def runtime_results(exports, long_text, tmp_path_factory):
    request = {
        "prompts": PROMPTS,
        "texts": TEXTS,
        "greedy": GREEDY,
        "sampling": SAMPLING,
        "long_text": long_text,
        "strides": STRIDES,
        "row_samplings": ROW_SAMPLINGS,
        "k": STEP_TOKENS,
    }
    run = subprocess.run(
        [sys.executable, "-c", RUN_EXPORTS, str(exports["none"]), str(exports["int8"]), json.dumps(request)],
        cwd=tmp_path_factory.mktemp("run"),
        capture_output=True,
        text=True,
        timeout=600,
    )
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


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(STRIDES)))
def test_fp32_strided_score_of_a_long_text_is_gpt2lm_on_the_capacity_windows(tiny_lm, long_text, runtime_results, case):
    # The export scores in windows of its capacity (its cache's columns), not of the model's context.
    result, ids = runtime_results["long_scores"][case], tiny_lm.tokenizer.encode(long_text)
    assert len(ids) >= 3 * tiny_lm.net.context and CAPACITY < tiny_lm.net.context
    expected = [
        scoring.next_token_logprobs(tiny_lm(np.array([ids[begin:end]])), np.array([ids[begin:end]]))[0, -scored:]
        for begin, end, scored in scoring.windows(len(ids), CAPACITY, STRIDES[case])
    ]
    np.testing.assert_allclose(result["token_logprobs"], np.concatenate(expected), rtol=1e-4, atol=1e-4)


def _kept_set(logits, temperature, top_k, top_p):
    """transformers' top-k then top-p set of next-token ids, from float64 logits."""
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled)[:top_k]
    probs = np.exp(scaled[order] - scaled[order].max())
    probs /= probs.sum()
    mass_above = np.cumsum(probs) - probs
    return set(order[mass_above < top_p].tolist())


def _assert_in_kept_sets(tiny_lm, prompt, new):
    """Every new token up to EOS lies in the top-k / top-p set of SAMPLING after the tokens before it."""
    row = list(prompt) + list(new)
    for position in range(len(prompt), len(row)):
        if row[position - 1] == tiny_lm.config.eos_token_id:
            break
        logits = tiny_lm(np.array([row[:position]], np.int32)).numpy()[0, -1]
        assert row[position] in _kept_set(logits, SAMPLING["temperature"], SAMPLING["top_k"], SAMPLING["top_p"])


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_and_stays_in_the_top_k_top_p_set(tiny_lm, runtime_results):
    assert runtime_results["sampled"] == runtime_results["sampled_again"]
    distinct = set()
    for prompt, rows in zip(PROMPTS, runtime_results["sampled"]):
        width = len(tiny_lm.tokenizer.encode(prompt))
        for row in rows:
            distinct.add(tuple(row[width:]))
            _assert_in_kept_sets(tiny_lm, row[:width], row[width:])
    assert len(distinct) > len(PROMPTS)  # the three draws per prompt are not all the same


def _left_padded(tiny_lm):
    prompt_ids = [tiny_lm.tokenizer.encode(p) for p in PROMPTS]
    width = max(len(ids) for ids in prompt_ids)
    return (
        [[0] * (width - len(ids)) + ids for ids in prompt_ids],
        [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids],
    )


@pytest.mark.slow
def test_a_ragged_batch_decodes_together_as_gpt2lm_generate(tiny_lm, runtime_results):
    input_ids, mask = _left_padded(tiny_lm)
    expected = tiny_lm.generate(input_ids, attention_mask=mask, **GREEDY[1]).numpy().tolist()
    assert runtime_results["ragged_greedy"] == expected


@pytest.mark.slow
def test_sampled_rows_of_a_ragged_batch_are_those_of_their_prompt_alone(tiny_lm, runtime_results):
    prompt_ids = [tiny_lm.tokenizer.encode(p) for p in PROMPTS]
    width = max(len(ids) for ids in prompt_ids)
    rows = runtime_results["ragged_sampled"]
    # The first prompt's rows have the seeds of its rows alone (protocol.choice_seed of the seed and the row).
    assert [row[width:] for row in rows[:2]] == [row[len(prompt_ids[0]) :] for row in runtime_results["sampled"][0][:2]]
    for i, row in enumerate(rows):
        _assert_in_kept_sets(tiny_lm, prompt_ids[i // 2], row[width:])


def _tokens(steps):
    """A rows run's tokens, each step's ids at most STEP_TOKENS."""
    assert all(len(ids) <= STEP_TOKENS for ids, _ in steps)
    return [token for ids, _ in steps for token in ids]


@pytest.mark.slow
def test_rows_alone_are_gpt2lm_generate(tiny_lm, runtime_results):
    for row, settings in ((0, GREEDY[0]), (1, GREEDY[1])):
        prompt = tiny_lm.tokenizer.encode(PROMPTS[row])
        expected = tiny_lm.generate([prompt], **{**settings, "max_new_tokens": 12}).numpy()[0, len(prompt) :]
        tokens = _tokens(runtime_results["rows_alone"][row])
        assert tokens == expected.tolist()[: len(tokens)]
        assert len(tokens) == 12 or tokens[-1] == tiny_lm.config.eos_token_id


@pytest.mark.slow
def test_rows_with_their_own_settings_decode_together_as_alone(runtime_results):
    alone = [_tokens(steps) for steps in runtime_results["rows_alone"]]
    assert [_tokens(steps) for steps in runtime_results["rows_together"]] == alone


@pytest.mark.slow
def test_rows_that_join_mid_way_or_are_freed_decode_as_alone(runtime_results):
    alone = [_tokens(steps) for steps in runtime_results["rows_alone"]]
    joining = [_tokens(steps) for steps in runtime_results["rows_joining"]]
    rows = [0, 1, 3, 2, 2]  # the test's schedule: row 1 (slot 1) is freed after 3 steps, row 2 runs again in slot 1
    assert [joining[e] for e in (0, 2, 3, 4)] == [alone[rows[e]] for e in (0, 2, 3, 4)]
    assert joining[1] == alone[1][: len(joining[1])] and len(joining[1]) <= 3 * STEP_TOKENS


@pytest.mark.slow
def test_a_row_stops_at_eos(runtime_results):
    eos, steps = runtime_results["rows_eos"]
    alone = _tokens(runtime_results["rows_alone"][0])
    assert _tokens(steps) == alone[: alone.index(eos) + 1]
    assert [reached for _, reached in steps] == [False] * (len(steps) - 1) + [True]


@pytest.mark.slow
def test_int8_export_is_smaller_and_written_with_its_config(exports):
    sizes = {q: (path / MODEL_FILE).stat().st_size for q, path in exports.items()}
    assert sizes["int8"] < 0.75 * sizes["none"]  # tiny matrices: the graphs of the signatures weigh more here
    config = json.loads((exports["int8"] / CONFIG_FILE).read_text())
    assert (config["quantize"], config["capacity"], config["row_tiers"]) == ("int8", CAPACITY, [1, 2, 4])
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
    with pytest.raises(ValueError, match="stride must be an integer from 1 to 63 .less than the export's capacity"):
        lm.score("가 " * 200, stride=64)
    with pytest.raises(FileNotFoundError, match="tfgen export --format litert"):
        LiteRTLM(exports["int8"].parent)


@pytest.mark.slow
def test_cli_exports_and_generate_runs_the_export_without_tensorflow(tiny_lm, tiny_lm_dir, tmp_path, capsys):
    output = tmp_path / "cli-export"
    assert (
        cli.main(
            [
                "export",
                "--format",
                "litert",
                "--quantize",
                "none",
                "--capacity",
                str(CAPACITY),
                str(tiny_lm_dir),
                str(output),
            ]
        )
        == 0
    )
    assert "LiteRT model, none weights; capacity 64 tokens" in capsys.readouterr().out
    script = BLOCK_TENSORFLOW + "from tfgen.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "generate",
            "--model",
            str(output),
            "--max-new-tokens",
            "12",
            "--json",
            PROMPTS[1],
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["completions"] == [tiny_lm.generate_text(PROMPTS[1], return_full_text=False, max_new_tokens=12)]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--format", "litert", "--quantize", "int2"], "invalid choice: 'int2'"),
        (["--format", "tflite"], "invalid choice: 'tflite'"),
        (["--quantize", "int8"], "--quantize is for --format litert"),
        (["--format", "litert", "--num-beams", "4"], "--num-beams is for --format saved_model"),
        (
            ["--format", "litert", "--capacity", "4096"],
            "capacity must be an integer from 2 to the model's context of 128",
        ),
    ],
)
def test_cli_export_bad_input_is_one_line_and_exit_2(tiny_lm_dir, tmp_path, capsys, arguments, message):
    assert cli.main(["export", *arguments, str(tiny_lm_dir), str(tmp_path / "out")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
