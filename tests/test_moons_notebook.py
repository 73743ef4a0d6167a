"""Executes notebooks/three_moons.ipynb top to bottom with a few training steps."""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "three_moons.ipynb"


@pytest.mark.slow
def test_three_moons_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MMJAX_MOONS_STEPS", "2")
    monkeypatch.setenv("MMJAX_MOONS_EVAL_SEQUENCES", "4")
    monkeypatch.setenv("MMJAX_MOONS_CONTEXT_STRIDE", "97")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel draws inline (with Agg)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # the kernel must run this interpreter (the venv's), where mmjax is installed
    monkeypatch.setenv("PATH", str(pathlib.Path(sys.executable).parent) + os.pathsep
                       + os.environ.get("PATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "2 training steps" in text
    assert "3 head(s): largest entry's share" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the data, the error curves and two weight figures


def test_install_cell_asks_for_the_repository_url(monkeypatch):
    """Without mmjax and with the placeholder URL, the first code cell says what to set."""
    monkeypatch.setenv("PATH", str(pathlib.Path(sys.executable).parent) + os.pathsep
                       + os.environ.get("PATH", ""))
    install = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells
                   if c.cell_type == "code")
    assert "MMJAX_GIT_URL" in install.source
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import sys\nsys.modules['mmjax'] = None  # not installed"),
        nbformat.v4.new_code_cell(install.source)])
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3")
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="set MMJAX_GIT_URL"):
        client.execute()
