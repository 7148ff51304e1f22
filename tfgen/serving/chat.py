"""Chat templates: a chat's `messages` rendered to one prompt, as transformers' `apply_chat_template` renders them.

A template is Jinja2 source: the model's `chat_template` (its tokenizer_config.json) or a file given to
`tfgen serve --chat-template`. It renders in a sandbox (`ImmutableSandboxedEnvironment`: a template reads its
variables and calls no Python of its own) with transformers' settings and names: `trim_blocks`, `lstrip_blocks`,
the loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, and the variables
`messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
"""

import dataclasses
import datetime
import functools
import json
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """A template that does not compile, or that fails on a chat (its `raise_exception`, a sandbox violation)."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def compiled(source):
    """The template of `source` in transformers' sandboxed environment; ChatTemplateError if it does not compile."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"the chat template does not compile: {error}") from None


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = None
    eos_token: str = None

    def render(self, messages, add_generation_prompt=True):
        """The prompt of `messages` (a list of {role, content}); ChatTemplateError where the template refuses it."""
        try:
            return compiled(self.source).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"the chat template failed on these messages: {error}") from None


def _token_text(token):
    """A special token of tokenizer_config.json: a string, or transformers' {"content": ...} object."""
    return token.get("content") if isinstance(token, dict) else token


def _default_source(chat_template):
    """tokenizer_config.json's `chat_template`: a string, or a list of named ones (the one named "default")."""
    if isinstance(chat_template, list):
        named = {entry.get("name"): entry.get("template") for entry in chat_template if isinstance(entry, dict)}
        return named.get("default")
    return chat_template


def load(model_dir, template_file=None):
    """The ChatTemplate to serve: `template_file`'s, else the model's `chat_template`, with the model's BOS and EOS
    tokens; None if neither exists. Raises ChatTemplateError (or OSError) for a template that cannot serve."""
    config_path = Path(model_dir) / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if template_file is not None:
        source = Path(template_file).expanduser().read_text(encoding="utf-8")
    else:
        source = _default_source(config.get("chat_template"))
    if not source:
        return None
    compiled(source)
    return ChatTemplate(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))
