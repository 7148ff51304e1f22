"""tfgen: GPT-2 and GPT-J text generation for TensorFlow/Keras, Korean first.

Importing tfgen prepares TensorFlow's environment (tfgen._env) but does not
import it: the public names load on first use (PEP 562), and the LiteRT
runtime, tfgen.litert, needs neither TensorFlow nor transformers.
"""

import importlib

__version__ = "0.1.0"  # first: tfgen._env names the compile cache after it

from tfgen import _env  # noqa: F401,E402  (must run before TensorFlow is imported)

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
