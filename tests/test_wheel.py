"""tfgen as a user installs it: the sdist and wheel `python -m build` makes, the wheel installed (not editable)
into new virtual environments, one beside TensorFlow and one where TensorFlow is absent."""

import json
import os
import subprocess
import sys
import tarfile
import venv

import pytest

from test_serve import ServerProcess, _get
from tfgen import __version__, export_litert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements", "test-lock.txt")
PROMPT = "안녕하세요"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}

pytestmark = pytest.mark.slow


def _run(*argv, **kwargs):
    run = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=900, **kwargs)
    assert run.returncode == 0, f"{argv}: {run.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    assert wheel.name == f"tfgen-{__version__}-py3-none-any.whl"
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "setup.cfg", "tfgen/models/ko-mini/model.safetensors"} <= names
    return wheel


def _environment(path, wheel, system_site_packages, *requirements):
    """A new virtual environment holding the wheel (no dependencies resolved), and `requirements` at the lock's
    versions; its python."""
    venv.create(path, system_site_packages=system_site_packages, with_pip=True)
    python = path / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", wheel)
    if requirements:
        _run(python, "-m", "pip", "install", "--quiet", "-c", LOCK, *requirements)
    return python


@pytest.fixture(scope="module")
def with_tensorflow(wheel, tmp_path_factory):
    """The wheel in an environment that sees this one's packages (TensorFlow, transformers ...)."""
    return _environment(tmp_path_factory.mktemp("venv-tf"), wheel, True)


def test_the_installed_wheel_generates_offline_with_the_embedded_model(with_tensorflow, tmp_path):
    where = _run(with_tensorflow, "-c", "import tfgen; print(tfgen.__file__)", cwd=tmp_path).stdout.strip()
    assert where.startswith(str(with_tensorflow.parent.parent)), where  # the wheel's copy, not the checkout
    tfgen = with_tensorflow.parent / "tfgen"
    assert _run(tfgen, "--version", cwd=tmp_path).stdout.strip() == f"tfgen {__version__}"
    out = _run(tfgen, "generate", PROMPT, "--max-new-tokens", "8", cwd=tmp_path, env=OFFLINE).stdout
    assert out.startswith(PROMPT) and len(out.strip()) > len(PROMPT)


def test_the_installed_wheel_serves_its_playground(with_tensorflow, tmp_path):
    server = ServerProcess("ko-mini", tmp_path / "server.log", "--max-batch", "1", python=with_tensorflow)
    try:
        status, page = _get(server.url, "/")
        assert status == 200 and "tfgen 놀이터" in page
        assert _get(server.url, "/static/playground.js")[0] == 200
    finally:
        server.stop()


def test_litert_runs_from_the_wheel_where_tensorflow_is_absent(wheel, tiny_lm, tmp_path):
    python = _environment(tmp_path / "venv", wheel, False, "ai-edge-litert", "numpy", "sentencepiece")
    absent = "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorflow') is not None)"
    _run(python, "-c", absent)
    export = export_litert(tiny_lm, tmp_path / "litert", quantize="int8", capacity=64)
    tfgen = python.parent / "tfgen"
    assert _run(tfgen, "--version", cwd=tmp_path).stdout.strip() == f"tfgen {__version__}"
    out = _run(
        tfgen, "generate", "대한민국의 수도는", "--model", export, "--max-new-tokens", "8", "--json", cwd=tmp_path
    ).stdout
    assert json.loads(out)
