"""tfgen: GPT-2 and GPT-J text generation for TensorFlow/Keras, Korean first."""

__version__ = "0.1.0"  # first: tfgen._env names the compile cache after it

from tfgen import _env  # noqa: F401  (must run before TensorFlow is imported)
from tfgen.tokenizer import Tokenizer
from tfgen.model import GPT2LM, GPTJLM, CausalLM, default_model_path
from tfgen.export import export_saved_model

__all__ = ["CausalLM", "GPT2LM", "GPTJLM", "Tokenizer", "default_model_path", "export_saved_model"]
