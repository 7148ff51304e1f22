"""Chat templates render as transformers' `apply_chat_template` renders them, in a sandbox."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from tfgen.serving import chat

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# BOS, a loop control, the tojson filter and raise_exception, as real templates use them.
LLAMA_LIKE = """{{ bos_token }}{% for message in messages %}
{% if message['role'] == 'system' %}{% continue %}{% endif %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('roles must alternate user/assistant') }}
{% endif %}
[{{ message['role'] }}] {{ message['content'] | trim }} {{ message | tojson }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}

{% endfor %}"""
CHATS = [
    [{"role": "user", "content": "안녕하세요?"}],
    [
        {"role": "system", "content": "친절하게 답하세요."},
        {"role": "user", "content": "서울은 어때요?"},
        {"role": "assistant", "content": "좋아요."},
        {"role": "user", "content": "  날씨는요?  "},
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A tokenizer transformers loads, with BOS and EOS tokens: a word-level tokenizer.json of four tokens."""
    directory = tmp_path_factory.mktemp("hf-tokenizer")
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "a": 3}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": {
                    "__type": "AddedToken",
                    "content": "</s>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                },
            }
        )
    )
    return directory


def _transformers(directory, template, messages, add_generation_prompt=True):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize(
    "template",
    [CHATML, LLAMA_LIKE, (chat.TEMPLATES_DIR / "interview.jinja").read_text()],
    ids=["chatml", "llama-like", "interview"],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers_apply_chat_template(hf_tokenizer_dir, template, add_generation_prompt):
    (hf_tokenizer_dir / "chat.jinja").write_text(template)
    served = chat.load(hf_tokenizer_dir, hf_tokenizer_dir / "chat.jinja")
    assert served.bos_token == "<s>" and served.eos_token == "</s>"
    for messages in CHATS:
        if template is LLAMA_LIKE and messages is CHATS[1]:
            messages = messages[1:]
        assert served.render(messages, add_generation_prompt) == _transformers(
            hf_tokenizer_dir, template, messages, add_generation_prompt
        )


def test_the_models_own_template_is_read_from_tokenizer_config(hf_tokenizer_dir, tmp_path):
    config = json.loads((hf_tokenizer_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    assert chat.load(tmp_path).render(CHATS[0]) == _transformers(hf_tokenizer_dir, CHATML, CHATS[0])
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    assert chat.load(tmp_path).source == CHATML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat.load(tmp_path) is None


def test_the_interview_template_is_seed_004s_prompt():
    template = chat.ChatTemplate((chat.TEMPLATES_DIR / "interview.jinja").read_text())
    messages = [
        {"role": "system", "content": "요즘 굉장히 핫한 인공지능인 GPT님과 인터뷰를 나눠보겠습니다!"},
        {"role": "user", "content": "GPT님, 요즘 바쁘시죠?"},
    ]
    assert (
        template.render(messages)
        == "요즘 굉장히 핫한 인공지능인 GPT님과 인터뷰를 나눠보겠습니다!\nQ : GPT님, 요즘 바쁘시죠?\nA : "
    )
    with pytest.raises(chat.ChatTemplateError, match="not tool"):
        template.render([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",  # no Python internals
        "{{ messages.append(1) }}",  # the sandbox is immutable
        "{{ ''.__class__.__subclasses__() }}",
    ],
)
def test_templates_run_sandboxed(source):
    with pytest.raises(chat.ChatTemplateError):
        chat.ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_a_template_that_does_not_compile_is_refused(tmp_path):
    (tmp_path / "bad.jinja").write_text("{% if %}")
    with pytest.raises(chat.ChatTemplateError, match="does not compile"):
        chat.load(tmp_path, tmp_path / "bad.jinja")
