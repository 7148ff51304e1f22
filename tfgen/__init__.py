"""tfgen: GPT-2 text generation for TensorFlow/Keras, Korean first.

The public names load on first use (PEP 562), so `import tfgen.litert`, the
LiteRT runtime, works where TensorFlow is not installed. The modules that
build models (model, data, training, export) import `tfgen._env` first.
"""

import importlib

_PUBLIC = {
    "GPT2LM": "tfgen.model",
    "default_model_path": "tfgen.model",
    "Tokenizer": "tfgen.tokenizer",
    "export_saved_model": "tfgen.export",
    "export_litert": "tfgen.export",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tfgen' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__():
    return sorted([*globals(), *_PUBLIC])
