"""What the server runs a model through: `tokenizer`, `decode_rows(slots, prefix_cache)` (an object with
serving.rows' interface; `prefix_cache`: a serving.prefix_cache.PrefixCache or None) and `next_token_logprobs(ids, start)`.

`XLAModel` serves a `CausalLM` on the XLA decode state (`serving.rows.StateRows`); a `tfgen.litert.LiteRTLM`
has these itself and serves a LiteRT export on its own rows, in a process that never imports TensorFlow.
`load_model` picks one for a directory.
"""

from pathlib import Path

import numpy as np

from tfgen.litert import is_litert_dir, read_config


class XLAModel:
    """A `CausalLM` (TensorFlow)."""

    def __init__(self, lm):
        self.lm = lm
        self.tokenizer = lm.tokenizer

    def decode_rows(self, slots, prefix_cache=None):
        from tfgen.serving.rows import StateRows

        return StateRows(self.lm, slots, prefix_cache)

    def next_token_logprobs(self, ids, start):
        """log-softmax of the logits at positions start..len(ids)-2: each a [vocab] row, as a numpy array."""
        import tensorflow as tf

        return tf.nn.log_softmax(self.lm(np.array([ids], np.int32))[0, start:-1]).numpy()


def resolve(model, slots):
    """A LiteRT export's directory as it is; otherwise what `CausalLM.from_pretrained` would load. Checked now, so
    a missing model, or an export of fewer rows than the server's `slots`, fails before the server starts."""
    path = Path(model).expanduser()
    if is_litert_dir(path):
        rows = read_config(path)["row_tiers"][-1]
        if slots > rows:
            raise ValueError(
                f"{path} decodes at most {rows} rows at once, fewer than --max-batch {slots}; pass "
                f"--max-batch {rows} or export with --rows {slots}"
            )
        return path
    from tfgen.model import resolve_model_dir

    return resolve_model_dir(model)


def load_model(directory):
    """The served model of a `resolve`d directory: LiteRT for an export, else the checkpoint through XLA."""
    if is_litert_dir(directory):
        from tfgen.litert import LiteRTLM

        model = LiteRTLM(directory)
    else:
        from tfgen.model import CausalLM

        model = XLAModel(CausalLM.from_pretrained(directory))
    if model.tokenizer is None:
        raise ValueError(f"{directory} has no tokenizer files; save the model with its tokenizer")
    return model
