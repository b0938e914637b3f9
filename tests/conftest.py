import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as tgem does; before torch is imported

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"the shared real data folder {DATA} is missing (it sits beside the repo)")
    return DATA


@pytest.fixture(scope="session")
def pbmc(data_dir):
    with np.load(data_dir / "pbmc68k_reduced.npz", allow_pickle=False) as d:
        return d["X"], d["y_cell_type"], d["features"]


@pytest.fixture(autouse=True)
def _torch_threads():
    # keep the suite's CPU use bounded and restore whatever a test changed
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TGEM_TEST_THREADS", "2")))
    yield
    torch.set_num_threads(before)
