"""tfgen: GPT-2 text generation for TensorFlow/Keras, Korean first."""

__version__ = "0.1.0"  # first: tfgen._env names the compile cache after it

from tfgen import _env  # noqa: F401  (must run before TensorFlow is imported)
from tfgen.tokenizer import Tokenizer
from tfgen.model import GPT2LM, default_model_path
from tfgen.export import export_saved_model

__all__ = ["GPT2LM", "Tokenizer", "default_model_path", "export_saved_model"]
