"""The tutorials in docs/tutorials/, executed by a real Jupyter kernel.

Each notebook runs top to bottom in an IPython kernel (nbclient, ipykernel),
as a user's would: inside the kernel's running event loop, with its inline
plots and widget progress bars. The assertions read what the notebook
printed (the accuracy reached, its comparison with TFF's single-process
run), and check that no worker process outlives the kernel, also when the
kernel is shut down with a federation still open.
"""

from __future__ import annotations

import json
import re
import sys
import time

import pytest

from tests.conftest import ROOT, tagged_processes

pytestmark = pytest.mark.slow

TUTORIALS = ROOT / "docs" / "tutorials"
KERNEL = "fedcompose-test"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernel spec for this interpreter, found before any other."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "fedcompose tests",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return tmp_path


def _execute(notebook, workdir):
    from nbclient import NotebookClient

    client = NotebookClient(
        notebook,
        timeout=1200,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(workdir)}},
    )
    started = time.monotonic()
    client.execute()
    return time.monotonic() - started


def _text(notebook) -> str:
    out = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                out.append(output.get("text", ""))
            elif "data" in output:
                out.append(output["data"].get("text/plain", ""))
    return "\n".join(out)


def _has(notebook, mime: str) -> bool:
    return any(
        mime in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


def _no_worker_left(timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    left = tagged_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = tagged_processes()
    return left


@pytest.mark.parametrize(
    "name, accuracy_at_least",
    [("composing_learning_algorithms", 0.75), ("custom_algorithm", 0.6)],
)
def test_tutorial_notebook_runs_in_a_kernel(kernel_env, name, accuracy_at_least):
    import nbformat

    notebook = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    seconds = _execute(notebook, kernel_env)
    print(f"{name}: executed in {seconds:.0f} s")
    text = _text(notebook)
    accuracies = [float(a) for a in re.findall(r"held-out accuracy[^:\n]*: ([0-9.]+)", text)]
    assert accuracies and min(accuracies) >= accuracy_at_least, text[-3000:]
    difference = re.search(r"max \|fedcompose - TFF single process\| = ([0-9.e+-]+)", text)
    assert difference and float(difference.group(1)) <= 1e-5, text[-3000:]
    assert _has(notebook, "image/png"), "the plot did not render"
    assert _has(notebook, "application/vnd.jupyter.widget-view+json"), "no progress widget"
    assert not _no_worker_left(), "workers outlived the kernel"


def test_a_federation_left_open_stops_with_the_kernel(kernel_env):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "import fedcompose\n"
            "federation = fedcompose.LocalFederation(workers=2, writers=8).start()\n"
            "print(len(federation.workers), 'workers')"
        )
    ]
    client = NotebookClient(
        notebook, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(kernel_env)}}
    )
    with client.setup_kernel():
        client.execute_cell(notebook.cells[0], 0)
        assert "2 workers" in _text(notebook)
        assert tagged_processes(), "the workers should be running while the kernel is"
    # Leaving setup_kernel shuts the kernel down with the federation still open.
    assert not _no_worker_left(), "workers outlived the kernel"
