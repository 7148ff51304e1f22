"""Zero-copy LiteRT TensorBuffers over numpy arrays: a CompiledModel signature that reads and writes numpy memory.

ai-edge-litert's `TensorBuffer.create_from_host_memory` wraps an array's
memory but gives the buffer a flat shape, which a static-shape input refuses
("Cannot auto-resize tensor ...: no dims_signature exists"). LiteRT's C API
(`LiteRtCreateTensorBufferFromHostMemory`, in the package's libLiteRt.so)
takes the shape, so `host_buffer` calls it through ctypes and hands the
buffer to the Python wrapper as the capsule the wrapper makes itself. The
buffer only borrows the memory: the array must stay alive and in place (it
is kept on the buffer), 64-byte aligned (`aligned_zeros`) and C-contiguous.
"""

import ctypes
import os
import weakref

import numpy as np

ALIGNMENT = 64  # what LiteRT's host-memory buffers need
_MAX_RANK = 8
_ELEMENT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.int32): 2}  # LiteRtElementType (TfLiteType's numbers)
_CAPSULE_NAME = ctypes.create_string_buffer(b"LiteRtTensorBuffer")  # the wrapper's name for its capsules


class _Layout(ctypes.Structure):  # LiteRtLayout: rank:7 and has_strides:1 in one word, then dims and strides
    _fields_ = [
        ("rank", ctypes.c_uint32),
        ("dimensions", ctypes.c_int32 * _MAX_RANK),
        ("strides", ctypes.c_uint32 * _MAX_RANK),
    ]


class _RankedTensorType(ctypes.Structure):  # LiteRtRankedTensorType
    _fields_ = [("element_type", ctypes.c_int32), ("layout", _Layout)]


_api = None


def _load():
    global _api
    if _api is None:
        import ai_edge_litert
        from ai_edge_litert import _pywrap_litert_tensor_buffer_wrapper as wrapper
        from ai_edge_litert.tensor_buffer import TensorBuffer

        library = ctypes.CDLL(os.path.join(os.path.dirname(ai_edge_litert.__file__), "libLiteRt.so"))
        create = library.LiteRtCreateTensorBufferFromHostMemory
        create.restype = ctypes.c_int
        create.argtypes = [
            ctypes.POINTER(_RankedTensorType),
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        capsule = ctypes.pythonapi.PyCapsule_New
        capsule.restype = ctypes.py_object
        capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        _api = create, capsule, wrapper.DestroyTensorBuffer, TensorBuffer
    return _api


def aligned_zeros(shape, dtype=np.float32):
    """A C-contiguous array of zeros whose memory starts at a multiple of ALIGNMENT bytes."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


def host_buffer(array):
    """A LiteRT TensorBuffer of `array`'s shape and dtype over its memory (no copy), released with the buffer."""
    create, new_capsule, destroy, TensorBuffer = _load()
    if (
        array.dtype not in _ELEMENT_TYPES
        or not array.flags.c_contiguous
        or array.ctypes.data % ALIGNMENT
        or not 1 <= array.ndim <= _MAX_RANK
    ):
        raise ValueError(
            f"a host buffer needs a C-contiguous, {ALIGNMENT}-byte aligned float32 or int32 array of "
            f"rank 1 to {_MAX_RANK}, got {array.dtype} {array.shape}"
        )
    dimensions = (ctypes.c_int32 * _MAX_RANK)(*array.shape)
    tensor_type = _RankedTensorType(_ELEMENT_TYPES[array.dtype], _Layout(array.ndim, dimensions))
    handle = ctypes.c_void_p()
    status = create(ctypes.byref(tensor_type), array.ctypes.data, array.nbytes, None, ctypes.byref(handle))
    if status != 0:
        raise RuntimeError(f"LiteRtCreateTensorBufferFromHostMemory failed (LiteRtStatus {status})")
    capsule = new_capsule(handle.value, ctypes.cast(_CAPSULE_NAME, ctypes.c_char_p), None)
    buffer = TensorBuffer(capsule)
    details = buffer.get_tensor_details()
    if list(details["shape"]) != list(array.shape):  # another LiteRtRankedTensorType layout than this one
        destroy(capsule)
        raise RuntimeError(
            f"this ai-edge-litert made a host buffer of shape {details['shape']} for "
            f"{list(array.shape)}; tfgen's zero-copy buffers need ai-edge-litert 2.3"
        )
    buffer.array = array  # the memory it borrows
    weakref.finalize(buffer, destroy, capsule)
    return buffer
