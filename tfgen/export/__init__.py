"""Exports, one module per format: `saved_model` (a TF SavedModel that serves generation) and `litert`
(a LiteRT model, int8 weights by default, run by `tfgen.litert.LiteRTLM` without TensorFlow)."""

from tfgen.export.litert import QUANTIZATIONS, export_litert
from tfgen.export.saved_model import export_saved_model, serving_module

__all__ = ["QUANTIZATIONS", "export_litert", "export_saved_model", "serving_module"]
