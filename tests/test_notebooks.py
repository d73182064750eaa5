"""The notebooks run top to bottom in a fresh kernel, from a folder outside the repository, in their CPU-sized
CI mode (``JVIT_NOTEBOOK_MODE=ci``: offline, a few steps); their own asserts check what they claim. They are
Colab-ready (badge, an install cell that is a no-op where jvit is importable), self-contained (nothing read from
the repository's tree) and committed with their outputs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_inference", "02_finetune", "03_train_on_accelerators"]


def test_the_notebooks_are_colab_ready_and_committed_with_outputs():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        text = "\n".join(c.source for c in nb.cells)
        assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source, path.name
        assert 'if importlib.util.find_spec("jvit") is None:\n    %pip install' in text, path.name
        assert "../" not in text and "tests/" not in text, f"{path.name} reads from the repository's tree"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{path.name}: committed without running every cell"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"], path.name
        assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), f"{path.name}: no plot"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_outside_the_repository(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JVIT_NOTEBOOK_MODE", "ci")
    monkeypatch.chdir(tmp_path)
    copy = shutil.copy(path, tmp_path / path.name)
    nb = nbformat.read(copy, as_version=4)
    start = time.time()
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert time.time() - start < 240, f"{path.name} took {time.time() - start:.0f} s in CI mode"
