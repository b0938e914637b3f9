import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as tgem does; before torch is imported

import numpy as np
import pytest
import torch

from tgem.datasets import load_pbmc68k

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: The optional packages some tests import with ``pytest.importorskip``. The ``test`` extra
#: installs them all; under ``TGEM_REQUIRE_EXTRAS=1`` (set by .ci/run) a missing one fails
#: the run instead of silently skipping those tests.
EXTRAS = ("anndata", "h5py", "matplotlib", "networkx", "skops", "dask", "distributed")


def pytest_sessionstart(session):
    if os.environ.get("TGEM_REQUIRE_EXTRAS") == "1":
        import importlib.util

        missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
        if missing:
            raise pytest.UsageError(
                f"TGEM_REQUIRE_EXTRAS=1 but {missing} are not installed; install the test "
                'extra: pip install -e ".[test]"'
            )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"the shared real data folder {DATA} is missing (it sits beside the repo)")
    return DATA


@pytest.fixture(scope="session")
def pbmc():
    """The PBMC cells that ship with tgem: ``(X, cell types, gene names)`` as NumPy arrays.

    ``tests/test_datasets.py`` checks they equal ``../shared/data/pbmc68k_reduced.npz``.
    """
    bunch = load_pbmc68k()
    return (
        np.asarray(bunch.data),
        np.asarray(bunch.target).astype(str),
        np.asarray(bunch.feature_names).astype(str),
    )


@pytest.fixture(autouse=True)
def _torch_threads():
    # keep the suite's CPU use bounded and restore whatever a test changed
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TGEM_TEST_THREADS", "2")))
    yield
    torch.set_num_threads(before)
