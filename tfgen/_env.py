"""Environment set before TensorFlow is first imported.

transformers' TF models are written for Keras 2, which TensorFlow 2.16+ only
uses when TF_USE_LEGACY_KERAS is set (tf-keras provides it). TF's C++ INFO
lines are hidden through TF_CPP_MIN_LOG_LEVEL; both are defaults that the
user's own environment overrides.

XLA's persistent compile cache is switched on here too (TF reads TF_XLA_FLAGS
once, when it initialises): a compiled program is saved in a directory under
~/.cache/tfgen (or $XDG_CACHE_HOME/tfgen) and a later process loads it instead
of compiling. TF keys each entry by the program's HLO fingerprint, so a model
of another shape compiles its own; the directory name carries the TensorFlow
and tfgen versions and a digest of the CPU's model and features, so neither an
upgrade nor a home directory shared between machines loads a stale or foreign
program. TF writes each entry to a temporary file and moves it into place, so
processes can share the directory. TFGEN_COMPILE_CACHE=DIR puts the cache
under DIR, TFGEN_COMPILE_CACHE=off switches it off, and a
--tf_xla_persistent_cache_directory of the user's own in TF_XLA_FLAGS wins.
The traced decode programs are kept beside it, under programs/
(tfgen.generation.program_store), with the same switch.

XLA's while-loop invariant code motion is switched off (XLA_FLAGS, read when
XLA first compiles; a --xla_disable_hlo_passes of the user's own wins). On a CPU
XLA computes bfloat16 and float16 in float32, and that pass would convert every
weight of a low-precision model once, before the decode loop: a float32 copy of
the whole model alive while it decodes (see tfgen.families.base.read_after).
The flags are part of the cache directory's name, as they change what XLA compiles.

A few start-up lines (the CUDA probe on a machine without a GPU) are written
before TF reads TF_CPP_MIN_LOG_LEVEL, so the first import of TensorFlow (by
whichever module needs it; importing tfgen does not) runs with stderr captured
and everything but those known lines is written back.
"""

import contextlib
import hashlib
import importlib.abc
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import sys
import tempfile
import warnings
from pathlib import Path

from tfgen import __version__

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# In Jupyter without ipywidgets, tqdm.auto (imported by transformers) warns that it falls back to text bars.
warnings.filterwarnings("ignore", message="IProgress not found")


def return_freed_memory():
    """Has TensorFlow give freed tensors' memory back to the system, if it is not imported yet.

    On x86, TF's oneDNN allocator keeps the memory of every freed tensor for
    reuse and never returns it, so a LiteRT export, which converts a model one
    part after another, would hold the largest parts' weights and the
    converter's copies to the end. `tfgen export` calls this; the user's own
    setting wins.
    """
    if "tensorflow" not in sys.modules:  # after, it would only reach the processes this one starts
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


COMPILE_CACHE_VARIABLE = "TFGEN_COMPILE_CACHE"
_CACHE_FLAG = "--tf_xla_persistent_cache_directory"
_PASSES_FLAG = "--xla_disable_hlo_passes"


def _cpu_digest():
    """A short digest of the CPU model and instruction-set flags (XLA compiles for the host's features)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        described = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    except OSError:
        described = []
    text = "\n".join(described) or f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cache_base(environ):
    """~/.cache/tfgen (or $XDG_CACHE_HOME/tfgen, or TFGEN_COMPILE_CACHE); None when switched off."""
    setting = environ.get(COMPILE_CACHE_VARIABLE)
    if setting is not None and setting.strip().lower() in ("off", "0", "false", "no", ""):
        return None
    return (
        Path(setting).expanduser()
        if setting
        else Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tfgen"
    )


def xnnpack_cache_file(model_file, environ=os.environ):
    """Where XNNPACK keeps the packed weights of a LiteRT model file (see tfgen.litert), named by the file's path, size
    and time and by the CPU (packing depends on its instruction set); None when the cache is off."""
    base = _cache_base(environ)
    if base is None:
        return None
    model_file = Path(model_file).resolve()
    stat = model_file.stat()
    key = f"{model_file}\n{stat.st_size}\n{stat.st_mtime_ns}\n{_cpu_digest()}"
    return base / "xnnpack" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.xnnpack"


def program_store_directory(environ=os.environ):
    """Where traced decode programs are kept (tfgen.generation.program_store); None when the cache is off."""
    base = _cache_base(environ)
    return None if base is None else base / "programs"


def compile_cache_directory(environ=os.environ):
    """Where XLA's persistent cache goes for this TF, tfgen and CPU; None when switched off."""
    base = _cache_base(environ)
    if base is None:
        return None
    try:
        tensorflow_version = importlib.metadata.version("tensorflow")
    except importlib.metadata.PackageNotFoundError:
        tensorflow_version = "unknown"
    flags = hashlib.sha256(environ.get("XLA_FLAGS", "").encode()).hexdigest()[:8]
    return base / "xla" / f"tf-{tensorflow_version}-tfgen-{__version__}-cpu-{_cpu_digest()}-xla-{flags}"


def _keep_weight_converts_in_loops():
    flags = os.environ.get("XLA_FLAGS", "")
    if _PASSES_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_PASSES_FLAG}=while-loop-invariant-code-motion".strip()


def _use_compile_cache():
    flags = os.environ.get("TF_XLA_FLAGS", "")
    directory = compile_cache_directory()
    if directory is None or _CACHE_FLAG in flags:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home: run without the cache
        return
    os.environ["TF_XLA_FLAGS"] = f"{flags} {_CACHE_FLAG}={directory}".strip()


_keep_weight_converts_in_loops()
_use_compile_cache()
PROGRAM_STORE = program_store_directory()  # read once, as the XLA cache's directory is

_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc.*Could not find cuda drivers"
    r"|cuda_platform\.cc.*failed call to cuInit|cpu_feature_guard\.cc|To enable the following instructions"
    r"|oneDNN custom operations are on"
)


# TF reads each persistent-cache entry as a text proto first and, when that fails as it always does, as the binary
# one it wrote; the failed text parse is logged at error level although the entry then loads. On Intel hosts XLA also
# records the compiler's tuning flags prefer-no-scatter/-gather among the target's features, and the loader then
# reports them as features the host lacks: they are not CPU features (a real mismatch is still reported).
CACHE_READ_NOISE = re.compile(
    r"text_format\.cc.*Error parsing text-format tensorflow\.XlaSerializedCacheEntry"
    r"|cpu_aot_loader\.cc.*Target machine feature \+prefer-no-(scatter|gather) is not +supported"
)


@contextlib.contextmanager
def native_stderr_without(noise):
    """Runs the block with file descriptor 2 captured (TF's C++ logging bypasses sys.stderr), then writes back
    every line that `noise` does not match."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not noise.search(line)
            ]
            sys.stderr.write("".join(kept))


class _QuietLoader:
    """TensorFlow's own loader, run with its start-up noise dropped."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def exec_module(self, module):
        with native_stderr_without(_STARTUP_NOISE):
            self._loader.exec_module(module)
            module.config.list_physical_devices("GPU")  # the CUDA probe logs here


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds TensorFlow, for whichever module imports it first, with `_QuietLoader`: tfgen does not import it
    itself, so the LiteRT runtime and server never load it. It stays in place until TensorFlow is imported, since
    a look-up alone (transformers asks `importlib.util.find_spec`) imports nothing."""

    def __init__(self):
        self._finding = False

    def find_spec(self, name, path, target=None):
        if name != "tensorflow" or self._finding or "tensorflow" in sys.modules:
            return None
        self._finding = True  # the look-up below asks this finder again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _DropLoadNoise(logging.Filter):
    """transformers warns that its TF classes leave in v5 (tfgen pins <5 on purpose), and reports at warning
    level that loading a complete tf_model.h5 went well; missing or unused weights are still reported."""

    _DROPPED = (
        "TensorFlow and JAX classes are deprecated",
        "All model checkpoint layers were used",
        "All the layers of TFGPT2LMHeadModel were initialized",
    )

    def filter(self, record):
        message = record.getMessage()
        return not any(text in message for text in self._DROPPED)


if "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())
logging.getLogger("transformers.modeling_tf_utils").addFilter(_DropLoadNoise())
