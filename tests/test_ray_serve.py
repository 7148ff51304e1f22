"""Scale-out on Ray Serve (tfgen.serving.ray): a local Ray cluster, two replicas of the tiny model's LiteRT export
(the cheaper engine: no TensorFlow in the replicas) behind Ray Serve's HTTP proxy, against a single in-process
server of the same export and against `generate_text`."""

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from starlette.testclient import TestClient

from test_serve import API_KEY, PROMPTS, _free_port, served_dir
from tfgen import cli
from tfgen.serving import models
from tfgen.serving.app import ServerSettings, create_app

REQUESTS = 16
MAX_TOKENS = 24
READY_SECONDS = 300
RAY_ACTOR_LOG = re.compile(r"(\x1b\[[0-9;]*m)?\([^)]*pid=\d+")  # "(ServeReplica:tfgen:tfgen pid=23705) INFO ..."


@pytest.fixture(scope="module")
def litert_dir(tiny_lm_dir, tmp_path_factory):
    return served_dir("litert", tiny_lm_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def settings(litert_dir):
    return ServerSettings(model_name=litert_dir.resolve().name, max_batch=8, api_key=API_KEY)


@pytest.mark.slow
def test_cli_serves_on_ray_until_sigterm(litert_dir, settings, tiny_lm, tmp_path):
    """`tfgen serve --ray` in a process of its own: the ready line, a completion through the proxy, exit 0 on
    SIGTERM. (First in the module, before `ray_url` starts a cluster of its own.)"""
    port = _free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tfgen",
                "serve",
                "--ray",
                "--ray-address",
                "local",
                "--replicas",
                "1",
                "--replica-cpus",
                "0.5",
                "--model",
                str(litert_dir),
                "--port",
                str(port),
                "--api-key",
                API_KEY,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_SECONDS
        while "replica(s) of" not in log_path.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        text = (
            _client(f"http://127.0.0.1:{port}")
            .completions.create(model=settings.model_name, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0)
            .choices[0]
            .text
        )
        assert text == tiny_lm.generate_text(PROMPTS[2], return_full_text=False, max_new_tokens=MAX_TOKENS)
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=180)
    assert returncode == 0, log_path.read_text(errors="replace")[-3000:]


@pytest.mark.slow
def test_cli_exits_2_when_the_replicas_cannot_load_the_model(litert_dir, tmp_path):
    """A model that passes the driver's checks but fails in the replicas (an export without its tokenizer): Ray
    retries the replicas, then `tfgen serve --ray` exits 2 naming the cause."""
    broken = tmp_path / "no-tokenizer"
    broken.mkdir()
    for name in ("litert.json", "model.tflite"):
        (broken / name).symlink_to(litert_dir / name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfgen",
            "serve",
            "--ray",
            "--ray-address",
            "local",
            "--replica-cpus",
            "0.5",
            "--model",
            str(broken),
            "--port",
            str(_free_port()),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=READY_SECONDS,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "tfgen: error: the replicas did not start" in result.stderr
    assert "has no tokenizer files" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def ray_url(litert_dir, settings):
    """Ray Serve's proxy in front of two replicas, on a local cluster of 2 CPUs (one a replica) that is shut down
    after the module."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from tfgen.serving.ray import APP_NAME, application

    ray.init("local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Returns once both replicas passed their first health check: the model loaded and warmed up.
        serve.run(application(str(litert_dir), settings, replicas=2), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def single(litert_dir, settings):
    """The single server's app on the same export, in this process."""
    with TestClient(create_app(lambda: models.load_model(litert_dir), settings)) as client:
        deadline = time.monotonic() + READY_SECONDS
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").text
            time.sleep(0.2)
        yield client


def _client(url, api_key=API_KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)


def _raw(url, method, path, body=None, api_key=API_KEY):
    """(status, JSON body, headers) of a request through the proxy, errors included."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(
        url + path, None if body is None else json.dumps(body).encode(), headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


@pytest.mark.slow
def test_16_concurrent_requests_spread_over_both_replicas_and_equal_generate_text(ray_url, settings, tiny_lm):
    client = _client(ray_url)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(REQUESTS)]

    def complete(prompt):
        raw = client.completions.with_raw_response.create(
            model=settings.model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        return raw.headers["x-tfgen-replica"], raw.parse().choices[0].text

    with ThreadPoolExecutor(REQUESTS) as pool:
        answers = list(pool.map(complete, prompts))
    assert len({replica for replica, _ in answers}) == 2, "one replica served every request"
    expected = {p: tiny_lm.generate_text(p, return_full_text=False, max_new_tokens=MAX_TOKENS) for p in set(prompts)}
    assert [text for _, text in answers] == [expected[p] for p in prompts]


@pytest.mark.slow
def test_stream_through_the_proxy_equals_the_single_server(ray_url, settings, single):
    chunks = list(
        _client(ray_url).completions.create(
            model=settings.model_name, prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=True
        )
    )
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    alone = single.post(
        "/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": settings.model_name, "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0},
    )
    assert "".join(c.choices[0].text for c in chunks) == alone.json()["choices"][0]["text"]


@pytest.mark.slow
def test_errors_models_and_health_are_the_single_servers(ray_url, settings, single):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    too_long = {"model": settings.model_name, "prompt": PROMPTS[0], "max_tokens": 10_000}
    cases = [  # (method, path, body, API key)
        ("POST", "/v1/completions", too_long, API_KEY),  # 400 context_length_exceeded
        ("POST", "/v1/completions", {"model": "other", "prompt": "x"}, API_KEY),  # 404 unknown model
        ("POST", "/v1/completions", {"model": settings.model_name, "prompt": "x"}, "wrong"),  # 401
        ("GET", "/v1/models", None, None),  # 401: no key
        ("GET", "/v1/nowhere", None, API_KEY),  # 404
    ]
    for method, path, body, key in cases:
        status, answer, _ = _raw(ray_url, method, path, body, api_key=key)
        alone = single.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {})
        assert (status, answer) == (alone.status_code, alone.json()), (method, path, key)
        assert 400 <= status < 500 and "message" in answer["error"]
    status, listed, _ = _raw(ray_url, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in listed["data"]] == [
        m["id"] for m in single.get("/v1/models", headers=auth).json()["data"]
    ]
    status, health, headers = _raw(ray_url, "GET", "/health", api_key=None)
    assert status == 200 and health["status"] == "ok" and health["slots"] == settings.max_batch
    assert headers["x-tfgen-replica"]


def _cli_error(capsys):
    """The CLI's stderr, which must be one line, without the log lines Ray's drivers print from the replicas of a
    cluster an earlier test started (they reach this process's stderr at any time)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if not RAY_ACTOR_LOG.match(line)]
    assert len(lines) == 1, lines
    return lines[0]


def test_ray_flags_without_ray_installed_exit_2_with_the_install_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "tfgen.serving.ray", raising=False)
    assert cli.main(["serve", "--ray", "--replicas", "2"]) == 2
    assert "pip install 'tfgen[ray]'" in _cli_error(capsys)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--replicas", "2"], "--replicas"),
        (["--ray-address", "auto"], "--ray-address"),
        (["--ray", "--replicas", "0"], "--replicas"),
        (["--ray", "--replica-cpus", "-1"], "--replica-cpus"),
    ],
)
def test_bad_ray_flags_exit_2_naming_the_flag(args, named, capsys):
    assert cli.main(["serve", *args]) == 2
    assert named in _cli_error(capsys)


def test_app_builder_refuses_unknown_arguments():
    pytest.importorskip("ray")
    from tfgen.serving.ray import app_builder

    with pytest.raises(ValueError, match="unknown argument.*replica_count.*known ones are model, api_key"):
        app_builder({"model": "ko-mini", "replica_count": "2"})
