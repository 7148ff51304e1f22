"""Environment set before TensorFlow is first imported.

transformers' TF models are written for Keras 2, which TensorFlow 2.16+ only
uses when TF_USE_LEGACY_KERAS is set (tf-keras provides it). TF's C++ INFO
lines are hidden through TF_CPP_MIN_LOG_LEVEL; both are defaults that the
user's own environment overrides.

A few start-up lines (the CUDA probe on a machine without a GPU) are written
before TF reads TF_CPP_MIN_LOG_LEVEL, so the first import of TensorFlow runs
with stderr captured and everything but those known lines is written back.
"""

import logging
import os
import re
import sys
import tempfile
import warnings

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# In Jupyter without ipywidgets, tqdm.auto (imported by transformers) warns that it falls back to text bars.
warnings.filterwarnings("ignore", message="IProgress not found")

_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc.*Could not find cuda drivers"
    r"|cuda_platform\.cc.*failed call to cuInit|cpu_feature_guard\.cc|To enable the following instructions"
    r"|oneDNN custom operations are on"
)


def _import_tensorflow_quietly():
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow

            tensorflow.config.list_physical_devices("GPU")  # the CUDA probe logs here
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not _STARTUP_NOISE.search(line)
            ]
            sys.stderr.write("".join(kept))


class _DropLoadNoise(logging.Filter):
    """transformers warns that its TF classes leave in v5 (tfgen pins <5 on purpose), and reports at warning
    level that loading a complete tf_model.h5 went well; missing or unused weights are still reported."""

    _DROPPED = ("TensorFlow and JAX classes are deprecated", "All model checkpoint layers were used",
                "All the layers of TFGPT2LMHeadModel were initialized")

    def filter(self, record):
        message = record.getMessage()
        return not any(text in message for text in self._DROPPED)


_import_tensorflow_quietly()
logging.getLogger("transformers.modeling_tf_utils").addFilter(_DropLoadNoise())
