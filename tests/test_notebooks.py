"""Every notebook in notebooks/ runs end to end on its tiny preset (GLM_NOTEBOOK_TINY=1), in a fresh
Jupyter kernel, exactly as a user would run it; and none is stored with outputs."""

from __future__ import annotations

import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs_and_starts_with_the_install_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "pip" in code[0].source and "GLM_JAX_SOURCE" in code[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_tiny_preset(path, tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("GLM_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel starts like a user's: one CPU device
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell and its traceback) when a cell fails
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "tiny run" in printed
