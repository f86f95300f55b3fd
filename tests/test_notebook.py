"""The Colab notebook runs top to bottom (tiny configuration, CPU), so it cannot rot."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "draw_colab_tpu.ipynb")


def test_colab_notebook_executes(shared_data, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DRAW_JAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("DRAW_JAX_SHARED_DATA", shared_data)
    monkeypatch.setenv("DRAW_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "valid bound" in text
    images = [o for o in outputs if "image/png" in o.get("data", {}) or "image/gif" in o.get("data", {})]
    assert len(images) >= 3  # samples, canvas strip, generation GIF
