"""The notebooks import the library and must keep running against it: each is executed top to bottom. Each is a lesson
that checks its own claims (at least one `assert` in a code cell), is stored with its outputs (so that it reads on the
web) and draws at least one figure."""
import os
import re

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")))
def test_notebook_runs(name):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any(re.search(r"^\s*assert\b", c.source, re.M) for c in code), f"{name}: no assert in any code cell"
    assert any(c.get("outputs") for c in code), f"{name} is stored without outputs: execute it before committing"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOKS}}).execute()   # raises on any cell error
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))
