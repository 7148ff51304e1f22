"""LoRA: trainable low-rank adapters on the attention projections of a frozen model, and PEFT's adapter files.

A target projection y = x W + b (W [in, out] in TF's layout: GPT-2's Conv1D weight and a Keras Dense kernel
alike) becomes y = x W + b + (alpha / r) (x A) B with A [in, r] and B [r, out]. A starts uniform in
±1/sqrt(in) (PEFT's Kaiming-uniform draw), B at zero, so enabling changes no output until B is trained.
`Adapters.attach` makes each target layer's own `call` add its term, so every path that runs the layer
(Keras call/fit, the decode engine's blocks over the KV cache, score, exports) runs the adapter too.

PEFT's files (`adapter_config.json`, `adapter_model.safetensors`) hold lora_A.weight [r, in] = Aᵀ and
lora_B.weight [out, r] = Bᵀ (torch Linear layout) under `base_model.model.<module>`, the module named as in
transformers' PyTorch model; `fan_in_fan_out` is true where the base weight is [in, out] (GPT-2's Conv1D).
"""

import contextlib
import json
from pathlib import Path

import numpy as np
import tensorflow as tf
from safetensors import safe_open
from safetensors.numpy import save_file

from tfgen import checkpoint

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def scaling(rank, alpha):
    """The factor of the low-rank term, alpha / r (PEFT's and KerasHub's `scaling`)."""
    return alpha / rank


def checked_rank_and_alpha(rank, alpha):
    """(rank, alpha) as ints/floats, alpha defaulting to the rank (a scaling of 1); ValueError on bad values."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"the LoRA rank must be a positive integer (e.g. 8), got {rank!r}")
    alpha = rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not alpha > 0:
        raise ValueError(f"the LoRA alpha must be a positive number (default: the rank), got {alpha!r}")
    return int(rank), alpha


def low_rank_term(x, a, b, scale):
    """scale * (x A) B for x [..., in], computed in x's dtype."""
    a, b = tf.cast(a, x.dtype), tf.cast(b, x.dtype)
    return tf.matmul(tf.matmul(x, a), b) * tf.cast(scale, x.dtype)


def merged_kernel(kernel, a, b, scale):
    """W + scale * A B (numpy, TF layout [in, out]), computed in float32 and returned in W's dtype."""
    merged = kernel.astype(np.float32) + scale * (a.astype(np.float32) @ b.astype(np.float32))
    return merged.astype(kernel.dtype)


def kernel_of(layer):
    """A projection layer's weight matrix: a Keras Dense `kernel` or GPT-2's Conv1D `weight`."""
    return layer.kernel if hasattr(layer, "kernel") else layer.weight


def module_name(layer):
    """The PyTorch module name of a projection: 'transformer.h.0.attn.c_attn'."""
    return checkpoint.pytorch_name(kernel_of(layer).name).removesuffix(".weight")


class Adapters(tf.keras.layers.Layer):
    """A and B (float32, trainable) for each target projection layer; `attach` makes the targets use them.

    The targets (the family's `lora_layers()`) are passed to each method rather than kept, so that Keras does
    not track their weights as this layer's.
    """

    def __init__(self, targets, rank, alpha=None):
        super().__init__(name="lora", dtype="float32")
        self.rank, self.alpha = checked_rank_and_alpha(rank, alpha)
        self.module_names = [module_name(layer) for layer in targets]
        self.fan_in_fan_out = not checkpoint.is_dense_kernel(kernel_of(targets[0]))
        self.pairs = []
        for layer, module in zip(targets, self.module_names):
            n_in, n_out = kernel_of(layer).shape
            bound = 1.0 / np.sqrt(n_in)
            a = self.add_weight(
                f"{module}.lora_A", [n_in, self.rank], initializer=tf.keras.initializers.RandomUniform(-bound, bound)
            )
            b = self.add_weight(f"{module}.lora_B", [self.rank, n_out], initializer="zeros")
            self.pairs.append((a, b))

    @property
    def scale(self):
        return scaling(self.rank, self.alpha)

    def attach(self, targets):
        """Each target's call returns its base output plus its low-rank term (done once, when LoRA is enabled)."""
        for layer, (a, b) in zip(targets, self.pairs):
            layer.call = _adapted_call(layer.call, a, b, self.scale)

    @contextlib.contextmanager
    def merged_into_base(self, targets):
        """Inside the block the target kernels hold W + scale * A B (for writing merged files); after it,
        exactly their old values. Outputs computed inside would count the adapters twice."""
        originals = [kernel_of(layer).numpy() for layer in targets]
        try:
            for layer, original, (a, b) in zip(targets, originals, self.pairs):
                kernel_of(layer).assign(merged_kernel(original, a.numpy(), b.numpy(), self.scale))
            yield
        finally:
            for layer, original in zip(targets, originals):
                kernel_of(layer).assign(original)

    def peft_config(self, base_model_name_or_path):
        """adapter_config.json's fields, as PEFT's LoraConfig writes and reads them."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": sorted({module.rsplit(".", 1)[1] for module in self.module_names}),
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": "none",
            "use_rslora": False,
            "inference_mode": True,
        }

    def peft_variables(self):
        """[(PEFT key, variable)] of every A and B: 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight'."""
        return [
            (f"{_PEFT_PREFIX}{module}.lora_{letter}.weight", variable)
            for module, pair in zip(self.module_names, self.pairs)
            for letter, variable in zip("AB", pair)
        ]

    def peft_tensors(self):
        """{PEFT key: float32 array in torch Linear layout ([r, in] for A, [out, r] for B)}."""
        return {key: np.ascontiguousarray(variable.numpy().T) for key, variable in self.peft_variables()}

    def write(self, directory, base_model_name_or_path):
        """The PEFT adapter files, written into an existing directory (not atomically)."""
        directory = Path(directory)
        config = json.dumps(self.peft_config(base_model_name_or_path), indent=2) + "\n"
        (directory / ADAPTER_CONFIG_FILE).write_text(config, encoding="utf-8")
        save_file(self.peft_tensors(), str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})

    def read(self, directory):
        """Assigns A and B from PEFT adapter files whose rank, alpha and targets are these adapters'."""
        config = read_peft_config(directory)
        expected = self.peft_config(None)
        for field in ("r", "lora_alpha", "target_modules"):
            found = sorted(config[field]) if field == "target_modules" else config[field]
            if found != expected[field]:
                raise ValueError(
                    f"{Path(directory) / ADAPTER_CONFIG_FILE} has {field} {config[field]!r}, these "
                    f"adapters {expected[field]!r}; enable LoRA with the adapter's settings"
                )
        path = Path(directory) / ADAPTER_WEIGHTS_FILE
        with safe_open(str(path), framework="numpy") as tensors:
            keys = set(tensors.keys())
            for key, variable in self.peft_variables():
                if key not in keys:
                    raise ValueError(f"{path} lacks {key}; is it an adapter of this model?")
                value = tensors.get_tensor(key).T
                if list(value.shape) != variable.shape.as_list():
                    raise ValueError(
                        f"{path}: {key} has shape {list(value.shape)[::-1]}, this model expects "
                        f"{variable.shape.as_list()[::-1]}; is it an adapter of this model?"
                    )
                variable.assign(value.astype(np.float32))


def _adapted_call(base_call, a, b, scale):
    def call(inputs, *args, **kwargs):
        return base_call(inputs, *args, **kwargs) + low_rank_term(inputs, a, b, scale)

    return call


def read_peft_config(directory):
    """adapter_config.json of a PEFT LoRA adapter directory, checked for what tfgen can apply."""
    path = Path(directory) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG_FILE}; pass a PEFT LoRA adapter directory")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} is a {config.get('peft_type')!r} adapter; tfgen loads LoRA adapters only")
    if config.get("use_rslora") or config.get("use_dora") or config.get("bias", "none") != "none":
        raise ValueError(
            f"{path} uses rsLoRA, DoRA or trained biases, which tfgen does not apply; "
            'use a plain LoRA adapter (use_rslora false, use_dora false, bias "none")'
        )
    if isinstance(config.get("target_modules"), str):
        raise ValueError(f"{path} gives target_modules as a pattern; tfgen needs a list of module names")
    return config
