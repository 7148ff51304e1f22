"""HF-layout checkpoint files: PyTorch-layout weights read and written without torch, atomic directories.

transformers' TF and PyTorch models of a family have the same weights under related names
(`pytorch_name`); GPT-2's Conv1D keeps [in, out] in both (only its biases differ: [1, n] in TF,
[n] in PyTorch), a Keras Dense kernel (GPT-J's projections and head) is the transposed Linear weight.
`open_weights` reads model.safetensors, pytorch_model.bin (`torch_pickle`) and
the shards of either's index as one name -> numpy array mapping, a tensor at a time;
`read_weights` reads those and a TF model's tf_model.h5 into a model's variables.
"""

import contextlib
import fnmatch
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
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


# safetensors' dtype names; BF16 as ml_dtypes' bfloat16 (numpy has none; TensorFlow's tf.bfloat16 is the same type).
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
# How many bytes of a tensor are read at a time when it is cast into its variable (see _assign).
_BLOCK_BYTES = 1 << 25


class _StoredTensor:
    """A tensor's bytes in a file, read (with plain reads, not a memory map) only when rows are sliced:
    `tensor[a:b]` is rows a..b of its first axis, `tensor[()]` all of it."""

    def __init__(self, path, offset, dtype, shape):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, tuple(shape)
        self.ndim = len(self.shape)
        self.nbytes = int(np.prod(self.shape)) * dtype.itemsize

    def __getitem__(self, rows):
        if rows == ():
            return self._read(0, self.shape[0] if self.shape else 1).reshape(self.shape)
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("a stored tensor is read in runs of rows")
        return self._read(start, max(start, stop))

    def _read(self, start, stop):
        row = int(np.prod(self.shape[1:]))
        values = np.empty((stop - start, *self.shape[1:]), self.dtype)
        with open(self.path, "rb") as file:
            file.seek(self.offset + start * row * self.dtype.itemsize)
            if file.readinto(values.view(np.uint8).reshape(-1)) != values.nbytes:
                raise ValueError(f"{self.path} is truncated: a tensor's data is cut short")
        return values


class _SafetensorsFile(Mapping):
    """A .safetensors file: an 8-byte header length, a JSON header (name -> dtype, shape, byte range), the data."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > size - 8:
                raise ValueError(f"{self.path} is not a safetensors file (its header length exceeds the file)")
            header = json.loads(file.read(length))
        header.pop("__metadata__", None)
        self._tensors = {}
        for name, entry in header.items():
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{self.path}: {name} has the dtype {entry['dtype']}, which tfgen cannot read")
            dtype = np.dtype(_numpy_dtype(_SAFETENSORS_DTYPES[entry["dtype"]]))
            begin, end = entry["data_offsets"]
            tensor = _StoredTensor(self.path, 8 + length + begin, dtype, entry["shape"])
            if end - begin != tensor.nbytes or 8 + length + end > size:
                raise ValueError(f"{self.path}: the byte range of {name} does not fit its shape or the file")
            self._tensors[name] = tensor

    def stored(self):
        """name -> `_StoredTensor`, nothing read yet."""
        return dict(self._tensors)

    def __getitem__(self, name):
        return self._tensors[name][()]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)


def _numpy_dtype(name):
    if name == "bfloat16":
        import ml_dtypes  # a dependency of TensorFlow's

        return ml_dtypes.bfloat16
    return np.dtype(name)


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


def tf_name(tf_variable_name):
    """A TF variable's name from its model's layers on, as transformers' h5 files match them:
    'tfgpt2lm_head_model_1/transformer/h_._0/ln_1/gamma:0' -> 'transformer/h_._0/ln_1/gamma:0'."""
    layers = re.search(r"(^|/)(transformer|lm_head)/", tf_variable_name)
    return tf_variable_name[layers.end(1) :] if layers else tf_variable_name


def pytorch_name(tf_variable_name):
    """transformers' PyTorch name of a TF variable: 'tfgpt2lm_head_model/transformer/h_._0/ln_1/gamma:0' ->
    'transformer.h.0.ln_1.weight', 'tfgptj_for_causal_lm/lm_head/kernel:0' -> 'lm_head.weight'."""
    name = re.sub(r"h_\._(\d+)", r"h.\1", tf_name(tf_variable_name).split(":")[0])
    parts = name.split("/")
    parts[-1] = {"gamma": "weight", "beta": "bias", "embeddings": "weight", "kernel": "weight"}.get(
        parts[-1], parts[-1]
    )
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
        with _stored_tensors(path) as tensors:
            return [(path, set(tensors))]
    weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    shards = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, set()).add(name)
    for shard in shards:
        if not (path.parent / shard).is_file():
            raise FileNotFoundError(f"{path} names the shard {shard}, which is not beside it")
    return [(path.parent / shard, shards[shard]) for shard in sorted(shards)]


@contextlib.contextmanager
def _stored_tensors(path):
    """A weights file's name -> tensor mapping, the tensors unread: safetensors' and h5's are read as their rows
    are sliced (h5py datasets), a .bin's storage when it is looked up. An h5 file (a transformers TF model's
    Keras weights) is named by `tf_name`, the others by PyTorch's names."""
    if path.suffix == ".h5":
        import h5py  # a dependency of TensorFlow's

        with h5py.File(path, "r") as file:
            # Keras' h5 layout: a group per top-level layer, its weights' full TF names in the weight_names attribute.
            yield {
                tf_name(weight): file[layer][weight]
                for layer in _h5_strings(file.attrs["layer_names"])
                for weight in _h5_strings(file[layer].attrs["weight_names"])
            }
    else:
        yield _SafetensorsFile(path).stored() if path.suffix == ".safetensors" else TorchCheckpoint(path)


def _h5_strings(values):
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values]


def read_weights(variables, path, rename=None):
    """Assigns a checkpoint to TF variables, one tensor at a time.

    `path` is a PyTorch-layout checkpoint (see `open_weights`), whose tensors
    are found under `pytorch_name` (or without the "transformer." prefix, as
    GPT2Model checkpoints have them), or a transformers TF model's tf_model.h5
    (Keras' h5 layout, names by `tf_name`). Each tensor goes from the file
    into its variable in the variable's dtype (float16/bfloat16/float32), a
    block of rows at a time, so the model is never held twice nor in a wider
    dtype: only the one tensor being read is (once, in the variable's dtype).
    Shards are read one after another. Every variable must be found; other
    tensors in the file, such as the causal-mask buffers attn.bias and
    attn.masked_bias of older checkpoints, are not weights and are left unread.
    A progress bar over the shards' bytes shows on a terminal (tqdm; not when stderr is redirected).
    `rename`: a function from a variable's name in the file's convention to the name to read instead (a LiteRT
    export's part holds blocks 0, 1, ... that are blocks k, k + 1, ... of the checkpoint).
    """
    from tqdm.auto import tqdm

    path = Path(path)
    in_tf_layout = path.suffix == ".h5"
    convention = tf_name if in_tf_layout else pytorch_name

    def name_of(variable_name):
        name = convention(variable_name)
        return name if rename is None else rename(name)

    files = _files_and_names(path)
    everything = set().union(*(names for _, names in files))
    names = {variable.name: _checkpoint_name(name_of(variable.name), everything) for variable in variables}
    missing = [name_of(variable.name) for variable in variables if names[variable.name] is None]
    if missing:
        raise ValueError(
            f"{path} lacks the weights {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
            "does config.json's model_type belong to these weights?"
        )
    total = sum(file.stat().st_size for file, _ in files)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        disable=None,
        desc=f"Loading {len(files)} checkpoint shard{'s' if len(files) > 1 else ''}",
    ) as progress:
        for number, (file, held) in enumerate(files, 1):
            progress.set_postfix_str(f"shard {number}/{len(files)}")
            with _stored_tensors(file) as tensors:
                for variable in variables:
                    name = names[variable.name]
                    if name in held:
                        transposed = not in_tf_layout and is_dense_kernel(variable)
                        progress.update(_assign(variable, tensors[name], transposed, f"{file}: {name}"))


def _assign(variable, stored, transposed, where):
    """variable <- a stored tensor (transposed: a PyTorch Linear weight for a Dense kernel), in the variable's dtype.

    The tensor's rows are read and written into the variable a block at a time
    (`_BLOCK_BYTES` each), in the variable's dtype, so besides the variables
    only a block is held. Returns the bytes read.
    """
    shape = variable.shape.as_list()
    expected = shape[::-1] if transposed else shape
    stored_shape = list(stored.shape)
    if int(np.prod(stored_shape)) != int(np.prod(shape)) or (
        len(stored_shape) == len(shape) and stored_shape != expected
    ):
        raise ValueError(
            f"{where} has shape {stored_shape}, the model expects {expected}; does config.json belong to these weights?"
        )
    dtype = variable.dtype.as_numpy_dtype
    if len(stored_shape) != len(shape) or not stored_shape or not hasattr(variable[:0], "assign"):
        # a scalar, a stored vector for a [1, n] variable, or a variable that takes no slice writes (mirrored,
        # autocast): written whole
        whole = np.asarray(stored[:] if stored_shape else stored[()], dtype)
        variable.assign((whole.T if transposed else whole).reshape(shape))
        return stored.nbytes
    step = max(1, _BLOCK_BYTES // max(1, stored.nbytes // stored_shape[0]))
    for start in range(0, stored_shape[0], step):
        block = np.asarray(stored[start : start + step], dtype)  # numpy casts into the variable's dtype
        if transposed:  # the block's rows are columns of the variable
            variable[:, start : start + step].assign(block.T)
        else:
            variable[start : start + step].assign(block)
    return stored.nbytes


def _checkpoint_name(name, weights):
    if name in weights:
        return name
    bare = name[len(_BASE_MODEL_PREFIX) :] if name.startswith(_BASE_MODEL_PREFIX) else None
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
