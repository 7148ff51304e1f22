"""PyTorch checkpoints (``torch.save`` files such as pytorch_model.bin) read as numpy arrays, without torch.

Two layouts: the zip archive ``torch.save`` writes since PyTorch 1.6 (a pickle,
``data.pkl``, plus one uncompressed member per storage) and the legacy stream
before it (pickles followed by the raw storages). The pickle is read by an
unpickler that knows only what a state dict holds: an ``OrderedDict`` of
tensors. Every global it names is looked up in `_ALLOWED` and replaced by a
function of this module, so nothing from the file runs and torch is never
imported; any other global is refused with `UnsafePickleError`.

`TorchCheckpoint` is a read-only mapping of tensor name -> numpy array that
reads one tensor's bytes when it is asked for.
"""

import collections
import dataclasses
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

# torch.<Name>Storage -> the numpy dtype of its elements.
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names something a state dict does not hold (it could run code); nothing was run."""


@dataclasses.dataclass(frozen=True)
class StorageRef:
    """A storage the pickle refers to: its key in the file, element dtype and element count."""

    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor as ``_rebuild_tensor_v2`` describes it: a strided view of a storage (in elements)."""

    storage: StorageRef
    offset: int
    shape: tuple
    stride: tuple

    @property
    def dtype(self):
        return self.storage.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_requires_grad_hooks_metadata):
    return TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_requires_grad_hooks):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): name for name in STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Builds TensorRefs and containers; refuses every global outside `_ALLOWED`."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.path}: the pickle asks for {module}.{name}, which a PyTorch state dict does not hold; "
                "refusing to load it (nothing from the file was run). If you trust the file, convert it with "
                "torch to model.safetensors"
            ) from None

    def persistent_load(self, pid):
        # Zip layout: ("storage", type, key, location, numel); legacy adds view metadata (always None for
        # the state dicts torch >= 0.4 writes).
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and pid[1] in STORAGE_DTYPES):
            raise UnsafePickleError(f"{self.path}: unexpected persistent id {pid!r} in the pickle")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError(f"{self.path}: storage views (pre-0.4 PyTorch files) are not supported")
        return StorageRef(str(pid[2]), STORAGE_DTYPES[pid[1]], int(pid[4]))


def _unpickle(data, path):
    try:
        return _StateDictUnpickler(io.BytesIO(data) if isinstance(data, bytes) else data, path).load()
    except UnsafePickleError:
        raise
    except Exception as error:  # e.g. a storage type called as a function, a truncated file
        raise pickle.UnpicklingError(
            f"{path}: not a PyTorch state dict pickle ({type(error).__name__}: {error})"
        ) from None


def _tensor_refs(obj, path):
    """The name -> TensorRef mapping of an unpickled state dict (a dict whose values are tensors)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of named tensors")
    tensors = {name: ref for name, ref in obj.items() if isinstance(ref, TensorRef)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors; is it a PyTorch checkpoint?")
    return tensors


def _stored_member_offset(file, info):
    """Where the bytes of an uncompressed zip member start: after its local header, name and extra field."""
    file.seek(info.header_offset)
    header = file.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError(f"bad zip local header for {info.filename}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _read_zip(path, file):
    """TensorRefs and storage key -> byte offset of a zip-layout file."""
    with zipfile.ZipFile(file) as archive:
        members = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip file but not one torch.save wrote (no single */data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = members.get(prefix + "byteorder")
        if byteorder is not None and archive.read(byteorder).strip() != b"little":
            raise ValueError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one")
        tensors = _tensor_refs(_unpickle(archive.read(pickles[0]), path), path)
        offsets = {}
        for ref in tensors.values():
            info = members.get(f"{prefix}data/{ref.storage.key}")
            if info is None:
                raise ValueError(f"{path} lacks the data of storage {ref.storage.key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: storage {ref.storage.key} is compressed, which torch.save never does")
            offsets[ref.storage.key] = _stored_member_offset(file, info)
    return tensors, offsets


def _read_legacy(path, file):
    """TensorRefs and storage key -> byte offset of a pre-1.6 file: magic, version, system info, the state
    dict, the sorted storage keys, then each storage as an int64 element count and its bytes."""
    magic = _unpickle(file, path)
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{path} is neither a zip nor a legacy PyTorch file")
    if _unpickle(file, path) != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy PyTorch protocol version")
    system = _unpickle(file, path)
    if not (isinstance(system, dict) and system.get("little_endian")):
        raise ValueError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one")
    tensors = _tensor_refs(_unpickle(file, path), path)
    storages = {ref.storage.key: ref.storage for ref in tensors.values()}
    offsets = {}
    for key in _unpickle(file, path):
        (numel,) = struct.unpack("<q", file.read(8))
        if key not in storages:
            raise ValueError(f"{path} lists storage {key!r}, which no tensor uses")
        offsets[key] = file.tell()
        file.seek(numel * storages[key].dtype.itemsize, io.SEEK_CUR)
    return tensors, offsets


def _contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class TorchCheckpoint(Mapping):
    """A ``torch.save`` state dict as a read-only mapping name -> numpy array, without torch.

    Opening reads only the pickle; looking a tensor up reads its storage's
    bytes from the file into a new array, so tensors can be read one at a time
    and a model is never in memory twice. ``refs[name]`` has a tensor's dtype
    and shape without reading it. Raises `UnsafePickleError` for a pickle that
    names anything but tensors and containers.
    """

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as file:
            if zipfile.is_zipfile(file):
                self.refs, self._offsets = _read_zip(self.path, file)
            else:
                file.seek(0)
                self.refs, self._offsets = _read_legacy(self.path, file)

    def __getitem__(self, name):
        ref = self.refs[name]
        storage = np.empty(ref.storage.numel, ref.dtype)
        with open(self.path, "rb") as file:
            file.seek(self._offsets[ref.storage.key])
            if file.readinto(storage.view(np.uint8)) != storage.nbytes:
                raise ValueError(f"{self.path} is truncated: the data of {name} is cut short")
        if ref.offset == 0 and storage.size == np.prod(ref.shape) and ref.stride == _contiguous_strides(ref.shape):
            return storage.reshape(ref.shape)  # the usual case: the tensor is its whole storage
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset :], shape=ref.shape, strides=[s * ref.dtype.itemsize for s in ref.stride]
        )
        return np.array(view, order="C")

    def __iter__(self):
        return iter(self.refs)

    def __len__(self):
        return len(self.refs)
