"""Traced programs kept on disk, so that a new process runs a decode program without tracing it in Python.

A program is traced once (a tf.function without XLA); its graph, the FunctionDef and the functions it
calls (loop bodies), is renamed after a digest of everything the trace depends on, marked for XLA,
registered with TF's runtime and called by that name with its arguments and the variables it reads. The
next process finds the entry, registers the same graph under the same name and calls it: XLA's persistent
cache (tfgen._env) then finds the compiled executable too, so the process neither traces nor compiles.

The digest covers tfgen's source, the TensorFlow, tf-keras and transformers versions, the family's
`trace_description` (config, compute dtype, LoRA), the variables' shapes and dtypes, the program's key
and its arguments' shapes and dtypes: a change to any of them is another entry. Entries are written to a
temporary file and renamed into place, so processes can share the directory; an unreadable entry is traced
again and rewritten. TensorFlow has no public API to run a FunctionDef by name: this module uses the
eager context's (`add_function_def`, `call_function`), as tf.function itself does.
"""

import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path

import tensorflow as tf
from tensorflow.core.framework import function_pb2
from tensorflow.python.eager import context

from tfgen import _env

_HEADER_BYTES = 4  # an entry: the header's length, the header (JSON), the FunctionDefLibrary


@functools.cache
def _environment_digest():
    """tfgen's source and the versions of the libraries whose code a trace runs."""
    digest = hashlib.sha256()
    for name in ("tensorflow", "tf-keras", "transformers"):
        digest.update(f"{name}={importlib.metadata.version(name)};".encode())
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def argument_shapes(args):
    """The nested structure of `args` (tensors) with each tensor's shape and dtype: what a trace specializes on."""
    return repr(tf.nest.map_structure(lambda t: (tuple(t.shape), t.dtype.name), args))


def entry_digest(description, variables, key, shapes):
    parts = [_environment_digest(), description, [(tuple(v.shape), v.dtype.name) for v in variables], key, shapes]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _renamed(library, names):
    """`library` with every function, and every reference to one (loop bodies, calls), renamed by `names`."""
    renamed = function_pb2.FunctionDefLibrary()
    for function in library.function:
        copy = renamed.function.add()
        copy.CopyFrom(function)
        copy.signature.name = names[function.signature.name]
        for node in copy.node_def:
            for attr in node.attr.values():
                if attr.HasField("func") and attr.func.name in names:
                    attr.func.name = names[attr.func.name]
                for called in attr.list.func:
                    if called.name in names:
                        called.name = names[called.name]
    return renamed


def _reference_to(names, reference):
    """A node input or output reference ("node:output:0", "^node" or an argument) with its node renamed by `names`."""
    control = reference.startswith("^")
    node, colon, rest = reference.lstrip("^").partition(":")
    return "^" * control + names.get(node, node) + colon + rest


def without_repeated_constants(function):
    """Keeps one Const node of each value in a FunctionDef (tracing makes one per use: about half of a decode loop's
    nodes); the inputs and outputs that read a dropped one read its twin. XLA's lowering, which a fresh process
    runs for every program, then visits half the nodes; the HLO is the same."""
    kept, first, names = [], {}, {}
    for node in function.node_def:
        if node.op == "Const" and not node.input:
            key = repr(
                (
                    node.device,
                    sorted((name, attr.SerializeToString(deterministic=True)) for name, attr in node.attr.items()),
                )
            )
            if key in first:
                names[node.name] = first[key]
                continue
            first[key] = node.name
        kept.append(node)
    for node in kept:
        inputs = [_reference_to(names, reference) for reference in node.input]
        del node.input[:]
        node.input.extend(inputs)
    del function.node_def[:]
    function.node_def.extend(kept)
    for output, reference in list(function.ret.items()):
        function.ret[output] = _reference_to(names, reference)


def trace(function, args, variables, digest):
    """Traces `function(*args)`; returns the entry: (header, library), the program first in the library."""
    concrete = tf.function(function, autograph=False).get_concrete_function(*args)
    handles = {id(variable.handle): i for i, variable in enumerate(variables)}
    unknown = [t for t in concrete.captured_inputs if id(t) not in handles]
    if unknown:
        raise RuntimeError(f"a decode program captures {len(unknown)} tensors that are not model or state variables")
    outputs = concrete.structured_outputs
    if not (outputs is None or isinstance(outputs, dict)):
        raise TypeError("a decode program returns None or a dict of tensors")
    library = function_pb2.FunctionDefLibrary()
    library.function.add().CopyFrom(concrete.function_def)
    library.function.extend(concrete.graph.as_graph_def().library.function)
    names = {f.signature.name: f"tfgen_{digest}_{i}" for i, f in enumerate(library.function)}
    library = _renamed(library, names)
    for traced in library.function:
        without_repeated_constants(traced)
    library.function[0].attr["_XlaMustCompile"].b = True
    header = {
        "captures": [handles[id(t)] for t in concrete.captured_inputs],
        "outputs": None if outputs is None else sorted(outputs),
    }
    return header, library


def read(path, arguments, variables):
    """The entry at `path`, or None when there is none or it does not fit (`arguments`: the flat argument count)."""
    try:
        data = Path(path).read_bytes()
        size = int.from_bytes(data[:_HEADER_BYTES], "little")
        header = json.loads(data[_HEADER_BYTES : _HEADER_BYTES + size])
        library = function_pb2.FunctionDefLibrary.FromString(data[_HEADER_BYTES + size :])
        inputs = len(library.function[0].signature.input_arg)
        fits = inputs == arguments + len(header["captures"]) and all(
            0 <= i < len(variables) for i in header["captures"]
        )
    except (OSError, ValueError, KeyError, IndexError, TypeError):  # missing, cut short or from something else
        return None
    return (header, library) if fits else None


def write(path, header, library):
    """Writes the entry atomically (a temporary file renamed into place); an unwritable directory is skipped."""
    header_bytes = json.dumps(header).encode()
    data = len(header_bytes).to_bytes(_HEADER_BYTES, "little") + header_bytes + library.SerializeToString()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    except OSError:  # the next process traces again
        return
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except OSError:
        Path(temporary).unlink(missing_ok=True)


class Program:
    """`function` (tensors -> None or a dict of tensors; reads and assigns `variables`) compiled with XLA, from
    its stored trace where there is one: one trace or load per argument shapes. `on_made(loaded)` is told of each."""

    def __init__(self, function, variables, description, key, on_made):
        self._function, self._variables = function, list(variables)
        self._description, self._key, self._on_made = description, key, on_made
        self._calls = {}

    def __call__(self, *args):
        shapes = argument_shapes(args)
        if shapes not in self._calls:
            self._calls[shapes] = self._prepare(args, shapes)
        return self._calls[shapes](tf.nest.flatten(args))

    def _prepare(self, args, shapes):
        digest = entry_digest(self._description, self._variables, self._key, shapes)
        path = _env.PROGRAM_STORE / f"{digest}.program" if _env.PROGRAM_STORE else None
        entry = read(path, len(tf.nest.flatten(args)), self._variables) if path else None
        self._on_made(entry is not None)
        if entry is None:
            entry = trace(self._function, args, self._variables, digest)
            if path:
                write(path, *entry)
        header, library = entry
        runtime = context.context()
        for function in reversed(library.function):  # the functions a program calls before it
            if not runtime.has_function(function.signature.name):
                runtime.add_function_def(function)
        name = library.function[0].signature.name.encode()
        count = len(library.function[0].signature.output_arg)
        handles = [self._variables[i].handle for i in header["captures"]]

        def call(flat_args):
            outputs = runtime.call_function(name, list(flat_args) + handles, count)
            return None if header["outputs"] is None else dict(zip(header["outputs"], outputs))

        return call
