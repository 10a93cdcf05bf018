"""examples/tour.ipynb, executed top to bottom with nbclient on a python3 kernel.

Every cell of the tour asserts what it shows (online softmax, the log-sum-exp merge, block
tables, flash decoding splits, copy-on-write, timings against naive NumPy), so a change in
behaviour fails here. The kernel runs this interpreter (sys.executable) from the repository
root, with the pagedflash under test first on PYTHONPATH (installed or an in-place build).
The notebook is stored without outputs; that is checked too. Skipped where nbclient, nbformat
or ipykernel is missing (the test extras install them: CI runs this test).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

import pagedflash

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "tour.ipynb"


def test_tour_is_stored_clean():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "no code cells"
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, "store the notebook without outputs"


def test_tour_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # a python3 kernel spec of this interpreter only, whatever kernels the machine has installed
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir.parent)]))

    env = dict(os.environ)
    pkg_parent = str(Path(pagedflash.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # where matplotlib is installed: a PNG output

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=km, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    t0 = time.perf_counter()
    client.execute(env=env)
    elapsed = time.perf_counter() - t0

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # the kernel imported the pagedflash under test, and each section printed its check
    assert "pagedflash " + pagedflash.__version__ in text
    for line in ("online vs three-pass", "merge of 2 chunks", "free blocks:", "num_splits=4", "copy-on-write:"):
        assert line in text, f"{line!r} not in the notebook's output:\n{text}"
    assert "seqlen" in text and "speedup" in text
    print(f"examples/tour.ipynb executed in {elapsed:.1f} s")
