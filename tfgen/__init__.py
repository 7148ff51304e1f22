"""tfgen: GPT-2 text generation for TensorFlow/Keras, Korean first."""

from tfgen import _env  # noqa: F401  (must run before TensorFlow is imported)
from tfgen.tokenizer import Tokenizer
from tfgen.model import GPT2LM

__all__ = ["GPT2LM", "Tokenizer"]
__version__ = "0.1.0"
