"""Model families: one module per architecture behind the small interface of `base.Family`."""

from tfgen.families.base import Family
from tfgen.families.gpt2 import GPT2
from tfgen.families.gptj import GPTJ

FAMILIES = {family.model_type: family for family in (GPT2, GPTJ)}


def family_of(model_type, where="config.json"):
    """The `Family` class of a config's model_type; ValueError listing the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"{where} has model_type {model_type!r}, which tfgen does not support; "
            f"supported model types: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "GPT2", "GPTJ", "family_of"]
