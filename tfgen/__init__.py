"""tfgen: GPT-2 and GPT-J text generation for TensorFlow/Keras, Korean first.

Where TensorFlow is installed, importing tfgen prepares and imports it
(tfgen._env); where it is not, only the LiteRT runtime, tfgen.litert, works.
The public names load on first use (PEP 562), so that runtime needs neither
TensorFlow nor transformers.
"""

import importlib

__version__ = "0.1.0"  # first: tfgen._env names the compile cache after it

try:
    from tfgen import _env  # noqa: F401  (must run before TensorFlow is imported)
except ImportError:  # no TensorFlow here: tfgen.litert runs without it
    pass

_PUBLIC = {
    "CausalLM": "tfgen.model",
    "GPT2LM": "tfgen.model",
    "GPTJLM": "tfgen.model",
    "default_model_path": "tfgen.model",
    "Tokenizer": "tfgen.tokenizer",
    "export_saved_model": "tfgen.export",
    "export_litert": "tfgen.export",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tfgen' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__():
    return sorted([*globals(), *_PUBLIC])
