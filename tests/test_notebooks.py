"""The notebooks in notebooks/ run top to bottom in a Jupyter kernel, do what they say, and are saved with
the outputs that the current code gives.

CI executes every notebook with nbclient in its own IPython kernel, as Jupyter runs it, on the embedded model
ko-mini (or $TFGEN_MODEL), the four at once; a cell that raises fails the notebook's test. The fine-tuning
notebook's run is shortened through TFGEN_NOTEBOOK_STEPS, every cell still runs. After a notebook's own
cells, one more cell prints a few values from its namespace as JSON for the checks below, which compare them
with what tfgen gives in this process.

The notebooks are committed with their outputs, so that they read on GitHub. Outputs of cells tagged
`varies` depend on the shortened run or on timing; those tagged `sampled` show seeded sampling, which repeats
on one machine and versions but not across CPUs (other float kernels change the logits' last bits, and a draw
near a boundary of the cumulative distribution then goes the other way). Both kinds run and must not raise;
every other cell (greedy, beams, probabilities rounded as printed, errors) must print exactly what it printed
when the notebook was saved (test_saved_outputs_are_current). After changing tfgen or a notebook, refresh them:

    python tests/test_notebooks.py [NAME.ipynb ...]    # executes in place, one at a time, full length
"""

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = [
    "01_decoding_strategies.ipynb",
    "02_token_probabilities.ipynb",
    "03_finetuning.ipynb",
    "04_export_and_serve.ipynb",
]
CELL_TIMEOUT_S = 600
CI_STEPS = "12"  # fine-tuning steps under CI (the saved notebook ran the default)
VARIES = "varies"  # cell tag: output depends on the run's length or on timing
SAMPLED = "sampled"  # cell tag: output shows seeded samples, which depend on the CPU's float kernels
PROBE_MARK = "TFGEN_NOTEBOOK_RESULTS "


def _model_name():
    return os.environ.get("TFGEN_MODEL", "ko-mini")


def _on_embedded_model():
    return _model_name() == "ko-mini"


def execute(name, env=None, wanted=None):
    """Runs a notebook in a fresh python3 kernel, cwd notebooks/; returns (notebook, results of `wanted`).

    `wanted` maps names to expressions evaluated in the notebook's namespace after its last cell.
    Raises nbclient's CellExecutionError (with the cell's traceback) when a cell fails.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    if wanted:
        probe = (
            "import json\nprint("
            + repr(PROBE_MARK)
            + " + json.dumps({"
            + ", ".join(f"{key!r}: {expression}" for key, expression in wanted.items())
            + "}, ensure_ascii=False))"
        )
        notebook.cells.append(nbformat.v4.new_code_cell(probe))
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    # debugpy (in ipykernel) warns about frozen modules on Python 3.11 unless told not to.
    client.execute(env={**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1", **(env or {})})
    results = None
    if wanted:
        probe_cell = notebook.cells.pop()
        text = "".join(output.get("text", "") for output in probe_cell.outputs if output.output_type == "stream")
        results = json.loads(text.split(PROBE_MARK, 1)[1])
    return notebook, results


def _read(name):
    import nbformat

    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def text_outputs(cell):
    """What a cell printed and displayed, images left out: (stdout, [each display's other mime types])."""
    stdout = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
    shown = [
        {mime: data for mime, data in o.data.items() if not mime.startswith("image/")}
        for o in cell.outputs
        if o.output_type in ("execute_result", "display_data")
    ]
    return stdout, shown


# --- the saved notebooks ---


def test_saved_notebooks_ran_top_to_bottom_without_errors():
    """Every notebook is listed here, nbformat 4, saved from one in-order run with no error, plain Python."""
    assert sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        notebook = _read(name)
        assert notebook.nbformat == 4, name
        cells = _code_cells(notebook)
        assert cells, f"{name} has no code cells"
        assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), (
            f"{name} was not saved from one top-to-bottom run: python tests/test_notebooks.py {name}"
        )
        for number, cell in enumerate(notebook.cells):
            where = f"{name} cell {number}"
            if cell.cell_type != "code":
                continue
            assert not [o for o in cell.outputs if o.output_type == "error"], f"{where} saved an error"
            for line in cell.source.splitlines():
                assert not line.lstrip().startswith(("%", "!")), f"{where}: IPython magic or shell line {line!r}"
            compile(cell.source, where, "exec")  # a SyntaxError names the cell
    for name in ["02_token_probabilities.ipynb", "03_finetuning.ipynb"]:
        images = [o for cell in _code_cells(_read(name)) for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"{name} saved no plots"


# --- executing them ---

DECODING_RESULTS = {
    "input_ids": "input_ids.tolist()",
    "attention_mask": "attention_mask.tolist()",
    "greedy_ids": "greedy_ids.numpy().tolist()",
    "one_beam_is_greedy": "bool((one_beam_ids.numpy() == greedy_ids.numpy()).all())",
    "top1_is_greedy": "bool((top1_ids.numpy() == greedy_ids.numpy()).all())",
    "near_zero_top_p_is_greedy": "bool((near_zero_ids.numpy() == greedy_ids.numpy()).all())",
    "same_seed_same_samples": "bool((samples.numpy() == again.numpy()).all())",
    "beam_rows": "int(beams.sequences.shape[0])",
    "beam_scores": "beams.sequences_scores.numpy().tolist()",
    "sampled_rows": "int(sampled.shape[0])",
    "prompts": "prompts",
    "batch_texts": "batch_texts",
    "recompilations": "lm.decoder.trace_count - traces_before",
}
PROBABILITY_RESULTS = {
    "prompt": "prompt",
    "manual_forward_matches": "bool(np.allclose(logits, lm(input_ids, attention_mask), atol=1e-4))",
    "sentence": "sentence",
    "score": "result",
    "table": "table",
}
FINETUNING_RESULTS = {
    "val_losses": "val_losses",
    "epochs": "EPOCHS",
    "total_steps": "total_steps",
    "step_losses": "len(step_losses.losses)",
    "counters": "tfgen.training.read_training_counters(OUTPUT_DIR / 'checkpoint')",
    "saved_files": "sorted(path.name for path in (OUTPUT_DIR / 'model').iterdir())",
    "reloaded_same_text": "reloaded.generate_text(PROMPTS[0], **GREEDY) == finetuned_text",
}
EXPORT_RESULTS = {
    "requests": "sorted(served)",
    "same_as_in_process": "{name: result['completions'] == in_process[name] for name, result in served.items()}",
}
WANTED = {
    "01_decoding_strategies.ipynb": DECODING_RESULTS,
    "02_token_probabilities.ipynb": PROBABILITY_RESULTS,
    "03_finetuning.ipynb": FINETUNING_RESULTS,
    "04_export_and_serve.ipynb": EXPORT_RESULTS,
}


@pytest.fixture(scope="module")
def lm():
    import tfgen

    if not _on_embedded_model() or tfgen.default_model_path().is_dir():
        return tfgen.GPT2LM.from_pretrained(_model_name())
    pytest.skip(f"the embedded model is not at {tfgen.default_model_path()} (or set TFGEN_MODEL)")


@pytest.fixture(scope="module")
def notebook_runs(lm, tmp_path_factory):
    """Executes the four notebooks at once; name -> (executed notebook, results) or the failure's text."""
    work = tmp_path_factory.mktemp("notebooks")
    env = {"TFGEN_MODEL": _model_name(), "TFGEN_NOTEBOOK_STEPS": CI_STEPS, "TFGEN_OUTPUT_DIR": str(work)}

    def run(name):
        try:
            return execute(name, env, WANTED[name])
        except Exception as error:  # CellExecutionError carries the failing cell and its traceback
            return f"{type(error).__name__}: {error}"

    with ThreadPoolExecutor(len(NOTEBOOKS)) as pool:
        return dict(zip(NOTEBOOKS, pool.map(run, NOTEBOOKS)))


def _run(runs, name):
    run = runs[name]
    assert not isinstance(run, str), f"{name} failed:\n{run[-6000:]}"
    return run


@pytest.mark.slow
def test_decoding_strategies_notebook(notebook_runs, lm):
    _, results = _run(notebook_runs, "01_decoding_strategies.ipynb")
    # The notebook's greedy ids are what generate gives for the same checkpoint in this process.
    expected = (
        lm.generate(results["input_ids"], results["attention_mask"], do_sample=False, min_length=10, max_length=50)
        .numpy()
        .tolist()
    )
    assert results["greedy_ids"] == expected
    assert results["one_beam_is_greedy"] and results["top1_is_greedy"] and results["near_zero_top_p_is_greedy"]
    assert results["same_seed_same_samples"]
    assert results["beam_rows"] == 5 and results["beam_scores"] == sorted(results["beam_scores"], reverse=True)
    assert results["sampled_rows"] == 3
    # Left-padded in one batch, each prompt gets what it gets alone.
    assert results["batch_texts"] == [
        lm.generate_text(prompt, max_new_tokens=30, no_repeat_ngram_size=3) for prompt in results["prompts"]
    ]
    assert results["recompilations"] == 0


@pytest.mark.slow
def test_token_probabilities_notebook(notebook_runs, lm):
    _, results = _run(notebook_runs, "02_token_probabilities.ipynb")
    assert results["manual_forward_matches"]
    expected = lm.score(results["sentence"])
    assert results["score"]["tokens"] == expected["tokens"]
    assert results["score"]["logprob"] == pytest.approx(expected["logprob"], abs=1e-3)
    # The step table is top_choices' in this process: the same tokens, the same probabilities.
    table = results["table"]
    expected = lm.top_choices(results["prompt"], steps=len(table), k=5)
    assert [row["input"] for row in table] == [row["input"] for row in expected]
    for row, want in zip(table, expected):
        assert [token for token, _ in row["choices"]] == [token for token, _ in want["choices"]]
        assert [p for _, p in row["choices"]] == pytest.approx([p for _, p in want["choices"]], abs=1e-5)


@pytest.mark.slow
def test_finetuning_notebook(notebook_runs):
    _, results = _run(notebook_runs, "03_finetuning.ipynb")
    val_losses = results["val_losses"]  # before training, then after each epoch
    assert len(val_losses) == results["epochs"] + 1
    assert val_losses[-1] < val_losses[0], val_losses
    assert results["step_losses"] == results["total_steps"]
    assert results["counters"] == {"epoch": results["epochs"], "step": results["total_steps"]}
    assert {"config.json", "tf_model.h5", "model.safetensors", "tokenizer.model"} <= set(results["saved_files"])
    assert results["reloaded_same_text"]


@pytest.mark.slow
def test_export_and_serve_notebook(notebook_runs):
    _, results = _run(notebook_runs, "04_export_and_serve.ipynb")
    # A process that cannot import tfgen served what GPT2LM.generate_text gives: greedy, seeded sampling, beams.
    assert results["requests"] == ["beam search", "greedy", "sampling", "sampling, other settings"]
    assert results["same_as_in_process"] == {name: True for name in results["requests"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_outputs_are_current(notebook_runs, name):
    """Each cell not tagged `varies` or `sampled` prints and displays now what the saved notebook shows."""
    if not _on_embedded_model():
        pytest.skip("the saved outputs are the embedded model's")
    executed, _ = _run(notebook_runs, name)
    saved = _read(name)
    assert [cell.source for cell in _code_cells(executed)] == [cell.source for cell in _code_cells(saved)]
    for number, (now, then) in enumerate(zip(_code_cells(executed), _code_cells(saved)), start=1):
        if {VARIES, SAMPLED} & set(then.metadata.get("tags", [])):
            continue
        assert text_outputs(now) == text_outputs(then), (
            f"{name} code cell {number} prints something else now; refresh the notebook: "
            f"python tests/test_notebooks.py {name}\n--- saved:\n{text_outputs(then)[0][-1500:]}\n"
            f"--- now:\n{text_outputs(now)[0][-1500:]}"
        )


def main(names):
    """Executes the notebooks in place, one at a time (so that timings are not shared), full length.

    Their files go to notebooks/outputs/ (the default, so that the saved outputs show short paths),
    removed afterwards unless it was there before.
    """
    import nbformat

    outputs = NOTEBOOK_DIR / "outputs"
    keep = outputs.exists()
    try:
        for name in names or NOTEBOOKS:
            print(f"executing {name} on {_model_name()}", flush=True)
            notebook, _ = execute(name, {"TFGEN_OUTPUT_DIR": "outputs", "TFGEN_NOTEBOOK_STEPS": ""})
            nbformat.write(notebook, NOTEBOOK_DIR / name)
    finally:
        if not keep:
            shutil.rmtree(outputs, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
