"""HF-layout checkpoint files: PyTorch-layout safetensors without torch, atomic directories.

GPT-2's TF and PyTorch weights have the same shapes (Conv1D keeps [in, out]),
so converting is renaming; only Conv1D biases differ ([1, n] in TF, [n] in PyTorch).
"""

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CONFIG_FILE = "config.json"
TF_WEIGHTS_FILE = "tf_model.h5"
SAFETENSORS_FILE = "model.safetensors"
PYTORCH_WEIGHTS_FILE = "pytorch_model.bin"


def pytorch_name(tf_variable_name):
    """'tfgpt2lm_head_model/transformer/h_._0/ln_1/gamma:0' -> 'transformer.h.0.ln_1.weight'."""
    name = tf_variable_name.split(":")[0]
    name = name[name.index("transformer/"):]
    name = re.sub(r"h_\._(\d+)", r"h.\1", name)
    parts = name.split("/")
    parts[-1] = {"gamma": "weight", "beta": "bias", "embeddings": "weight"}.get(parts[-1], parts[-1])
    return ".".join(parts)


def write_safetensors(variables, path, dtype=None):
    """Writes TF GPT-2 variables as a PyTorch-layout safetensors file, cast to `dtype` if given."""
    tensors = {}
    for variable in variables:
        value = variable.numpy() if dtype is None else variable.numpy().astype(dtype)
        if variable.name.endswith("bias:0") and value.ndim == 2:
            value = value[0]
        tensors[pytorch_name(variable.name)] = np.ascontiguousarray(value)
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())  # save_file creates the file 0600


def read_safetensors(variables, path):
    """Assigns a PyTorch-layout safetensors file to TF GPT-2 variables; every variable must be found."""
    tensors = load_file(str(path))
    missing = []
    for variable in variables:
        name = pytorch_name(variable.name)
        if name not in tensors:
            missing.append(name)
            continue
        variable.assign(np.reshape(tensors[name], variable.shape).astype(variable.dtype.as_numpy_dtype))
    if missing:
        raise ValueError(f"{path} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}; is it a GPT-2 checkpoint?")


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_directory(target):
    """Yields a temporary directory beside `target` that replaces it only when the block succeeds.

    A crash inside the block leaves `target` as it was; the old contents are
    removed only after the new directory is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would otherwise become the checkpoint's mode
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def write_text_atomically(path, text):
    """Writes a UTF-8 text file through a temporary file beside it, so readers see the old or the new one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
