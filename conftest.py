"""pytest over tests/ and notebooks/ (`make test`): with pytest-xdist's `--dist loadgroup`, the notebooks all run on one
worker, one after another in their numbered order, while the other worker takes the tests. Notebooks 04-07 and the
solutions share the toy run the first of them trains (runs/fast/toy in fast mode); two kernels training it at once
would meet its lock."""

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Put every notebook item in the xdist group ``notebooks`` (no effect without xdist)."""
    for item in items:
        if item.nodeid.startswith("notebooks/") or str(getattr(item, "path", "")).endswith(".ipynb"):
            item.add_marker(pytest.mark.xdist_group("notebooks"))
