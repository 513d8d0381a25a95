"""The demo notebook runs top to bottom under nbclient, on the embedded default server."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from zchat_nb.local import stop_local_server

integration = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@integration
def test_demo_notebook_runs_top_to_bottom(tmp_path: Path) -> None:
    path = tmp_path / "chat_demo.ipynb"
    shutil.copy(NOTEBOOKS / "chat_demo.ipynb", path)  # never write outputs into the repository
    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        stop_local_server()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("application/vnd.jupyter.widget-view+json" in out.get("data", {}) for out in outputs)
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "Sent through the Python API" in text
    assert "message(s) this session had not seen" in text
    assert "connected to 127.0.0.1:" in text


def test_notebooks_are_committed_without_outputs() -> None:
    for path in NOTEBOOKS.rglob("*.ipynb"):
        if ".ipynb_checkpoints" in path.parts:
            continue
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path
