"""The compile cache (tfgen._env, tfgen.generation.program_store): where it goes, and a second process loading what
the first traced and compiled."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfgen import __version__
from tfgen._env import compile_cache_directory, program_store_directory

# Builds a random GPT-2 of the given width in a fresh process, generates once, prints the programs it made (traced or
# loaded), those of them loaded from the program store, and the tokens.
GENERATE = """
import json, sys
import numpy as np
from transformers import GPT2Config
from tfgen import GPT2LM
import tensorflow as tf
tf.keras.utils.set_random_seed(0)
lm = GPT2LM(GPT2Config(n_layer=1, n_embd=int(sys.argv[1]), n_head=2, vocab_size=100, n_positions=128))
out = lm.generate(np.arange(2, 12, dtype=np.int32)[None], max_new_tokens=5, pad_token_id=0, eos_token_id=None)
print(json.dumps({"made": lm.decoder.trace_count, "loaded": lm.decoder.loaded_count, "tokens": np.asarray(out).tolist()}))
"""


def test_the_cache_directory_names_the_versions_and_has_an_off_switch(tmp_path):
    import tensorflow as tf

    directory = compile_cache_directory({"TFGEN_COMPILE_CACHE": str(tmp_path)})
    assert directory.parent == tmp_path / "xla"
    assert program_store_directory({"TFGEN_COMPILE_CACHE": str(tmp_path)}) == tmp_path / "programs"
    assert f"tf-{tf.__version__}" in directory.name and f"tfgen-{__version__}" in directory.name
    assert compile_cache_directory({"XDG_CACHE_HOME": str(tmp_path)}).parent == tmp_path / "tfgen" / "xla"
    for off in ("off", "0", ""):
        assert compile_cache_directory({"TFGEN_COMPILE_CACHE": off}) is None
        assert program_store_directory({"TFGEN_COMPILE_CACHE": off}) is None


def _entries(directory):
    """Each cache file with its inode and modification time: a rewritten entry changes them."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in directory.rglob("*") if path.is_file()}


def _generate_in_fresh_process(cache, width):
    env = {**os.environ, "TFGEN_COMPILE_CACHE": str(cache)}
    env.pop("TF_XLA_FLAGS", None)
    run = subprocess.run(
        [sys.executable, "-c", GENERATE, str(width)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "stderr": run.stderr}


@pytest.mark.slow
def test_a_second_process_loads_the_first_ones_programs_and_another_shape_compiles_its_own(tmp_path):
    first = _generate_in_fresh_process(tmp_path, 32)
    written = _entries(tmp_path)
    # the prefill and the greedy advance program: each a stored trace and an XLA entry
    assert first["made"] == 2 and first["loaded"] == 0 and len(written) == 4
    assert len(list((tmp_path / "programs").glob("*.program"))) == 2

    second = _generate_in_fresh_process(tmp_path, 32)
    assert second["made"] == second["loaded"] == 2  # neither traced
    assert second["tokens"] == first["tokens"]
    assert _entries(tmp_path) == written  # nor compiled: no entry added or rewritten
    # TF logs a failed text parse of every entry it then loads as binary: tfgen keeps that off the user's stderr.
    assert "XlaSerializedCacheEntry" not in second["stderr"]

    third = _generate_in_fresh_process(tmp_path, 48)  # another width: other programs, traced, compiled and added
    assert third["loaded"] == 0
    after = _entries(tmp_path)
    assert len(after) == len(written) + 4
    assert {name: after[name] for name in written} == written


def test_a_stored_program_that_does_not_fit_is_traced_again(tmp_path):
    """An entry cut short (or from something else) is not used: the program is traced and the entry rewritten."""
    import tensorflow as tf

    from tfgen.generation import program_store

    variable = tf.Variable([1.0, 2.0])

    def scale(factor):
        variable.assign(variable * factor)
        return {"total": tf.reduce_sum(variable)}

    made = []
    path = tmp_path / "entry"
    header, library = program_store.trace(scale, (tf.constant(2.0),), [variable], "test")
    program_store.write(path, header, library)
    assert program_store.read(path, 1, [variable]) is not None
    assert program_store.read(path, 2, [variable]) is None  # another argument count
    path.write_bytes(path.read_bytes()[:40])
    assert program_store.read(path, 1, [variable]) is None

    program = program_store.Program(scale, [variable], "a test", "scale", made.append)
    assert float(program(tf.constant(3.0))["total"]) == 9.0
    assert float(program(tf.constant(0.5))["total"]) == 4.5
    assert made == [False]  # one trace, for both calls


def test_a_traced_program_keeps_one_constant_of_each_value():
    import tensorflow as tf

    from tfgen.generation import program_store

    variable = tf.Variable([1.0, 2.0, 3.0])

    def scaled(x):
        return {"out": (variable * 2.0 + 2.0) * x * 2.0 + tf.reduce_sum(x[1:]) * x[:1] * 3.0}

    header, library = program_store.trace(scaled, (tf.constant([1.0, 2.0, 4.0]),), [variable], "constants")
    values = [
        node.attr["value"].tensor.SerializeToString() for node in library.function[0].node_def if node.op == "Const"
    ]
    assert len(values) == len(set(values)) and len(values) >= 3
    made = []
    program = program_store.Program(scaled, [variable], "constants", "scaled", made.append)
    x = tf.constant([1.0, 2.0, 4.0])
    assert np.allclose(program(x)["out"], scaled(x)["out"])
