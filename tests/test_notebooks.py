"""The notebooks in notebooks/ run top to bottom against the tiny checkpoint, and do what they say.

Each notebook runs in its own Python process (so its TensorFlow state stays out of
the test process): every code cell in order, in one namespace, by plain `exec`
(no Jupyter needed; the notebooks have no IPython magics). The runner then
evaluates a few expressions in that namespace and writes them to JSON for the
checks. The two notebooks run at the same time to keep the wall time down.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ["01_generate.ipynb", "02_finetune.ipynb"]
TIMEOUT_S = 600

RUNNER = r"""
import json, sys

notebook, out_path, wanted = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with open(notebook, encoding="utf-8") as f:
    cells = json.load(f)["cells"]
namespace = {"__name__": "__main__"}
for number, cell in enumerate(cells):
    if cell["cell_type"] == "code":
        print(f"--- {notebook}: cell {number}", flush=True)
        exec(compile("".join(cell["source"]), f"{notebook} [cell {number}]", "exec"), namespace)
results = {name: eval(expression, namespace) for name, expression in wanted.items()}
with open(out_path, "w", encoding="utf-8") as f:
    json.dump(results, f, ensure_ascii=False)
"""

# What each run reports back: name -> expression evaluated in the notebook's namespace.
GENERATE_RESULTS = {
    "input_ids": "input_ids.tolist()",
    "attention_mask": "attention_mask.tolist()",
    "max_new_tokens": "MAX_NEW_TOKENS",
    "greedy_ids": "greedy_ids.numpy().tolist()",
    "greedy_text": "greedy_text",
    "beam_count": "int(beams.sequences.shape[0])",
    "sample_count": "len(sampled_texts)",
    "same_seed_same_samples": "bool((samples.numpy() == again.numpy()).all())",
    "prompts": "prompts",
    "batch_texts": "batch_texts",
    "table_prompt_and_first_choices": "[table[0]['input'], [row['choices'][0][0] for row in table]]",
}
FINETUNE_RESULTS = {
    "val_losses": "val_losses",
    "epochs": "EPOCHS",
    "total_steps": "total_steps",
    "counters": "tfgen.training.read_training_counters(OUTPUT_DIR / 'checkpoint')",
    "saved_files": "sorted(path.name for path in (OUTPUT_DIR / 'model').iterdir())",
    "reloaded_same_text": "reloaded.generate_text(PROMPT, max_new_tokens=30) == finetuned_text",
}


def _notebook(name):
    with open(NOTEBOOK_DIR / name, encoding="utf-8") as f:
        return json.load(f)


def test_notebooks_are_clean_and_plain_python():
    """Stored without outputs, nbformat 4, and every code cell is plain Python (no IPython magics)."""
    names = sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb"))
    assert set(NOTEBOOKS) <= set(names)
    for name in names:
        notebook = _notebook(name)
        assert notebook["nbformat"] == 4, name
        code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
        assert code, f"{name} has no code cells"
        for number, cell in enumerate(notebook["cells"]):
            where = f"{name} cell {number}"
            source = "".join(cell["source"])
            if cell["cell_type"] != "code":
                assert "outputs" not in cell, where
                continue
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{where} has stored output"
            for line in source.splitlines():
                assert not line.lstrip().startswith(("%", "!")), f"{where}: IPython magic or shell line {line!r}"
            compile(source, where, "exec")  # a SyntaxError names the cell


@pytest.fixture(scope="module")
def notebook_runs(tiny_lm_dir, ko_lines, tmp_path_factory):
    """Runs both notebooks at once against the tiny checkpoint; name -> (returncode, log, results or None)."""
    work = tmp_path_factory.mktemp("notebooks")
    train_file = work / "train.txt"
    # The tutorial's short story (the last lines of ko_lines): a few hundred short sentences.
    train_file.write_text("\n".join(ko_lines[-300:]) + "\n", encoding="utf-8")
    env = dict(
        os.environ,
        TFGEN_MODEL=str(tiny_lm_dir),
        TFGEN_TRAIN_FILE=str(train_file),
        TFGEN_NOTEBOOK_STEPS="12",
        TFGEN_LEARNING_RATE="1e-3",
        TFGEN_OUTPUT_DIR=str(work / "finetune"),
    )
    wanted = {"01_generate.ipynb": GENERATE_RESULTS, "02_finetune.ipynb": FINETUNE_RESULTS}
    running = {}
    for name in NOTEBOOKS:
        log = open(work / f"{name}.log", "w+", encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(Path("notebooks") / name), str(work / f"{name}.json"),
             json.dumps(wanted[name])],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        running[name] = (process, log)
    runs = {}
    for name, (process, log) in running.items():
        try:
            returncode = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        log.seek(0)
        output = log.read()
        log.close()
        results_path = work / f"{name}.json"
        results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else None
        runs[name] = (returncode, output, results)
    return runs


def _results(runs, name):
    returncode, output, results = runs[name]
    assert returncode == 0 and results is not None, f"{name} failed (exit {returncode}):\n{output[-6000:]}"
    return results


@pytest.mark.slow
def test_generate_notebook(notebook_runs, tiny_lm):
    results = _results(notebook_runs, "01_generate.ipynb")
    # The notebook's greedy output is what generate gives for the same checkpoint in this process.
    expected = tiny_lm.generate(
        results["input_ids"], results["attention_mask"], max_new_tokens=results["max_new_tokens"]
    ).numpy().tolist()
    assert results["greedy_ids"] == expected
    assert results["greedy_text"] == tiny_lm.tokenizer.decode(expected[0])
    assert results["beam_count"] == 3 and results["sample_count"] == 3
    assert results["same_seed_same_samples"]
    assert len(results["batch_texts"]) == len(results["prompts"])
    for prompt, text in zip(results["prompts"], results["batch_texts"]):
        assert text.startswith(prompt)
    # The step table follows the greedy path: its first choices are what top_choices gives here.
    prompt, first_choices = results["table_prompt_and_first_choices"]
    table = tiny_lm.top_choices(prompt, steps=len(first_choices), k=1)
    assert first_choices == [row["choices"][0][0] for row in table]


@pytest.mark.slow
def test_finetune_notebook(notebook_runs):
    results = _results(notebook_runs, "02_finetune.ipynb")
    val_losses = results["val_losses"]  # before training, then after each epoch
    assert len(val_losses) == results["epochs"] + 1
    assert val_losses[-1] < val_losses[0], val_losses
    assert results["counters"] == {"epoch": results["epochs"], "step": results["total_steps"]}
    assert {"config.json", "tf_model.h5", "model.safetensors", "tokenizer.model"} <= set(results["saved_files"])
    assert results["reloaded_same_text"]
