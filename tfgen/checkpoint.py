"""HF-layout checkpoint files: PyTorch-layout weights read and written without torch, atomic directories.

transformers' TF and PyTorch models of a family have the same weights under related names
(`pytorch_name`); GPT-2's Conv1D keeps [in, out] in both (only its biases differ: [1, n] in TF,
[n] in PyTorch), a Keras Dense kernel (GPT-J's projections and head) is the transposed Linear weight.
`open_weights` reads model.safetensors, pytorch_model.bin (`torch_pickle`) and
the shards of either's index as one name -> numpy array mapping, a tensor at a time.
"""

import contextlib
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tfgen.torch_pickle import TorchCheckpoint

CONFIG_FILE = "config.json"
TF_WEIGHTS_FILE = "tf_model.h5"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_WEIGHTS_FILE = "pytorch_model.bin"
PYTORCH_INDEX_FILE = "pytorch_model.bin.index.json"
# The weights files a checkpoint may have, in the order tfgen prefers them (one is read).
WEIGHTS_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, TF_WEIGHTS_FILE, PYTORCH_WEIGHTS_FILE, PYTORCH_INDEX_FILE)
# How transformers names the shards of an index ("model-00001-of-00002.safetensors").
_SHARDS = {SAFETENSORS_INDEX_FILE: "model-*-of-*.safetensors", PYTORCH_INDEX_FILE: "pytorch_model-*-of-*.bin"}
# Prefixes of a GPT2LMHeadModel's names that a checkpoint of the bare GPT2Model (OpenAI's gpt2 files) lacks.
_BASE_MODEL_PREFIX = "transformer."


def weights_file(filenames):
    """The weights file tfgen reads among `filenames` (a checkpoint's file names), or None."""
    return next((name for name in WEIGHTS_FILES if name in filenames), None)


def weights_to_fetch(filenames):
    """Of a hub repository's files, the weights that `weights_file` picks: one file, or an index and its shards."""
    chosen = weights_file(filenames)
    if chosen is None:
        return []
    return [chosen, *sorted(fnmatch.filter(filenames, _SHARDS[chosen]))] if chosen in _SHARDS else [chosen]


class _SafetensorsFile(Mapping):
    def __init__(self, path):
        self._file = safe_open(str(path), framework="numpy")
        self._names = list(self._file.keys())

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


class _Shards(Mapping):
    """An index's tensors: each name looked up in the shard the index's weight_map names."""

    def __init__(self, index_path):
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = {}
        for shard in sorted(set(weight_map.values())):
            if not (index_path.parent / shard).is_file():
                raise FileNotFoundError(f"{index_path} names the shard {shard}, which is not beside it")
            shards[shard] = _open_file(index_path.parent / shard)
        self._where = {name: shards[shard] for name, shard in weight_map.items()}

    def __getitem__(self, name):
        return self._where[name][name]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def _open_file(path):
    return _SafetensorsFile(path) if path.suffix == ".safetensors" else TorchCheckpoint(path)


def open_weights(path):
    """A PyTorch-layout checkpoint as a read-only mapping name -> numpy array; each tensor is read when looked up.

    `path` is a model.safetensors, a pytorch_model.bin (read by `torch_pickle`,
    without torch and without running anything from the pickle) or either's
    ``.index.json``, whose shards lie beside it.
    """
    path = Path(path)
    return _Shards(path) if path.name.endswith(".index.json") else _open_file(path)


def pytorch_name(tf_variable_name):
    """transformers' PyTorch name of a TF variable: 'tfgpt2lm_head_model/transformer/h_._0/ln_1/gamma:0' ->
    'transformer.h.0.ln_1.weight', 'tfgptj_for_causal_lm/lm_head/kernel:0' -> 'lm_head.weight'."""
    name = tf_variable_name.split(":")[0]
    name = name[re.search(r"(^|/)(transformer|lm_head)/", name).end(1):]
    name = re.sub(r"h_\._(\d+)", r"h.\1", name)
    parts = name.split("/")
    parts[-1] = {"gamma": "weight", "beta": "bias", "embeddings": "weight", "kernel": "weight"}.get(parts[-1], parts[-1])
    return ".".join(parts)


def is_dense_kernel(variable):
    # A Keras Dense kernel is [in, out], the PyTorch Linear weight [out, in]; GPT-2's Conv1D ("weight") keeps [in, out].
    return variable.name.split(":")[0].endswith("/kernel")


def pytorch_value(variable, dtype=None):
    """A TF variable's value in transformers' PyTorch layout (numpy, cast to `dtype` if given)."""
    value = variable.numpy() if dtype is None else variable.numpy().astype(dtype)
    if is_dense_kernel(variable):
        value = value.T
    elif variable.name.endswith("bias:0") and value.ndim == 2:
        value = value[0]
    return np.ascontiguousarray(value)


def write_safetensors(variables, path, dtype=None):
    """Writes TF variables (of a transformers TF model) as a PyTorch-layout safetensors file, cast to `dtype` if given."""
    tensors = {pytorch_name(variable.name): pytorch_value(variable, dtype) for variable in variables}
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())  # save_file creates the file 0600


def _files_and_names(path):
    """[(file, the tensor names it holds)] of a checkpoint: the file itself, or an index's shards in order."""
    if not path.name.endswith(".index.json"):
        return [(path, set(_open_file(path)))]
    weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    shards = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, set()).add(name)
    for shard in shards:
        if not (path.parent / shard).is_file():
            raise FileNotFoundError(f"{path} names the shard {shard}, which is not beside it")
    return [(path.parent / shard, shards[shard]) for shard in sorted(shards)]


def read_weights(variables, path):
    """Assigns a PyTorch-layout checkpoint (see `open_weights`) to TF variables, one tensor at a time.

    Each tensor goes from the file straight into its variable in the
    variable's dtype (float16/bfloat16/float32), so the model is never held
    twice nor in a wider dtype; shards are read one after another, each
    closed before the next is opened. Every variable must be found, under its
    PyTorch name or without the "transformer." prefix (GPT2Model checkpoints);
    other tensors in the file, such as the causal-mask buffers attn.bias and
    attn.masked_bias of older checkpoints, are not weights and are left unread.
    A progress bar over the shards' bytes shows on a terminal (tqdm; not when stderr is redirected).
    """
    from tqdm.auto import tqdm

    path = Path(path)
    files = _files_and_names(path)
    everything = set().union(*(names for _, names in files))
    names = {variable.name: _checkpoint_name(pytorch_name(variable.name), everything) for variable in variables}
    missing = [pytorch_name(variable.name) for variable in variables if names[variable.name] is None]
    if missing:
        raise ValueError(f"{path} lacks the weights {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                         "does config.json's model_type belong to these weights?")
    total = sum(file.stat().st_size for file, _ in files)
    with tqdm(total=total, unit="B", unit_scale=True, disable=None,
              desc=f"Loading {len(files)} checkpoint shard{'s' if len(files) > 1 else ''}") as progress:
        for number, (file, held) in enumerate(files, 1):
            progress.set_postfix_str(f"shard {number}/{len(files)}")
            weights = _open_file(file)
            for variable in variables:
                if names[variable.name] in held:
                    progress.update(_assign(variable, weights[names[variable.name]], f"{file}: {names[variable.name]}"))
            del weights  # unmaps the file before the next one is read


def _assign(variable, value, where):
    """variable <- a PyTorch-layout array (transposed for a Dense kernel), in the variable's dtype; its bytes."""
    shape = variable.shape.as_list()
    expected = shape[::-1] if is_dense_kernel(variable) else shape
    if value.size != np.prod(shape) or (value.ndim == len(shape) and list(value.shape) != expected):
        raise ValueError(f"{where} has shape {list(value.shape)}, the model expects {expected}; "
                         "does config.json belong to these weights?")
    if is_dense_kernel(variable):
        value = value.T
    variable.assign(np.reshape(value, shape).astype(variable.dtype.as_numpy_dtype, copy=False))
    return value.nbytes


def _checkpoint_name(name, weights):
    if name in weights:
        return name
    bare = name[len(_BASE_MODEL_PREFIX):] if name.startswith(_BASE_MODEL_PREFIX) else None
    return bare if bare in weights else None


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
