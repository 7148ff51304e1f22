"""The int4 LiteRT export: int4 weights that the no-TensorFlow runtime runs, scores near fp32's, clear errors."""

import json
import subprocess
import sys

import pytest

from test_litert import BLOCK_TENSORFLOW, CAPACITY, PROMPTS, TEXTS
from tfgen import cli, export_litert
from tfgen.litert import CONFIG_FILE, MODEL_FILE

# Blockwise int4 weights (32 per scale) raised the tiny model's perplexity by 2.4% and 4.7% on these texts (its rows
# are only two blocks of 64; ko-mini's validation perplexity moves less, see README, "LiteRT"): 10% leaves twice that
# for the kernels of other CPUs.
PERPLEXITY_TOLERANCE = 0.10

RUN_INT4 = (
    BLOCK_TENSORFLOW
    + """
import json
from tfgen.litert import LiteRTLM

lm, request = LiteRTLM(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({
    "scores": lm.score(request["texts"]),
    "greedy_text": lm.generate_text(request["prompts"], return_full_text=False, max_new_tokens=12),
    "tensorflow_loaded": "tensorflow" in sys.modules,
}))
"""
)


@pytest.fixture(scope="module")
def int4_export(tiny_lm, tmp_path_factory):
    return export_litert(tiny_lm, tmp_path_factory.mktemp("litert") / "int4", quantize="int4", capacity=CAPACITY)


def _tensor_types(path):
    """Each tensor's name and LiteRT type in the export's model."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    model = tfl_flatbuffer_utils.read_model((path / MODEL_FILE).read_bytes())
    names = {value: name for name, value in vars(schema.TensorType).items() if not name.startswith("_")}
    return [(bytes(t.name).decode(), names[t.type]) for graph in model.subgraphs for t in graph.tensors]


@pytest.mark.slow
def test_int4_export_runs_without_tensorflow_near_fp32(tiny_lm, int4_export, tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", RUN_INT4, str(int4_export), json.dumps({"texts": TEXTS, "prompts": PROMPTS})],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.splitlines()[-1])
    assert not results["tensorflow_loaded"]
    for text, int4, reference in zip(TEXTS, results["scores"], tiny_lm.score(TEXTS)):
        assert int4["tokens"] == reference["tokens"]
        assert abs(int4["perplexity"] / reference["perplexity"] - 1) < PERPLEXITY_TOLERANCE, text
    assert all(isinstance(text, str) and text for text in results["greedy_text"])


@pytest.mark.slow
def test_int4_export_holds_int4_matrices_and_its_config(int4_export):
    types = _tensor_types(int4_export)
    assert sum(kind == "INT4" for _, kind in types) >= 2 * 4 + 1  # two layers' four matrices and the LM head
    config = json.loads((int4_export / CONFIG_FILE).read_text())
    assert (config["quantize"], config["capacity"]) == ("int4", CAPACITY)


def test_bad_quantize_name_lists_the_choices(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="quantize must be one of int8, int4, fp16, none, got 'int3'"):
        export_litert(tiny_lm, tmp_path / "out", quantize="int3")
    assert not (tmp_path / "out").exists()


def test_int4_without_the_quantizer_names_the_install(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_quantizer", None)  # import raises ImportError
    assert (
        cli.main(["export", "--format", "litert", "--quantize", "int4", str(tiny_lm_dir), str(tmp_path / "out")])
        == cli.EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "tfgen[litert]"' in err and "ai-edge-quantizer" in err, err
    assert not (tmp_path / "out").exists()
