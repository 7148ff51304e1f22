"""Tensor dimensions for traces whose shapes may be unknown (the export's dynamic batch and prompt length)."""

import tensorflow as tf


def dims(tensor):
    """The dimensions of `tensor`: Python ints where its static shape knows them, scalar tensors where not.

    In-process traces see static shapes and stay plain ints; a trace with a
    dynamic batch or prompt length gets tensors, which XLA still resolves to
    constants when it compiles for the concrete shapes of a call.
    """
    dynamic = tf.shape(tensor)
    return [dynamic[i] if size is None else size for i, size in enumerate(tensor.shape)]


def per_row(setting, rows, dtype):
    """A decode setting as [rows]: given per row ([rows]), or one value for every row (a scalar, broadcast)."""
    return tf.broadcast_to(tf.cast(setting, dtype), [rows])
