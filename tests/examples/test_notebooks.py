"""The notebooks in examples/notebooks/ run top to bottom in a fresh kernel, and their
committed .ipynb files match the Jupytext .py files they are generated from.

Each ``examples/notebooks/*.py`` (a Jupytext percent file) is converted in memory and
executed by nbclient in a new IPython kernel running this interpreter (``sys.executable``,
so the project's virtualenv, whatever kernelspecs the machine has), with
``BNN_NOTEBOOK_SMALL=1`` so that each finishes in well under a minute on 2 cores. Any
cell that raises fails the test (nbclient's CellExecutionError), as does a cell running
past :data:`CELL_TIMEOUT_S`; nothing is skipped. Notebooks added to the folder are picked
up by the parametrisation.

After editing a notebook's .py, regenerate its .ipynb (outputs stripped) with
``.venv/bin/jupytext --to ipynb examples/notebooks/NAME.py``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import jupytext  # type: ignore[import-untyped]
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO / "examples" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.py"))
CELL_TIMEOUT_S = 600
# The repository the Colab badges open (github.com/<COLAB_REPO>); the README says how to
# change it.
COLAB_REPO = "your-org/bnn-infosharing"
BADGE = "https://colab.research.google.com/github/{repo}/blob/main/examples/notebooks/{name}"


class _ThisPython(KernelSpecManager):
    """Every kernel name is IPython on this interpreter (no kernelspec on disk needed)."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return KernelSpec(argv=argv, display_name="Python 3", language="python", env={})


def _cells(nb: Any) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def test_the_notebooks_are_there() -> None:
    names = {p.stem for p in NOTEBOOKS}
    assert {"01_regression_tour", "03_service_client"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_paired_badged_and_installs_itself(path: Path) -> None:
    nb = jupytext.read(path)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    first_markdown = next(c.source for c in nb.cells if c.cell_type == "markdown")
    badge = BADGE.format(repo=COLAB_REPO, name=f"{path.stem}.ipynb")
    assert f"]({badge})" in first_markdown, f"{path.name}: no Colab badge linking {badge}"
    first_code = next(c.source for c in nb.cells if c.cell_type == "code")
    assert "except ImportError" in first_code and "pip" in first_code, path.name
    assert f"git+https://github.com/{COLAB_REPO}" in first_code, path.name
    assert "BNN_NOTEBOOK_SMALL" in path.read_text(), f"{path.name} ignores the small-size flag"
    readme = (REPO / "README.md").read_text()
    assert f"examples/notebooks/{path.name}" in readme, f"the README does not link {path.name}"

    committed = NOTEBOOK_DIR / f"{path.stem}.ipynb"
    regenerate = f".venv/bin/jupytext --to ipynb examples/notebooks/{path.name}"
    assert committed.exists(), f"{committed.name} is missing: {regenerate}"
    stored = nbformat.read(committed, as_version=4)
    assert _cells(stored) == _cells(nb), f"{committed.name} differs from {path.name}: {regenerate}"
    assert stored.metadata["kernelspec"] == nb.metadata["kernelspec"]
    for cell in stored.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{committed.name} holds outputs: {regenerate}"
            )


def test_every_ipynb_has_its_py() -> None:
    stems = {p.stem for p in NOTEBOOKS}
    orphans = [p.name for p in NOTEBOOK_DIR.glob("*.ipynb") if p.stem not in stems]
    assert not orphans, f"notebooks without a Jupytext .py: {orphans}"


def _execute(nb: Any, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Run ``nb`` in place in a fresh kernel (working directory ``cwd``, no ``BNN_*``
    settings but ``BNN_NOTEBOOK_SMALL=1``); its outputs. CellExecutionError on any error."""
    for name in [k for k in os.environ if k.startswith("BNN_")] + ["MPLBACKEND"]:
        monkeypatch.delenv(name, raising=False)  # the kernel inherits this environment
    monkeypatch.setenv("BNN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    km = KernelManager(kernel_name="python3", kernel_spec_manager=_ThisPython())
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        allow_errors=False,
        resources={"metadata": {"path": str(cwd)}},  # the kernel's working directory
    )
    client.execute()
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_a_fresh_kernel(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = jupytext.read(path)
    try:
        outputs = _execute(nb, tmp_path, monkeypatch)  # raises, naming the cell, on an error
    finally:
        nbformat.write(nb, tmp_path / f"{path.stem}.executed.ipynb")
    assert not [out for out in outputs if out.output_type == "error"]
    if re.search(r"Image\(|plt\.show\(", path.read_text()):
        images = [out for out in outputs if "image/png" in out.get("data", {})]
        assert images, f"{path.name} shows plots but none came out"


def test_a_cell_that_raises_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner above fails on an error in any cell (and the cells after it do not run)."""
    text = "# %%\nimport os\nsmall = os.environ['BNN_NOTEBOOK_SMALL']\n\n# %%\n"
    text += "raise ValueError(f'broken with BNN_NOTEBOOK_SMALL={small}')\n\n# %%\nprint('after')\n"
    nb = jupytext.reads(text, fmt="py:percent")
    with pytest.raises(CellExecutionError, match=r"broken with BNN_NOTEBOOK_SMALL=1"):
        _execute(nb, tmp_path, monkeypatch)
    assert nb.cells[2].outputs == []
