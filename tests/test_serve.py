"""`tfgen serve` as its clients see it: a real server process on 127.0.0.1, OpenAI's own client, a real browser."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import GPT2Config

from test_litert import BLOCK_TENSORFLOW
from test_penalties import reference_greedy
from tfgen import GPT2LM, cli, export_litert
from tfgen.serving import chat, protocol
from tfgen.serving.scheduler import find_stop, settled_text
from tiny_model import text_of_tokens

API_KEY = "test-key"
ENGINES = ["xla", "litert"]  # `tfgen serve` on a checkpoint (XLA), and on a LiteRT export without TensorFlow
SERVE_WITHOUT_TENSORFLOW = BLOCK_TENSORFLOW + "from tfgen.cli import main; sys.exit(main(sys.argv[1:]))"
STARTUP_SECONDS = 600
HANGUL = re.compile("[가-힣]")
INTERVIEW = chat.TEMPLATES_DIR / "interview.jinja"
CHAT = [
    {"role": "system", "content": "요즘 굉장히 핫한 인공지능인 GPT님과 인터뷰를 나눠보겠습니다!"},
    {"role": "user", "content": "GPT님, 요즘 바쁘시죠?"},
]
PROMPTS = ["대한민국의 수도는", "영화가 정말", "옛날 옛적에", "오늘 날씨는", "서울은", "이 책은", "우리는", "그는 집에"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, path, timeout=10):
    with urllib.request.urlopen(url + path, timeout=timeout) as response:
        return response.status, response.read().decode()


class ServerProcess:
    """`python -m tfgen serve` on a free port of 127.0.0.1, waited for until /health says ok (`python`: which
    interpreter's tfgen; `without_tensorflow`: in a process where importing TensorFlow fails)."""

    def __init__(self, model_dir, log_path, *args, python=sys.executable, without_tensorflow=False):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [
                python,
                *(["-c", SERVE_WITHOUT_TENSORFLOW] if without_tensorflow else ["-m", "tfgen"]),
                "serve",
                "--model",
                str(model_dir),
                "--port",
                str(self.port),
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert self.process.poll() is None, f"the server exited during startup: {self.log_tail()}"
            try:
                if json.loads(_get(self.url, "/health")[1])["status"] == "ok":
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, f"the server did not become ready: {self.log_tail()}"
            time.sleep(0.5)

    def log_tail(self):
        return self.log_path.read_text(errors="replace")[-2000:]

    def client(self, api_key=API_KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def metric(self, name, **labels):
        for family in text_string_to_metric_families(_get(self.url, "/metrics")[1]):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=120)
        self.log.close()


def served_dir(engine, model_dir, tmp_path_factory):
    """What `tfgen serve --model` is given for `engine`: the checkpoint itself, or its float32 LiteRT export at the
    model's full context (so its greedy tokens are the checkpoint's)."""
    if engine == "xla":
        return model_dir
    lm = GPT2LM.from_pretrained(model_dir)
    return export_litert(
        lm, tmp_path_factory.mktemp("litert") / model_dir.name, quantize="none", capacity=lm.net.context
    )


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(engine, tiny_lm_dir, tmp_path_factory):
    return served_dir(engine, tiny_lm_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def server(engine, model_dir, tmp_path_factory):
    process = ServerProcess(
        model_dir,
        tmp_path_factory.mktemp("serve") / "server.log",
        "--max-batch",
        "16",
        "--api-key",
        API_KEY,
        "--chat-template",
        str(INTERVIEW),
        without_tensorflow=engine == "litert",
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def model_name(model_dir):
    return model_dir.resolve().name


def _greedy(client, model_name, prompt, max_tokens=24, **kwargs):
    return client.completions.create(model=model_name, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)


def test_greedy_completion_equals_generate_text(client, model_name, tiny_lm):
    for prompt in PROMPTS[:3]:
        response = _greedy(client, model_name, prompt)
        expected = tiny_lm.generate_text(prompt, return_full_text=False, max_new_tokens=24)
        assert response.choices[0].text == expected
        assert response.id.startswith("cmpl-") and response.object == "text_completion"
        assert response.model == model_name
        completion_ids = tiny_lm.complete([prompt], max_new_tokens=24)[0][0].new_token_ids
        assert response.usage.completion_tokens == len(completion_ids)
        assert response.usage.prompt_tokens == len(tiny_lm.tokenizer.encode(prompt))
        eos = tiny_lm.config.eos_token_id
        assert response.choices[0].finish_reason == ("stop" if completion_ids[-1] == eos else "length")


def test_stream_chunks_join_to_the_completion(client, model_name, tiny_lm):
    prompt = PROMPTS[0]
    chunks = list(client.completions.create(model=model_name, prompt=prompt, max_tokens=40, temperature=0, stream=True))
    assert len(chunks) > 2  # pieces as they are decoded, then the finish_reason
    assert "".join(c.choices[0].text for c in chunks) == tiny_lm.generate_text(
        prompt, return_full_text=False, max_new_tokens=40
    )
    assert [c.choices[0].finish_reason for c in chunks][-1] in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_ends_with_done(server, model_name):
    body = json.dumps({"model": model_name, "prompt": PROMPTS[1], "max_tokens": 8, "stream": True}).encode()
    request = urllib.request.Request(
        server.url + "/v1/completions",
        body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().splitlines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"


def test_stop_sequence_cuts_the_text(client, model_name):
    full = _greedy(client, model_name, PROMPTS[0], max_tokens=40).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    response = _greedy(client, model_name, PROMPTS[0], max_tokens=40, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=model_name, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def test_prompt_list_n_and_seed(client, model_name):
    response = client.completions.create(
        model=model_name,
        prompt=PROMPTS[:2],
        n=3,
        max_tokens=12,
        temperature=1.0,
        top_p=0.9,
        extra_body={"top_k": 40, "min_tokens": 12},  # an unseeded sample may otherwise end at once
    )
    assert [c.index for c in response.choices] == list(range(6))
    assert all(c.text and c.finish_reason == "length" for c in response.choices)
    seeded = [
        [
            c.text
            for c in client.completions.create(model=model_name, prompt=PROMPTS[2], max_tokens=16, seed=7, n=2).choices
        ]
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]  # the request repeats exactly
    assert seeded[0][0] != seeded[0][1]  # its choices differ
    alone = client.completions.create(model=model_name, prompt=PROMPTS[2], max_tokens=16, seed=7).choices[0].text
    assert alone == seeded[0][0]


def test_logprobs_of_greedy_tokens_are_the_best(client, model_name):
    response = _greedy(client, model_name, PROMPTS[3], max_tokens=10, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == response.usage.completion_tokens
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_extras_are_applied(client, model_name, tiny_lm):
    response = _greedy(
        client,
        model_name,
        PROMPTS[0],
        max_tokens=30,
        extra_body={"no_repeat_ngram_size": 2, "repetition_penalty": 1.3, "min_tokens": 30},
    )
    expected = tiny_lm.generate_text(
        PROMPTS[0],
        return_full_text=False,
        max_new_tokens=30,
        no_repeat_ngram_size=2,
        repetition_penalty=1.3,
        min_new_tokens=30,
    )
    assert response.choices[0].text == expected
    assert response.usage.completion_tokens == 30


def test_chat_completion_equals_generate_text_on_the_rendered_prompt(client, model_name, tiny_lm, tiny_lm_dir):
    prompt = chat.load(tiny_lm_dir, INTERVIEW).render(CHAT)
    assert prompt.endswith("Q : GPT님, 요즘 바쁘시죠?\nA : ")
    expected = tiny_lm.generate_text(prompt, return_full_text=False, max_new_tokens=24)
    response = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=24, temperature=0)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == len(tiny_lm.tokenizer.encode(prompt))
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=CHAT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == response.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == response.usage.model_dump()


def test_chat_messages_are_checked(client, model_name):
    for messages in (
        [],
        [{"role": "user"}],
        [{"role": "tool", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model=model_name, messages=messages, max_tokens=2)
        assert raised.value.body["param"] == "messages"
    text_parts = [{"role": "user", "content": [{"type": "text", "text": "GPT님, "}, {"type": "text", "text": "안녕"}]}]
    assert client.chat.completions.create(model=model_name, messages=text_parts, max_tokens=2).choices


def test_completion_stream_include_usage(client, model_name):
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt=PROMPTS[:2],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    final = _greedy(client, model_name, PROMPTS[:2], max_tokens=6)
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == final.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_echo_with_max_tokens_0_scores_the_prompt(client, model_name, tiny_lm):
    text = "나는 오늘 학교에 갔다."
    scored = tiny_lm.score(text)
    for prompt in (text, tiny_lm.tokenizer.encode(text)):
        response = client.completions.create(
            model=model_name, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0
        )
        choice = response.choices[0]
        assert choice.text == tiny_lm.tokenizer.decode(tiny_lm.tokenizer.encode(text))
        assert response.usage.completion_tokens == 0 and choice.finish_reason == "length"
        logprobs = choice.logprobs
        assert logprobs.tokens == scored["tokens"]
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert logprobs.token_logprobs[1:] == pytest.approx(scored["token_logprobs"], abs=1e-4)
        assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
        assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_echo_with_new_tokens_puts_the_prompt_first(client, model_name, tiny_lm):
    plain = _greedy(client, model_name, PROMPTS[1], max_tokens=8, logprobs=1)
    echoed = _greedy(client, model_name, PROMPTS[1], max_tokens=8, logprobs=1, echo=True)
    prompt_tokens = echoed.usage.prompt_tokens
    assert (
        echoed.choices[0].text == tiny_lm.tokenizer.decode(tiny_lm.tokenizer.encode(PROMPTS[1])) + plain.choices[0].text
    )
    assert echoed.choices[0].logprobs.token_logprobs[prompt_tokens:] == pytest.approx(
        plain.choices[0].logprobs.token_logprobs, abs=1e-5
    )
    assert len(echoed.choices[0].logprobs.tokens) == prompt_tokens + plain.usage.completion_tokens
    streamed = client.completions.create(
        model=model_name, prompt=PROMPTS[1], max_tokens=8, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_token_id_prompts_equal_text_prompts(client, model_name, tiny_lm):
    ids = [tiny_lm.tokenizer.encode(p) for p in PROMPTS[:2]]
    by_text = _greedy(client, model_name, PROMPTS[:2], max_tokens=10)
    assert [c.text for c in _greedy(client, model_name, ids, max_tokens=10).choices] == [
        c.text for c in by_text.choices
    ]
    assert _greedy(client, model_name, ids[0], max_tokens=10).choices[0].text == by_text.choices[0].text


def test_penalties_and_logit_bias_equal_openai_formula(client, model_name, tiny_lm):
    tokenizer = tiny_lm.tokenizer
    prompt_ids = tokenizer.encode(PROMPTS[0])
    plain = reference_greedy(tiny_lm, prompt_ids, 24)
    cases = [
        {"presence_penalty": 0.8, "frequency_penalty": 1.5},
        {"logit_bias": {str(plain[0]): -100, str(plain[3]): 5.0}},
        {"frequency_penalty": 2.0, "logit_bias": {str(plain[1]): 3.0}},
    ]
    for case in cases:
        expected = reference_greedy(tiny_lm, prompt_ids, 24, **case)
        assert expected != plain  # big enough to change the text
        response = _greedy(client, model_name, PROMPTS[0], **case)
        assert response.usage.completion_tokens == len(expected)
        assert response.choices[0].text == tokenizer.completion(prompt_ids, expected, ()).new_text


def test_lm_eval_local_completions_loglikelihood_equals_score(
    server, model_name, tiny_lm, tiny_lm_dir, tmp_path, monkeypatch
):
    """lm-evaluation-harness's `local-completions` model, as it scores a task's answers: echo, max_tokens 1,
    logprobs 1, token-id prompts in batches; its log-likelihoods are the sums of `score`'s token log-probabilities."""
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tokenizer_dir = hf_tokenizer_dir(tiny_lm_dir, tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # what its requests send as `Authorization: Bearer`
    lm = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model=model_name,
        tokenizer_backend="huggingface",
        tokenizer=str(tokenizer_dir),
        tokenized_requests=True,
        batch_size=2,
        max_retries=1,
        use_fast_tokenizer=False,
        add_bos_token=True,
    )  # the tiny tokenizer adds BOS
    pairs = [("대한민국의 수도는", " 서울이다."), ("오늘 날씨는", " 정말 좋다."), ("그는 집에", " 갔다.")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(pairs, results):
        context_tokens = len(tiny_lm.tokenizer.encode(context))  # BOS and the context's tokens
        expected = sum(tiny_lm.score(context + continuation)["token_logprobs"][context_tokens - 1 :])
        assert logprob == pytest.approx(expected, abs=1e-4)


def hf_tokenizer_dir(model_dir, tmp_path):
    """The model's SentencePiece tokenizer as transformers loads it (`LlamaTokenizer`, BOS first as tfgen's), for
    lm-eval's huggingface tokenizer backend."""
    directory = tmp_path / "hf-tokenizer"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes((model_dir / "tokenizer.model").read_bytes())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True})
    )
    return directory


def test_wrong_or_missing_key_is_401(server, model_name):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").completions.create(model=model_name, prompt="안녕", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").models.list()
    request = urllib.request.Request(server.url + "/v1/completions", b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 401
    assert json.loads(raised.value.read())["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"max_tokens": "many"},
        {"temperature": 2.5},
        {"top_p": 0},
        {"n": 0},
        {"logprobs": 9},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"prompt": ""},
        {"prompt": [1, "a"]},
        {"prompt": [10**7]},
        {"prompt": [[1], []]},
        {"prompt": [-1]},
        {"prompt": "긴 문장 " * 200},
        {"max_tokens": 500},
        {"extra_body": {"top_k": "x"}},
        {"extra_body": {"no_repeat_ngram_size": 99}},
        {"extra_body": {"min_tokens": 50}},
        {"extra_body": {"unknown_field": 1}},
        {"extra_body": {"best_of": 2}},
        {"stream": True, "logprobs": 1},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.01},
        {"presence_penalty": "1"},
        {"logit_bias": {"abc": 1}},
        {"logit_bias": {"5": 101}},
        {"logit_bias": {"100000": 1}},
        {"logit_bias": [1]},
        {"stream_options": {"include_usage": True}},
        {"stream": True, "stream_options": {"include_usage": 1}},
    ],
)
def test_bad_request_is_400_and_the_server_keeps_serving(client, model_name, bad):
    kwargs = {"model": model_name, "prompt": "안녕하세요", "max_tokens": 4, **bad}
    with pytest.raises(openai.BadRequestError) as raised:
        result = client.completions.create(**kwargs)
        list(result)  # a stream raises when it is read
    assert raised.value.body["message"] and "Traceback" not in raised.value.body["message"]
    assert _greedy(client, model_name, "안녕하세요", max_tokens=2).choices[0].text is not None


def test_malformed_json_gets_openai_error_object(server):
    for body in (b"{not json", b"\xff\xfe", b"[1, 2]"):
        request = urllib.request.Request(
            server.url + "/v1/completions",
            body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
        )
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=30)
        assert raised.value.code == 400
        error = json.loads(raised.value.read())["error"]
        assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="안녕", max_tokens=2)


def test_models_health_and_metrics(server, client, model_name):
    assert [m.id for m in client.models.list()] == [model_name]
    assert json.loads(_get(server.url, "/health")[1])["slots"] == 16
    names = {family.name for family in text_string_to_metric_families(_get(server.url, "/metrics")[1])}
    assert {
        "tfgen_requests",
        "tfgen_completion_tokens",
        "tfgen_queue_depth",
        "tfgen_busy_slots",
        "tfgen_time_to_first_token_seconds",
        "tfgen_request_latency_seconds",
    } <= names


def test_prompts_sharing_a_prefix_reuse_it_and_say_so_in_metrics(server, client, model_name, tiny_lm, ko_lines):
    prefix = text_of_tokens(tiny_lm.tokenizer, ko_lines[-40:], 70)  # a text no other test sends
    before = {name: server.metric(f"tfgen_prefix_cache_{name}_total") for name in ("hits", "misses", "reused_tokens")}
    for suffix in (" 서울은", " 우리는"):
        response = _greedy(client, model_name, prefix + suffix, max_tokens=12)
        assert response.choices[0].text == tiny_lm.generate_text(
            prefix + suffix, return_full_text=False, max_new_tokens=12
        )
    after = {name: server.metric(f"tfgen_prefix_cache_{name}_total") for name in before}
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 1
    assert after["reused_tokens"] - before["reused_tokens"] >= 64  # the shared 70 tokens' first 4 blocks at least


@pytest.mark.slow
def test_concurrent_requests_batch_and_match_alone(client, model_name):
    """16 concurrent greedy requests against the same 16 one after another (after a round that compiles what
    their lengths need); the bound is a ratio of 0.5, between the fastest of three tries of each (on a shared
    machine any one try can stall for half a second)."""
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 2)]

    def complete(prompt):
        return _greedy(client, model_name, prompt, max_tokens=48).choices[0].text

    def timed(run):
        started = time.monotonic()
        return run(), time.monotonic() - started

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(complete, prompts))
        alone = [timed(lambda: [complete(p) for p in prompts]) for _ in range(3)]
        together = [timed(lambda: list(pool.map(complete, prompts))) for _ in range(3)]
    assert all(texts == alone[0][0] for texts, _ in alone + together)
    sequential, concurrent = min(seconds for _, seconds in alone), min(seconds for _, seconds in together)
    assert concurrent < 0.5 * sequential, (concurrent, sequential)


def _rss_mb(server):
    return psutil.Process(server.process.pid).memory_info().rss / 2**20


@pytest.mark.slow
def test_200_requests_leave_memory_flat(server, client, model_name):
    def run(count):
        for i in range(count):
            _greedy(client, model_name, PROMPTS[i % len(PROMPTS)], max_tokens=8, stream=i % 2 == 1)

    run(20)
    before = _rss_mb(server)
    run(200)
    assert _rss_mb(server) - before < 30, (before, _rss_mb(server))


@pytest.fixture(scope="module")
def long_context_dir(tiny_lm, tmp_path_factory):
    """An untrained tiny GPT-2 of context 1024: a request that holds a slot for a thousand steps."""
    config = tiny_lm.config.to_dict() | {"n_positions": 1024}
    directory = tmp_path_factory.mktemp("long-context")
    GPT2LM(GPT2Config.from_dict(config), tiny_lm.tokenizer).save_pretrained(directory)
    return directory


def _thousand_token_stream(client, model_name, prompt):
    """A greedy stream that holds its slot for a thousand steps."""
    return client.completions.create(
        model=model_name, prompt=prompt, max_tokens=1000, temperature=0, stream=True, extra_body={"min_tokens": 1000}
    )


def _dropped_stream_frees_its_slot(server, client, model_name):
    """A stream dropped after two chunks has its row cancelled and its slot freed. Its request asks for a thousand
    tokens, so the row is still running when the server sees the client go (a tiny model's hundred tokens could
    all be sent before that)."""
    cancelled = server.metric("tfgen_finished_rows_total", reason="cancelled")
    stream = _thousand_token_stream(client, model_name, PROMPTS[4])
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    deadline = time.monotonic() + 20
    while server.metric("tfgen_finished_rows_total", reason="cancelled") == cancelled:
        assert time.monotonic() < deadline, "the dropped stream's row was not cancelled"
        time.sleep(0.05)
    assert server.metric("tfgen_busy_slots") == 0
    assert json.loads(_get(server.url, "/health")[1])["busy_slots"] == 0


@pytest.mark.slow
def test_a_dropped_stream_frees_its_slot_a_full_queue_is_429_and_sigterm_drains(
    engine, long_context_dir, tmp_path_factory, tmp_path
):
    served = served_dir(engine, long_context_dir, tmp_path_factory)
    small = ServerProcess(
        served, tmp_path / "server.log", "--max-batch", "1", "--max-queue", "0", without_tensorflow=engine == "litert"
    )
    model_name = served.name
    try:
        client = small.client()
        _dropped_stream_frees_its_slot(small, client, model_name)
        stream = _thousand_token_stream(client, model_name, PROMPTS[0])
        chunks = iter(stream)
        pieces = [next(chunks).choices[0].text]
        with pytest.raises(openai.RateLimitError) as raised:
            client.completions.create(model=model_name, prompt="안녕", max_tokens=2)
        assert int(raised.value.response.headers["Retry-After"]) >= 1
        small.process.send_signal(signal.SIGTERM)
        rest = list(chunks)  # the stream in flight finishes
        assert rest[-1].choices[0].finish_reason == "length"
        pieces += [c.choices[0].text for c in rest]
        # uvicorn re-raises the SIGTERM it handled once it has shut down
        assert small.process.wait(timeout=60) in (0, -signal.SIGTERM)
        with pytest.raises(urllib.error.URLError):
            _get(small.url, "/health", timeout=5)
    finally:
        small.stop()
    assert len("".join(pieces)) > 0


def test_playground_streams_korean_in_chromium(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        driver.find_element(By.ID, "api_key").send_keys(API_KEY)
        driver.find_element(By.ID, "prompt").send_keys("대한민국의 수도는")
        max_tokens = driver.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("40")
        driver.find_element(By.ID, "generate").click()
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: HANGUL.search(d.find_element(By.ID, "completion").text))
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("끝"))
        assert HANGUL.search(driver.find_element(By.ID, "completion").text)
        # Chat mode: two turns through /v1/chat/completions, the conversation in the messages list.
        driver.find_element(By.ID, "chat_mode").click()
        driver.find_element(By.ID, "prompt").clear()
        max_tokens.clear()
        max_tokens.send_keys("12")  # two turns within the tiny model's context of 128 tokens
        for turn, message in enumerate(["GPT님, 요즘 바쁘시죠?", "무엇을 하세요?"]):
            driver.find_element(By.ID, "prompt").send_keys(message)
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d, count=2 * turn + 2: len(d.find_elements(By.CSS_SELECTOR, "#messages li")) == count)
            wait.until(lambda d: not d.find_element(By.ID, "generate").get_attribute("disabled"))
            assert driver.find_element(By.ID, "status").text.startswith("끝"), driver.find_element(By.ID, "status").text
        items = driver.find_elements(By.CSS_SELECTOR, "#messages li")
        assert [item.get_attribute("class") for item in items] == ["user", "assistant"] * 2
        assert items[0].text == "GPT님, 요즘 바쁘시죠?" and items[3].text.strip()  # a sampled reply: any text
    finally:
        driver.quit()


def test_chat_without_a_template_is_400_naming_the_flag(tiny_lm_dir):
    from starlette.testclient import TestClient

    from tfgen.serving.app import ServerSettings, create_app

    assert chat.load(tiny_lm_dir) is None  # the tiny model has no chat_template
    app = create_app(lambda: None, ServerSettings(model_name="tiny", chat_template=chat.load(tiny_lm_dir)))
    response = TestClient(app).post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT})
    assert response.status_code == 400
    assert "--chat-template" in response.json()["error"]["message"]


def test_serve_cli_rejects_bad_arguments(tmp_path, capsys):
    result = subprocess.run(
        [sys.executable, "-m", "tfgen", "serve", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no model directory" in result.stderr
    for args in (["--max-batch", "0"], ["--max-queue", "-1"], ["--request-timeout", "0"]):
        assert cli.main(["serve", *args]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    for template in (broken, tmp_path / "missing.jinja"):
        assert cli.main(["serve", "--model", "ko-mini", "--chat-template", str(template)]) == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_serve_refuses_more_slots_than_a_litert_export_has(tiny_lm, tmp_path, capsys):
    export = export_litert(tiny_lm, tmp_path / "litert", quantize="none", capacity=32, rows=2)
    assert cli.main(["serve", "--model", str(export), "--max-batch", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at most 2 rows" in err and "--rows 4" in err


def test_settled_text_holds_back_partial_characters_and_stop_prefixes():
    assert settled_text("안녕\ufffd", (), final=False) == 2
    assert settled_text("안녕하세", ("하세요",), final=False) == 2
    assert settled_text("안녕하세", ("하세요",), final=True) == 4
    assert find_stop("가나다라", ("다", "나다")) == 1 and find_stop("가나", ("라",)) is None


def test_request_checks_name_the_field():
    with pytest.raises(protocol.APIError) as raised:
        protocol.parse_completion_request({"model": "m", "prompt": "p", "top_p": 1.5}, "m")
    assert raised.value.param == "top_p" and raised.value.status == 400
    request = protocol.parse_completion_request(
        {"model": "m", "prompt": ["a", "b"], "temperature": 0, "stop": "x"}, "m"
    )
    assert not request.sampling.do_sample and request.prompts == ("a", "b") and request.stop == ("x",)
