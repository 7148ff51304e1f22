"""The `tfgen` command line: JSON output and one-line errors with exit code 2."""

import io
import json
import math
import subprocess
import sys

import pytest

from tfgen.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_matches_the_python_api(tiny_lm, tiny_lm_dir, capsys):
    prompts = ["안녕하세요", "근육이 커지기 위해서는"]
    code, out, err = _run(capsys, "generate", *prompts, "--model", str(tiny_lm_dir), "--max-new-tokens", "12", "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    expected = tiny_lm.complete(prompts, max_new_tokens=12)
    for record, completions in zip(records, expected):
        assert record["completions"] == [c.new_text for c in completions]
        assert record["token_ids"] == [c.new_token_ids for c in completions]
        assert 1 <= len(record["token_ids"][0]) <= 12


def test_sampling_several_sequences_from_stdin(tiny_lm_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("이때\n안녕하세요\n".encode())))
    argv = [
        "generate",
        "--model",
        str(tiny_lm_dir),
        "--max-new-tokens",
        "6",
        "--do-sample",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--temperature",
        "0.8",
        "--num-return-sequences",
        "2",
        "--seed",
        "3",
        "--json",
    ]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == ["이때", "안녕하세요"]
    assert all(len(r["completions"]) == 2 for r in records)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("이때\n안녕하세요\n".encode())))
    assert _run(capsys, *argv)[1] == out  # the same seed gives the same text


def test_plain_output_prints_the_full_text(tiny_lm_dir, capsys):
    code, out, _ = _run(capsys, "generate", "안녕하세요", "--model", str(tiny_lm_dir), "--max-new-tokens", "5")
    assert code == 0 and out.startswith("안녕하세요") and len(out.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["", "--max-new-tokens", "5"], "prompt 1 is empty"),
        (["가 " * 200, "--max-new-tokens", "5"], "exceeds the model's context"),
        (["이때", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["이때", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["이때", "--do-sample", "--temperature", "0"], "temperature must be > 0"),
        (["이때", "--top-k", "-1"], "top_k must be a non-negative integer"),
        (["이때", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
        (["이때", "--num-return-sequences", "2"], "needs do_sample=True"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_lm_dir, capsys, args, message):
    code, out, err = _run(capsys, "generate", *args[:1], "--model", str(tiny_lm_dir), *args[1:])
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("tfgen: error:")


def test_missing_model_path(tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "이때", "--model", str(tmp_path / "missing"))
    assert code == 2 and "no model directory" in err and err.count("\n") == 1


def test_unknown_option_is_a_one_line_usage_error(capsys):
    code, _, err = _run(capsys, "generate", "이때", "--top-kk", "3")
    assert code == 2 and err.count("\n") == 1 and "--top-kk" in err


@pytest.mark.slow
def test_non_utf8_stdin_in_a_real_process(tiny_lm_dir):
    result = subprocess.run(
        [sys.executable, "-m", "tfgen", "generate", "--model", str(tiny_lm_dir)],
        input="이때\n".encode("euc-kr"),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 2
    err = result.stderr.decode()
    assert "standard input is not UTF-8" in err and "Traceback" not in err and err.count("\n") == 1


def test_beam_flags_reach_generate(tiny_lm, tiny_lm_dir, capsys):
    prompts = ["안녕하세요", "근육이 커지기 위해서는"]
    code, out, err = _run(
        capsys,
        "generate",
        *prompts,
        "--model",
        str(tiny_lm_dir),
        "--max-new-tokens",
        "8",
        "--num-beams",
        "3",
        "--num-return-sequences",
        "2",
        "--no-repeat-ngram-size",
        "2",
        "--early-stopping",
        "true",
        "--json",
    )
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    expected = tiny_lm.complete(
        prompts, max_new_tokens=8, num_beams=3, num_return_sequences=2, no_repeat_ngram_size=2, early_stopping=True
    )
    for record, completions in zip(records, expected, strict=True):
        assert len(record["completions"]) == 2
        assert record["token_ids"] == [c.new_token_ids for c in completions]
    assert expected != tiny_lm.complete(prompts, max_new_tokens=8)  # the flags changed the result


def test_score_json_matches_the_python_api(tiny_lm, tiny_lm_dir, capsys, monkeypatch):
    texts = ["안녕하세요", "근육이 커지기 위해서는"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(texts).encode())))
    code, out, err = _run(capsys, "score", "--model", str(tiny_lm_dir), "--json")
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == [
        {"text": text, **result} for text, result in zip(texts, tiny_lm.score(texts))
    ]


def test_score_a_text_longer_than_the_context_with_a_stride(tiny_lm, tiny_lm_dir, long_text, capsys):
    code, out, err = _run(capsys, "score", long_text, "--model", str(tiny_lm_dir), "--stride", "100", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert len(record["tokens"]) > tiny_lm.net.context
    assert record == {"text": long_text, **tiny_lm.score(long_text, stride=100)}


def test_score_readable_output(tiny_lm, tiny_lm_dir, capsys):
    code, out, err = _run(capsys, "score", "안녕하세요", "--model", str(tiny_lm_dir))
    assert code == 0, err
    result = tiny_lm.score("안녕하세요")
    lines = out.splitlines()
    assert lines[0] == f"안녕하세요\tperplexity {result['perplexity']:.4f}"
    assert len(lines) == 1 + len(result["tokens"])
    token, probability = lines[2].split()
    assert token == result["tokens"][1].replace(" ", "▁")
    assert float(probability) == pytest.approx(math.exp(result["token_logprobs"][0]), abs=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "이때", "--num-beams", "0"], "num_beams must be a positive integer"),
        (["generate", "이때", "--num-beams", "2", "--num-return-sequences", "3"], "must be at most num_beams (2)"),
        (["generate", "이때", "--early-stopping", "maybe"], "invalid choice: 'maybe'"),
        (["generate", "이때", "--no-repeat-ngram-size", "-1"], "no_repeat_ngram_size must be an integer"),
        (["generate", "이때", "--min-new-tokens", "-2"], "min_new_tokens must be a non-negative integer"),
        (["score", ""], "text 1 is empty"),
        (["score", "가 " * 200, "--stride", "128"], "stride must be an integer from 1 to 127"),
        (["score", "가 " * 200, "--stride", "0"], "argument --stride: must be a positive integer, got 0"),
        (["score", "가 " * 200, "--stride", "half"], "argument --stride: invalid integer value: 'half'"),
    ],
)
def test_bad_beam_and_score_input_exits_2_with_one_line(tiny_lm_dir, capsys, args, message):
    code, out, err = _run(capsys, *args, "--model", str(tiny_lm_dir))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("tfgen: error:")
