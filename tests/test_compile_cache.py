"""XLA's persistent compile cache (tfgen._env): where it goes, and a second process loading what the first compiled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tfgen import __version__
from tfgen._env import compile_cache_directory

# Builds a random GPT-2 of the given width in a fresh process, generates once, prints the trace count.
GENERATE = """
import json, sys
import numpy as np
from transformers import GPT2Config
from tfgen import GPT2LM
lm = GPT2LM(GPT2Config(n_layer=1, n_embd=int(sys.argv[1]), n_head=2, vocab_size=100, n_positions=128))
lm.generate(np.arange(2, 12, dtype=np.int32)[None], max_new_tokens=5, pad_token_id=0, eos_token_id=None)
print(json.dumps({"traces": lm.decoder.trace_count}))
"""


def test_the_cache_directory_names_the_versions_and_has_an_off_switch(tmp_path):
    import tensorflow as tf

    directory = compile_cache_directory({"TFGEN_COMPILE_CACHE": str(tmp_path)})
    assert directory.parent == tmp_path / "xla"
    assert f"tf-{tf.__version__}" in directory.name and f"tfgen-{__version__}" in directory.name
    assert compile_cache_directory({"XDG_CACHE_HOME": str(tmp_path)}).parent == tmp_path / "tfgen" / "xla"
    for off in ("off", "0", ""):
        assert compile_cache_directory({"TFGEN_COMPILE_CACHE": off}) is None


def _entries(directory):
    """Each cache file with its inode and modification time: a rewritten entry changes them."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in directory.rglob("*") if path.is_file()}


def _generate_in_fresh_process(cache, width):
    env = {**os.environ, "TFGEN_COMPILE_CACHE": str(cache)}
    env.pop("TF_XLA_FLAGS", None)
    run = subprocess.run([sys.executable, "-c", GENERATE, str(width)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "stderr": run.stderr}


@pytest.mark.slow
def test_a_second_process_loads_the_first_ones_programs_and_another_shape_compiles_its_own(tmp_path):
    first = _generate_in_fresh_process(tmp_path, 32)
    written = _entries(tmp_path)
    assert first["traces"] == 2 and len(written) >= 2  # the prefill and the greedy advance program

    second = _generate_in_fresh_process(tmp_path, 32)
    assert second["traces"] == 2  # traced again, but compiled by none: no entry added or rewritten
    assert _entries(tmp_path) == written
    # TF logs a failed text parse of every entry it then loads as binary: tfgen keeps that off the user's stderr.
    assert "XlaSerializedCacheEntry" not in second["stderr"]

    _generate_in_fresh_process(tmp_path, 48)  # another width: other programs, compiled and added
    after = _entries(tmp_path)
    assert len(after) >= len(written) + 2
    assert {name: after[name] for name in written} == written
