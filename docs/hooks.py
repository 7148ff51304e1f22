"""MkDocs hooks: the notebooks in notebooks/ rendered as pages under notebooks/, at build time.

mkdocs-jupyter is not a dependency; nbformat (in the test extra) reads the notebooks, and this turns their
markdown cells, code cells and saved outputs (text, and PNG images inline) into Markdown, so `mkdocs build`
stays one command and the pages always show the committed notebooks.
"""

from pathlib import Path

import nbformat
from mkdocs.structure.files import File

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
PAGE_DIR = "notebooks"


def _fenced(text, language=""):
    fence = "````" if "```" in text else "```"
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def _output_markdown(output):
    if output.output_type == "stream":
        return _fenced(output.text) if output.name == "stdout" and output.text.strip() else ""
    if output.output_type == "error":
        return _fenced("\n".join([f"{output.ename}: {output.evalue}"]))
    data = output.get("data", {})
    if "image/png" in data:
        return f"![output](data:image/png;base64,{data['image/png'].strip()})"
    if "text/plain" in data:
        return _fenced(data["text/plain"])
    return ""


def notebook_markdown(notebook, name):
    """A notebook (nbformat node) as a Markdown page: markdown cells as they are, code cells and their outputs."""
    parts = [f"*Rendered from `notebooks/{name}` with its saved outputs.*"]
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source)
        elif cell.cell_type == "code" and cell.source.strip():
            parts.append(_fenced(cell.source, "python"))
            parts.extend(text for text in map(_output_markdown, cell.get("outputs", [])) if text)
    return "\n\n".join(parts) + "\n"


def on_files(files, config):
    for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        page = notebook_markdown(notebook, path.name)
        files.append(File.generated(config, f"{PAGE_DIR}/{path.stem}.md", content=page))
    return files
