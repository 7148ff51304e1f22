"""The documentation is checked like code: the site builds strictly, its figures are generated, its examples run.

- `mkdocs build --strict` (a broken link, anchor or API reference fails it);
- docs/performance.md is exactly what benchmarks/report.py writes from benchmarks/results/*.json;
- every ```python block of README.md, docs/index.md and docs/guides/*.md runs on the embedded model: a page's
  blocks in order, in one namespace, in one fresh process, in a temporary directory; ```bash blocks whose every
  line is a `tfgen ...` command (or a printf piped into one) run too. A block preceded by `<!-- no-run: why -->`
  is skipped (CONTRIBUTING.md).
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "docs" / "index.md", *sorted((REPO / "docs" / "guides").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
NO_RUN = re.compile(r"<!--\s*no-run:\s*\S.*?-->\s*$")
CLI_LINE = re.compile(r"^(tfgen |printf .*\| *tfgen )")
BLOCK_TIMEOUT_S = 900

sys.path.insert(0, str(REPO / "benchmarks"))
import report  # noqa: E402


def code_blocks(text, language):
    """(line number, code) of each fenced block in `language` not marked no-run on the line before its fence."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if match.group(1) == language and not NO_RUN.search(before):
            blocks.append((text.count("\n", 0, match.start()) + 1, match.group(2)))
    return blocks


def cli_commands(code):
    """The commands of a bash block, continuation lines joined, or None when one is not a tfgen command."""
    commands = [line.split("  #")[0].strip() for line in code.replace("\\\n", " ").splitlines()]
    commands = [command for command in commands if command and not command.startswith("#")]
    return commands if commands and all(CLI_LINE.match(command) for command in commands) else None


def _env():
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path)


def _page_id(path):
    return str(path.relative_to(REPO))


RUNNER = textwrap.dedent("""
    import json, sys
    namespace = {"__name__": "__main__"}
    for label, code in json.load(sys.stdin):
        exec(compile(code, label, "exec"), namespace)
""")


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks(p.read_text(), "python")], ids=_page_id)
def test_python_blocks_run(page, tmp_path):
    import json

    blocks = [(f"{_page_id(page)}:{line}", code) for line, code in code_blocks(page.read_text(), "python")]
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        text=True,
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]


CLI_BLOCKS = [
    (page, line, commands)
    for page in PAGES
    for line, code in code_blocks(page.read_text(), "bash")
    if (commands := cli_commands(code))
]


@pytest.mark.slow
@pytest.mark.parametrize("page, line, commands", CLI_BLOCKS, ids=[f"{_page_id(p)}:{n}" for p, n, _ in CLI_BLOCKS])
def test_cli_blocks_run(page, line, commands, tmp_path):
    script = f'tfgen() {{ "{sys.executable}" -m tfgen "$@"; }}\nset -e -o pipefail\n' + "\n".join(commands)
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip(), "a documented command printed nothing"


def test_no_run_marks_give_a_reason_and_precede_a_block():
    for page in [*PAGES, *sorted((REPO / "docs").glob("*.md"))]:
        lines = page.read_text().splitlines()
        for number, text in enumerate(lines):
            if "no-run" in text and text.startswith("<!--"):
                assert NO_RUN.search(text), f"{page}:{number + 1}: write <!-- no-run: REASON -->"
                assert number + 1 < len(lines) and lines[number + 1].startswith("```"), (
                    f"{page}:{number + 1}: a no-run mark must be on the line just before a code fence"
                )


def test_block_extraction_honours_no_run():
    text = "x\n```python\na = 1\n```\n<!-- no-run: hub -->\n```python\nb = 2\n```\n```bash\ntfgen generate x\n```\n"
    assert code_blocks(text, "python") == [(2, "a = 1\n")]
    assert cli_commands("tfgen generate a \\\n    --json   # note\nprintf 'x' | tfgen generate\n") == [
        "tfgen generate a      --json",
        "printf 'x' | tfgen generate",
    ]
    assert cli_commands("pip install tfgen\ntfgen generate x\n") is None


LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#+\s+(.+?)\s*$", re.M)


def test_readme_links_resolve():
    """README.md is not part of the site, so mkdocs does not check it: each relative link's file and anchor exist."""
    from markdown.extensions.toc import slugify

    for target in LINK.findall((REPO / "README.md").read_text()):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        file = REPO / path if path else REPO / "README.md"
        assert file.exists(), f"README.md links to {target}: no such file"
        if anchor:
            slugs = {slugify(heading, "-") for heading in HEADING.findall(file.read_text())}
            assert anchor in slugs, f"README.md links to {target}: no such heading in {path}"


def test_readme_is_a_front_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200, "README.md is a front page: move detail to docs/"


def test_performance_page_is_current():
    assert report.PAGE.read_text() == report.page(), "docs/performance.md is out of date: python benchmarks/report.py"


def test_performance_page_shows_the_newest_quiet_run(tmp_path):
    machine = {"cpu": "CPU", "cores": 2, "usable_cores": 2, "date": "", "python": "3.11", "versions": {}}
    for name, date, load, clients in [
        ("old", "2026-01-01T00:00:00+00:00", 0.5, 1),
        ("new-busy", "2026-03-01T00:00:00+00:00", 5.0, 2),
        ("new", "2026-02-01T00:00:00+00:00", 1.0, 3),
    ]:
        record = {
            "machine": dict(machine, date=date, load_average=[load, load, load]),
            "command": f"python benchmarks/serve_speed.py --{name}",
            "settings": {},
            "rows": [{"model": "m", "server": "tfgen", "clients": clients, "tokens_per_s": 1.0}],
        }
        (tmp_path / f"serve_speed-{name}.json").write_text(__import__("json").dumps(record))
    page = report.page(tmp_path)
    assert "serve_speed.py --new`" in page and "| m | tfgen | 3 | 1.0 |" in page
    assert "--old" not in page and "--new-busy" not in page


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        env=dict(_env(), NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    notebook_page = (tmp_path / "site" / "notebooks" / "01_decoding_strategies" / "index.html").read_text()
    assert "greedy" in notebook_page.lower()
    api_page = (tmp_path / "site" / "api" / "model" / "index.html").read_text()
    assert "from_pretrained" in api_page
